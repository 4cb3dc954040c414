"""Checks MMSyncBN on one rank against an oracle over the global batch.

Every rank builds the same global batch from a seed, runs MMSyncBN on its
own slice and compares output, grad_input, grad_weight, grad_bias and the
running statistics with the oracle: ``F.batch_norm`` in float64 over the
concatenated batch ('N' mode, or any mode with equal splits), or, for
'default' mode with unequal splits, mmcv's rank-weighted statistics written
directly with autograd in float64.
"""
import contextlib
import itertools
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmsync.ops import SyncBatchNorm, sync_bn_comm

DTYPES = {
    'float64': torch.float64,
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
}
# Absolute floor of the tolerance, for outputs of magnitude ~1.
FLOOR = {'float64': 1e-9, 'float32': 2e-5, 'float16': 2e-3, 'bfloat16': 1e-2}
SAMPLE_SHAPES = {2: (), 3: (5, ), 4: (3, 4), 5: (2, 3, 2)}
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor',
               'all_gather_single', 'reduce_scatter', 'reduce_scatter_tensor',
               'broadcast', 'reduce', 'all_to_all', 'barrier')


@contextlib.contextmanager
def no_compile_cache():
    """torch.compile without inductor's and AOTAutograd's on-disk caches:
    their keys do not cover a custom op's fake kernel, so a graph compiled
    against another build of mmsync._ext (another statistics size, in this
    checkout or another one on the machine) would be reused."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        yield


@dataclass
class Case:
    """One configuration of the layer and one split of the global batch."""
    splits: List[int]
    dim: int = 4
    channels: int = 3
    channels_last: bool = False
    dtype: str = 'float32'
    stats_mode: str = 'N'
    affine: bool = True
    track_running_stats: bool = True
    momentum: Optional[float] = 0.1
    training: bool = True
    steps: int = 2
    offset: float = 0.0
    act: Optional[str] = None
    seed: int = 0
    name: str = field(default='')

    def describe(self) -> str:
        return self.name or ', '.join(f'{k}={v}'
                                      for k, v in asdict(self).items())


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives while installed, and
    records each as (name, values): the size of its first tensor argument
    (what an all_reduce sends, what a gather receives per rank)."""

    def __init__(self):
        self.calls = []
        self._saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append((_name, _values(args)))
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)

    @property
    def count(self) -> int:
        """The number of calls since the last take."""
        return len(self.calls)

    def take(self) -> int:
        """The number of calls since the last take."""
        return len(self.take_calls())

    def take_calls(self) -> list:
        """The (name, values) of the calls since the last take."""
        calls, self.calls = self.calls, []
        return calls


def _values(args) -> int:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.numel()
        if isinstance(arg, (list, tuple)) and arg and isinstance(
                arg[0], torch.Tensor):
            return sum(t.numel() for t in arg)
    return 0


def _layout(x: torch.Tensor, case: Case) -> torch.Tensor:
    if case.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if case.channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def _weighted_reference(x, splits, weight, bias, eps):
    """mmcv's 'default' statistics: each non-empty rank's moments weigh 1."""
    reduce_dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    parts = [p for p in torch.split(x, splits) if p.size(0) > 0]
    mean = torch.stack([p.mean(reduce_dims) for p in parts]).mean(0)
    var = torch.stack([((p - mean.view(shape))**2).mean(reduce_dims)
                       for p in parts]).mean(0)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y, mean.detach(), var.detach()


