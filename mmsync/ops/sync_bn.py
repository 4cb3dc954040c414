"""Synchronized batch normalization: ``SyncBatchNorm``, registered 'MMSyncBN'.

A training step runs five compiled ops (``torch.ops.mmsync.*``) and two
collectives of O(C) buffers (in ``sync_bn_comm``; three on a step where the
all_reduced statistics of a group beyond 8 ranks are summed again):

forward:  stats (one pass: count, mean, M2) -> all_gather of the ranks'
          rows (float64, R x (3C+2)) -> finalize (O(R*C): Chan's merge in
          rank order) -> output (one pass, affine and optional ReLU fused)
backward: reduce (one pass: sum(dy), sum(dy*xhat)) -> group sum (2C)
          -> data (one pass, recomputes xhat from the saved input)

Both collectives are all_gathers (merged and summed locally in rank order)
in groups of up to ``GATHER_MAX_RANKS`` (8) ranks, where they are one
exchange; beyond, one all_reduce each of 3C+2 and 2C float64 values, the
forward's of moments shifted by the layer's previous global mean (exact at
any offset; ``sync_bn_comm.reduce_stats``), so that every collective moves
O(C) values per rank at any group size.

Nothing of input size is saved for backward besides the input itself.
A forward that activation checkpointing recomputes during backward reuses
the global statistics of the forward it repeats (``sync_bn_recompute``): no
collective, no second running-stat update, bit-identical output.
A batch whose global statistics are not finite leaves the running
statistics, ``num_batches_tracked`` and the all_reduce path's shift as they
were on every rank (decided from the reduced values with tensor ops: no host
sync) and counts in the ``nonfinite_batches`` buffer.
Under ``torch.compile`` dynamo turns both collectives into functional ones
inside the graph (no graph break). ``MMSYNC_CHECK_SYNC=1`` adds one small
all_gather before each collective to check that the ranks agree.
"""
import functools
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from ..registry import NORM_LAYERS
from ..utils import load_ext
from .sync_bn_comm import (STATS_MODES, SyncCheck, check_sync_enabled,
                           group_stats, group_sum, resolve_group_size,
                           stats_shift, sync_subgroup)
from .sync_bn_recompute import StatsRecord, find_record

# The buffer counting the batches skipped for non-finite statistics.
NONFINITE = 'nonfinite_batches'

ext_module = load_ext('_ext', [
    'sync_bn_forward_stats', 'sync_bn_forward_finalize',
    'sync_bn_forward_output', 'sync_bn_backward_reduce',
    'sync_bn_backward_data'
])


def check_stats_mode(stats_mode: str) -> None:
    """Raises a ValueError naming the allowed statistics modes."""
    if stats_mode not in STATS_MODES:
        raise ValueError(f'stats_mode must be one of {STATS_MODES}, got '
                         f'{stats_mode!r}')