def _reference(case: Case, x, dy, weight, bias, running, step, low):
    """Output and gradients of the global batch, and the new running stats.

    With ``low`` the reference runs in the case's dtype (its own error sets
    the tolerance); otherwise in float64 on the same (rounded) values.
    """
    dtype = DTYPES[case.dtype] if low else torch.float64
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(dtype).clone().requires_grad_()
    w = b = None
    if weight is not None:
        w = weight.to(pdtype).clone().requires_grad_()
        b = bias.to(pdtype).clone().requires_grad_()
    momentum = case.momentum if case.momentum is not None else 1.0 / step
    n_total = x.numel() // x.size(1)
    equal = len(set(case.splits)) == 1
    rm = rv = None
    if case.track_running_stats and case.training:
        rm, rv = (t.clone().to(pdtype) for t in running)
    if not case.training and case.track_running_stats:
        y = F.batch_norm(x, running[0].to(pdtype), running[1].to(pdtype), w, b,
                         False, 0.0, 1e-5)
    elif case.stats_mode == 'N' or equal:
        y = F.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5)
    else:
        y, mean, var = _weighted_reference(x, case.splits, w, b, 1e-5)
        if rm is not None:
            unbiased = var * n_total / (n_total - 1)
            rm.mul_(1 - momentum).add_(mean.to(pdtype), alpha=momentum)
            rv.mul_(1 - momentum).add_(unbiased.to(pdtype), alpha=momentum)
    if case.act == 'relu':
        y = F.relu(y)
    y.backward(dy.to(dtype))
    grads = (x.grad, w.grad if w is not None else None,
             b.grad if b is not None else None)
    return y.detach(), grads, (rm, rv)


def _max_err(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check_case(case: Case,
               rank: int,
               world_size: int,
               counter: Optional[CollectiveCounter] = None) -> List[str]:
    """Runs ``case`` on this rank; returns a list of mismatches (empty: ok).

    Args:
        case (Case): The configuration; ``len(case.splits) == world_size``.
        rank (int): This process's rank.
        world_size (int): Size of the (default) process group.
        counter (CollectiveCounter, optional): Installed counter; when
            given, one collective per forward and backward is asserted.
    """
    assert len(case.splits) == world_size
    dtype = DTYPES[case.dtype]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    C = case.channels
    layer = SyncBatchNorm(
        C,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        stats_mode=case.stats_mode,
        act=case.act).to(pdtype)
    gen = torch.Generator().manual_seed(case.seed)
    if case.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.rand(C, generator=gen) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=gen))
    if case.track_running_stats:
        layer.running_mean.copy_(torch.randn(C, generator=gen))
        layer.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    layer.train(case.training)
    running = None
    if case.track_running_stats:
        running = (layer.running_mean.double().clone(),
                   layer.running_var.double().clone())
    offset = sum(case.splits[:rank])
    n_local = case.splits[rank]
    failures = []

    floor = FLOOR[case.dtype]

    def expect(what, got, want, want_low, step):
        tol = max(
            2 * _max_err(want_low, want),
            floor * max(1.0,
                        want.abs().max().item() if want.numel() else 1.0))
        err = _max_err(got, want)
        if not err <= tol:
            failures.append(f'[{case.describe()}] step {step} {what}: '
                            f'max error {err:.3g} > tolerance {tol:.3g}')

    for step in range(1, case.steps + 1):
        shape = (sum(case.splits), C) + SAMPLE_SHAPES[case.dim]
        x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        x64 = x64 * 2 + case.offset + 0.5
        dy64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        # The oracle sees exactly the values the layer gets.
        xq = x64.to(dtype).double()
        dyq = dy64.to(dtype).double()
        x = _layout(x64[offset:offset + n_local].to(dtype), case)
        x.requires_grad_()
        dy = _layout(dy64[offset:offset + n_local].to(dtype), case)
        weight = layer.weight.detach().double() if case.affine else None
        bias = layer.bias.detach().double() if case.affine else None
        syncs = case.training or not case.track_running_stats
        if counter is not None:
            counter.take()
        y = layer(x)
        if counter is not None:
            n = counter.take()
            want = {1 if syncs and world_size > 1 else 0}
            if (want == {1} and world_size > sync_bn_comm.GATHER_MAX_RANKS
                    and step == 1 and case.offset != 0):
                # The all_reduced moments start shifted by 0: far from this
                # data's mean they are summed again around it, once.
                want = {2}
            if n not in want:
                failures.append(f'[{case.describe()}] forward ran {n} '
                                f'collectives, expected {want}')
        y.backward(dy)
        if counter is not None:
            n = counter.take()
            if n != (1 if syncs and world_size > 1 else 0):
                failures.append(f'[{case.describe()}] backward ran {n} '
                                'collectives')
        sl = slice(offset, offset + n_local)
        scale = world_size
        if not syncs:
            # Eval with running stats is local: compare with this slice only.
            scale, sl = 1, slice(0, n_local)
            xq, dyq = xq[offset:offset + n_local], dyq[offset:offset + n_local]
        ref = _reference(case, xq, dyq, weight, bias, running, step, False)
        low = _reference(case, xq, dyq, weight, bias, running, step, True)
        expect('output', y, ref[0][sl], low[0][sl], step)
        if y.dtype != dtype or y.shape != x.shape:
            failures.append(f'[{case.describe()}] output is {y.dtype} '
                            f'{tuple(y.shape)}')
        if case.channels_last and x.dim() in (4, 5) and n_local > 1:
            fmt = (
                torch.channels_last
                if x.dim() == 4 else torch.channels_last_3d)
            if not y.is_contiguous(memory_format=fmt):
                failures.append(f'[{case.describe()}] output lost the '
                                'channels_last layout')
        expect('grad_input', x.grad, ref[1][0][sl], low[1][0][sl], step)
        if case.affine:
            # mmcv's convention: the group sum divided by the group size
            # (in training; eval with running stats is a local F.batch_norm).
            for name, got, i in (('grad_weight', layer.weight.grad, 1),
                                 ('grad_bias', layer.bias.grad, 2)):
                expect(name, got * scale, ref[1][i], low[1][i], step)
            layer.weight.grad = layer.bias.grad = None
        if case.track_running_stats and case.training:
            expect('running_mean', layer.running_mean, ref[2][0], low[2][0],
                   step)
            expect('running_var', layer.running_var, ref[2][1], low[2][1],
                   step)
            running = (ref[2][0], ref[2][1])
            if layer.num_batches_tracked.item() != step:
                failures.append(f'[{case.describe()}] num_batches_tracked '
                                f'{layer.num_batches_tracked.item()} != '
                                f'{step}')
    return failures


def standard_cases(
    splits_list, dtypes=('float64', 'float32', 'float16', 'bfloat16')
) -> List[Case]:
    """A broad grid: dims, layouts, dtypes, modes, options and splits."""
    cases = []
    seed = 0
    for splits, dim, dtype in itertools.product(splits_list, (2, 3, 4, 5),
                                                dtypes):
        layouts = (False, True) if dim >= 4 else (False, )
        for channels_last in layouts:
            for mode in ('N', 'default'):
                unequal = len(set(splits)) > 1
                if mode == 'default' and unequal and dtype in ('float16',
                                                               'bfloat16'):
                    continue  # its oracle is written in float64 only
                seed += 1
                cases.append(
                    Case(
                        splits=list(splits),
                        dim=dim,
                        channels_last=channels_last,
                        dtype=dtype,
                        stats_mode=mode,
                        seed=seed))
    options_list = [
        dict(affine=False),
        dict(track_running_stats=False),
        dict(momentum=None, steps=3),
        dict(training=False),
        dict(track_running_stats=False, training=False),
        dict(offset=1e4, dtype='float32'),
        dict(offset=1e4, dtype='float64'),
        dict(channels=1, dim=4),
        dict(channels=17, dim=2)
    ]
    # The fused ReLU against BN followed by F.relu, every layout and dtype.
    relu_layouts = ((2, False), (4, False), (4, True), (5, True))
    options_list += [
        dict(dim=dim, channels_last=last, dtype=dtype, act='relu')
        for dtype, (dim, last) in itertools.product(dtypes, relu_layouts)
    ]
    for splits in splits_list:
        for options in options_list:
            seed += 1
            cases.append(Case(splits=list(splits), seed=seed, **options))
    return cases


def run_cases(rank: int, world_size: int, cases: List[Case]) -> List[str]:
    """Worker entry: checks every case with collectives counted."""
    failures = []
    with CollectiveCounter() as counter:
        for case in cases:
            failures += check_case(case, rank, world_size, counter)
    return failures