def check_act(act: Optional[str]) -> None:
    """Raises a ValueError unless ``act`` is a fusable activation."""
    if act not in (None, 'relu'):
        raise ValueError(f"act must be None or 'relu', got {act!r}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# torch >= 2.4 names it register_fake; 2.1-2.3 call it impl_abstract.
_register_fake = getattr(torch.library, 'register_fake',
                         getattr(torch.library, 'impl_abstract', None))


def _register_fake_kernels():
    """Shape-only kernels so that torch.compile / FakeTensor can trace."""

    @_register_fake('mmsync::sync_bn_forward_stats')
    def _(input, weight_by_count):
        return input.new_empty((3 * input.size(1) + 2, ), dtype=torch.float64)

    @_register_fake('mmsync::sync_bn_forward_finalize')
    def _(stats, running_mean, running_var, num_batches_tracked, momentum, eps,
          count, weight_by_count, dtype):
        channels = (stats.size(-1) - 2) // 3
        return (stats.new_empty(
            (channels, ),
            dtype=dtype), stats.new_empty(
                (channels, ), dtype=dtype), stats.new_empty((1, ),
                                                            dtype=dtype))

    @_register_fake('mmsync::sync_bn_forward_output')
    def _(input, mean, invstd, weight, bias, relu):
        return _empty_in_kernel_layout(input)

    @_register_fake('mmsync::sync_bn_backward_reduce')
    def _(grad_output, input, mean, invstd, weight, bias, relu):
        return input.new_empty((2 * input.size(1), ),
                               dtype=_acc_dtype(input.dtype))

    @_register_fake('mmsync::sync_bn_backward_data')
    def _(grad_output, input, mean, invstd, weight, bias, sums, scale, relu):
        return _empty_in_kernel_layout(input)


def _dense_layout(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x`` as it is (contiguous or channels
    last)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True  # a cached flag: no view to build
    return x.movedim(1, -1).is_contiguous()


def _empty_in_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with the strides the kernels give their outputs."""
    if _dense_layout(x):
        return torch.empty_strided(
            x.size(), x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_register_fake_kernels()


def _once_differentiable(backward):
    """``torch.autograd.function.once_differentiable`` with an error that
    names the layer, raised whenever gradients computed with
    ``create_graph=True`` are differentiated again (also where the incoming
    gradient is a constant: grad_input still depends on the input and
    weight, so treating it as a constant would be a silent wrong answer)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        error = torch._C._functions.DelayedError(
            b'MMSyncBN does not support double backward: its gradients were '
            b'computed with create_graph=True and then differentiated again '
            b'(e.g. a gradient penalty through a synchronized batch norm); '
            b'use BatchNorm or revert_sync_batchnorm for that part',
            len(outputs))
        return error(*[
            o.detach().requires_grad_() if o is not None else None
            for o in outputs
        ])

    return wrapper


def _skip_nonfinite(mean: torch.Tensor, invstd: torch.Tensor,
                    running_mean: torch.Tensor, running_var: torch.Tensor,
                    before: Tuple[torch.Tensor, torch.Tensor],
                    num_batches_tracked: Optional[torch.Tensor],
                    nonfinite: Optional[torch.Tensor]) -> None:
    """Undo the running-stat update of a batch whose global statistics are
    not finite (a NaN or Inf in any channel, an fp16 overflow), so that one
    bad batch does not make every later evaluation NaN; count it in
    ``nonfinite`` instead of ``num_batches_tracked``.

    ``before`` holds the running mean and variance as they were.
    Decided from the group's reduced mean and invstd, identical on every
    rank, with tensor ops only: no host sync, CUDA-graph safe. An infinite
    variance gives invstd 0, whose reciprocal is not finite either.
    """
    finite = torch.isfinite(torch.cat([mean, invstd.reciprocal()])).all()
    torch.where(finite, running_mean, before[0], out=running_mean)
    torch.where(finite, running_var, before[1], out=running_var)
    skipped = torch.where(finite, 0, 1)
    if num_batches_tracked is not None:
        num_batches_tracked.sub_(skipped)
    if nonfinite is not None:
        nonfinite.add_(skipped)


class SyncBatchNormFunction(torch.autograd.Function):
    """Autograd of synchronized BN: one collective each way.

    ``grad_weight`` and ``grad_bias`` follow mmcv's convention: the group's
    sum divided by the group size, identical on every rank, so that the
    gradient averaging of DistributedDataParallel leaves them unchanged.
    """

    @staticmethod
    def symbolic(g,
                 input,
                 weight,
                 bias,
                 running_mean,
                 running_var,
                 num_batches_tracked,
                 momentum,
                 eps,
                 group,
                 group_size,
                 stats_mode,
                 relu,
                 check,
                 recompute=None,
                 keep=None,
                 shift=None,
                 nonfinite=None):
        """ONNX (TorchScript exporter, training mode): one node
        ``mmsync::MMSyncBatchNorm`` with inputs X[, scale, B][, mean, var]
        and what a runtime needs to synchronize as attributes."""
        present = [
            t for t in (weight, bias, running_mean, running_var)
            if t is not None
        ]
        return g.op(
            'mmsync::MMSyncBatchNorm',
            input,
            *present,
            eps_f=eps,
            momentum_f=0.0 if momentum is None else momentum,
            cumulative_average_i=int(momentum is None),
            group_size_i=group_size,
            stats_mode_s=stats_mode,
            relu_i=int(relu),
            affine_i=int(weight is not None),
            track_running_stats_i=int(running_mean is not None)).setType(
                input.type())

    @staticmethod
    def forward(ctx,
                input: torch.Tensor,
                weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor],
                momentum: Optional[float],
                eps: float,
                group,
                group_size: int,
                stats_mode: str,
                relu: bool,
                check: Optional[SyncCheck],
                recompute=None,
                keep=None,
                shift=None,
                nonfinite=None) -> torch.Tensor:
        if not _dense_layout(input):
            input = input.contiguous()
        by_count = stats_mode == 'N'
        count = input.numel() // input.size(1) if input.size(1) else 0
        if recompute is not None:
            # Activation checkpointing runs this forward again: the first
            # run's global statistics, no collective, no running-stat update.
            record = recompute.pick(
                lambda: ext_module.sync_bn_forward_stats(input, by_count))
            mean, invstd, scale = record.mean, record.invstd, record.scale
        else:
            if check is not None:
                check(group, 0, input.size(1), input.dtype, stats_mode,
                      input.device)
            stats = ext_module.sync_bn_forward_stats(input, by_count)
            row = stats
            # An ONNX export replaces this function by its symbolic node;
            # the traced run only needs local values.
            if group_size > 1 and not torch.onnx.is_in_onnx_export():
                state, site = shift if shift is not None else (None, 0)
                stats = group_stats(stats, group, group_size, state,
                                    'forward statistics', site)
            elif count == 1:
                # Alone, this rank knows without reading the device; a group
                # holding one value in all is caught by finalize (an error
                # on CPU, a device-side assertion on CUDA: no host sync).
                raise ValueError('Expected more than 1 value per channel '
                                 'when training, got input size '
                                 f'{tuple(input.shape)}')
            # Merges the ranks' rows in rank order. mean and invstd stay
            # float64 (O(C)): the kernels split the mean into hi + lo parts
            # so that x - mean is exact when mean >> std.
            before = None
            if running_mean is not None:
                before = (running_mean.clone(), running_var.clone())
            mean, invstd, scale = ext_module.sync_bn_forward_finalize(
                stats, running_mean, running_var, num_batches_tracked,
                momentum, eps, count, by_count, torch.float64)
            if before is not None:
                _skip_nonfinite(mean, invstd, running_mean, running_var,
                                before, num_batches_tracked, nonfinite)
            if keep is not None:
                keep(StatsRecord(row, count, mean, invstd, scale))
        output = ext_module.sync_bn_forward_output(input, mean, invstd, weight,
                                                   bias, relu)
        ctx.save_for_backward(input, weight, bias, mean, invstd, scale)
        ctx.group = group
        ctx.group_size = group_size
        ctx.relu = relu
        ctx.check = check
        ctx.stats_mode = stats_mode
        ctx.shift = shift[0] if shift is not None else None
        return output

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        input, weight, bias, mean, invstd, scale = ctx.saved_tensors
        channels = input.size(1)
        if ctx.shift is not None:
            ctx.shift.stepped = True  # the next forward starts a step
        if ctx.check is not None:
            ctx.check(ctx.group, 1, channels, grad_output.dtype,
                      ctx.stats_mode, grad_output.device)
        if grad_output.stride() != input.stride():
            # The kernels read dy in the input's layout: one copy here, not
            # one in each of the two ops below.
            grad_output = _empty_in_kernel_layout(input).copy_(grad_output)
        sums = ext_module.sync_bn_backward_reduce(grad_output, input, mean,
                                                  invstd, weight, bias,
                                                  ctx.relu)
        if ctx.group_size > 1:
            # In float64 whatever the input's dtype: the ranks' buffers must
            # match even where their inputs' dtypes differ (and the sum over
            # ranks loses nothing).
            sums = group_sum(sums.double(), ctx.group, ctx.group_size,
                             'backward gradient sums')
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = ext_module.sync_bn_backward_data(
                grad_output, input, mean, invstd, weight, bias, sums, scale,
                ctx.relu)
        if ctx.group_size > 1:
            sums = sums / ctx.group_size
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sums[channels:].to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = sums[:channels].to(bias.dtype)
        return (grad_input, grad_weight, grad_bias, None, None, None, None,
                None, None, None, None, None, None, None, None, None, None)


@NORM_LAYERS.register_module(name='MMSyncBN')
class SyncBatchNorm(_BatchNorm):
    """Synchronized batch normalization, exact for any split of the batch.

    A drop-in for mmcv's ``MMSyncBN``: same constructor and statistics
    modes, and the state_dict keys of ``nn.BatchNorm2d``. Unlike mmcv's it
    subclasses ``_BatchNorm`` (so ``norm_eval`` and ``norm_decay_mult`` see
    it), runs without an initialized process group (a world of one), and
    with ``stats_mode='N'`` equals ``F.batch_norm`` over the concatenated
    global batch in forward and backward for any per-rank batch sizes.

    Args:
        num_features (int): Number of channels C of an (N, C, *) input.
        eps (float): Added to the variance. Default: 1e-5.
        momentum (float, optional): Running-stat factor; ``None`` for a
            cumulative average. Default: 0.1.
        affine (bool): Learn a per-channel weight and bias. Default: True.
        track_running_stats (bool): Keep running mean and variance; without
            them batch statistics are synchronized in eval too.
            Default: True.
        group (ProcessGroup, optional): Ranks to synchronize; ``None`` is
            the default group, or a world of one when torch.distributed is
            not initialized. Default: None.
        stats_mode (str): ``'default'``: every non-empty rank's statistics
            weigh equally (mmcv's rule); ``'N'``: weighted by sample count,
            the exact statistics of the global batch. Both agree when all
            ranks hold the same number of samples. Default: 'default'.
        act (str, optional): ``'relu'`` fuses a ReLU into the output and
            its gradient into the backward passes. Default: None.
        group_size (int | str, optional): Synchronize within groups of this
            many consecutive ranks of the world (created once by
            :func:`sync_subgroup`, shared by all layers); it must divide the
            world size. ``'node'``: the processes of one node (the
            launcher's processes per node, equal on every node). Excludes
            ``group``. Default: None (the whole group).
        check_sync (bool, optional): Before every collective, check that
            all ranks of the group are at the same call of the same layer
            with the same channels, dtype and stats_mode and will run the
            same kind of collective, and raise the same
            error on every rank when not (one small extra all_gather per
            collective, for debugging). ``None`` follows the environment
            variable ``MMSYNC_CHECK_SYNC``. With it, an invalid input on one
            rank raises on every rank of the group. Default: None.
        device (torch.device, optional): Where the parameters and buffers
            are created (``torch.nn.utils.skip_init`` passes 'meta').
            Default: None.
        dtype (torch.dtype, optional): Their dtype. Default: None.

    A forward that activation checkpointing recomputes during backward
    reuses the statistics of the forward it repeats: no collective and no
    second running-stat update (see ``mmsync.ops.sync_bn_recompute``).

    A training batch whose global statistics are not finite (an fp16
    overflow, a bad sample) gives BatchNorm's output (NaN where the input
    is) but leaves the running statistics and ``num_batches_tracked`` as
    they were, where torch's BatchNorm makes them NaN for good; the
    non-persistent buffer ``nonfinite_batches`` counts such batches.
    """

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 group=None,
                 stats_mode: str = 'default',
                 act: Optional[str] = None,
                 group_size: Union[int, str, None] = None,
                 check_sync: Optional[bool] = None,
                 device=None,
                 dtype=None):
        check_stats_mode(stats_mode)
        check_act(act)
        group_size = resolve_group_size(group_size)
        if group_size is not None:
            if (isinstance(group_size, bool)
                    or not isinstance(group_size, int) or group_size < 1):
                raise ValueError('group_size must be None or a positive int '
                                 f"(or 'node'), got {group_size!r}")
            if group is not None:
                raise ValueError('pass either group or group_size to '
                                 'MMSyncBN, not both')
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype)
        self.group = group
        self.stats_mode = stats_mode
        self.act = act
        self.subgroup_size = group_size
        self.check_sync = check_sync
        self._sync_check = SyncCheck()
        # How many training batches the running statistics skipped because
        # their statistics were not finite; not saved in checkpoints.
        self.register_buffer(
            NONFINITE,
            torch.zeros((), dtype=torch.long, device=device),
            persistent=False)
        if group_size is not None and dist.is_available(
        ) and dist.is_initialized():
            sync_subgroup(group_size)  # a bad size fails at build time

    def _sync_group(self) -> Tuple[Optional[object], int]:
        """The group to synchronize over now and its size; a world of one
        when torch.distributed is not initialized."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.group
        if self.subgroup_size is not None:
            group = sync_subgroup(self.subgroup_size)
        return group, self._sync_size()

    def _sync_size(self) -> int:
        """The size ``_sync_group`` gives, without creating any group."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        if self.subgroup_size is not None:
            return self.subgroup_size
        return dist.get_world_size(self.group)

    @property
    def group_size(self) -> int:
        """Ranks in the synchronized group (1 without torch.distributed).
        Reading it (or printing the layer) never communicates."""
        return self._sync_size()

    def _check_enabled(self) -> bool:
        if self.check_sync is None:
            return check_sync_enabled()
        return bool(self.check_sync)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError('MMSyncBN expects an input of shape (N, C, *) '
                             f'with at least 2 dimensions, got '
                             f'{input.dim()}D input of shape '
                             f'{tuple(input.shape)}')
        if input.size(1) != self.num_features:
            raise ValueError(f'MMSyncBN was built for num_features='
                             f'{self.num_features} channels, got input of '
                             f'shape {tuple(input.shape)} with '
                             f'{input.size(1)} channels (dim 1)')
        if not input.dtype.is_floating_point:
            raise TypeError('MMSyncBN expects a float32, float64, float16 or '
                            f'bfloat16 input, got {input.dtype}')

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synced = self.training or self.running_mean is None
        group, group_size, check = None, 1, None
        if synced:
            group, group_size = self._sync_group()
            if group_size > 1 and self._check_enabled():
                check = self._sync_check
        try:
            self._check_input_dim(input)
        except (ValueError, TypeError) as error:
            if check is not None:
                check.bad_input(group, input, self.stats_mode, error)
            raise
        if not synced:
            output = F.batch_norm(input, self.running_mean, self.running_var,
                                  self.weight, self.bias, False, 0.0, self.eps)
            return F.relu(output) if self.act == 'relu' else output
        recompute, keep = find_record(self, input)
        tracking = self.training and self.track_running_stats
        if (tracking and recompute is None
                and self.num_batches_tracked is not None):
            self.num_batches_tracked.add_(1)
        shift = stats_shift(self, group_size)
        if shift is not None:
            site = None if recompute is not None else shift.site(group)
            shift = (shift, site)
        return SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.num_batches_tracked if tracking else None, self.momentum,
            self.eps, group if group_size > 1 else None, group_size,
            self.stats_mode, self.act == 'relu', check, recompute, keep, shift,
            self._buffers.get(NONFINITE) if tracking else None)

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, group_size={self.group_size}, '
                f'stats_mode={self.stats_mode!r}' +
                (f', act={self.act!r}' if self.act else ''))


class LazySyncBatchNorm(LazyModuleMixin, SyncBatchNorm):
    """MMSyncBN whose ``num_features`` is read from the first input, as
    ``torch.nn.LazyBatchNorm2d``'s is: what ``convert_sync_batchnorm`` makes
    of a lazy BatchNorm not yet run. It becomes a ``SyncBatchNorm`` at the
    first forward. Takes ``SyncBatchNorm``'s arguments but ``num_features``.
    """

    cls_to_become = SyncBatchNorm

    def __init__(self,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 device=None,
                 dtype=None,
                 **kwargs):
        factory = dict(device=device, dtype=dtype)
        # Created without parameters and buffers (num_features=0), which
        # stand uninitialized until the first input.
        super().__init__(0, eps, momentum, False, False, **factory, **kwargs)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(
                0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:
        if not self.has_uninitialized_params():
            return
        if input.dim() < 2:
            self._check_input_dim(input)  # the error SyncBatchNorm gives
        self.num_features = input.size(1)
        shape = (self.num_features, )
        for tensor in (self.weight, self.bias, self.running_mean,
                       self.running_var):
            if tensor is not None:
                tensor.materialize(shape)
        self.reset_parameters()
