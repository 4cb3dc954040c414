"""Precise BN: population statistics of the BatchNorms, exact over ranks.

mmpretrain's ``PreciseBNHook`` (after pycls and fvcore) runs batches with
``momentum=1`` and averages, over batches and then over ranks with equal
weights, each batch's mean and unbiased variance. That is the population
mean only where every batch of every rank has the same size, never the
population variance (the spread of the batch means is lost), and with plain
BN under DDP each rank normalizes and measures only its own slice.

Here every BatchNorm (plain or MMSyncBN) of the model, in each batch of the
pass, normalizes with the statistics of the global batch (the batches of all
ranks together, as one process holding them would), and the population
statistics are Chan's count-weighted merge of every global batch's (count,
mean, M2) in float64: running_mean and running_var become the mean and
unbiased variance of every input the layer saw on every rank, bit-identical
on every rank. One all_gather of 2C+1 values per layer and batch.
"""
import itertools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.dist import all_gather, all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS as ROOT_HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import HOOKS

# (count, mean, M2) of one channel vector: float64 tensors of shape (C, ).
Moments = Tuple[float, torch.Tensor, torch.Tensor]


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's merge of two (count, mean, M2): the moments of both sets."""
    count = a[0] + b[0]
    if b[0] == 0:
        return a
    if a[0] == 0:
        return b
    delta = b[1] - a[1]
    mean = a[1] + delta * (b[0] / count)
    return count, mean, a[2] + b[2] + delta * delta * (a[0] * b[0] / count)


def local_moments(input: torch.Tensor) -> torch.Tensor:
    """(count, mean, M2) per channel of an (N, C, *) input, packed in one
    float64 row [count, mean(C), M2(C)], two passes in float64."""
    channels = input.size(1)
    x = input.detach().transpose(0, 1).reshape(channels, -1).double()
    count = x.size(1)
    mean = x.mean(1) if count else x.new_zeros(channels)
    m2 = (x - mean[:, None]).square().sum(1)
    return torch.cat([x.new_tensor([count]), mean, m2])


def global_moments(input: torch.Tensor, world_size: int) -> Moments:
    """The moments of the global batch: every rank's row, merged in rank
    order (the same bits on every rank)."""
    row = local_moments(input)
    rows = all_gather(row) if world_size > 1 else [row]
    channels = input.size(1)
    moments = (0, row.new_zeros(channels), row.new_zeros(channels))
    for row in rows:
        row = row.to(input.device)
        moments = merge_moments(
            moments,
            (int(row[0].item()), row[1:channels + 1], row[channels + 1:]))
    return moments


class _Pass:
    """Hooks that make each BatchNorm normalize with the global batch's
    statistics (its eval path, given them as running statistics) and that
    accumulate the population moments."""

    def __init__(self, layers: List[_BatchNorm], world_size: int):
        self.world_size = world_size
        self.saved = {
            layer: (layer.running_mean.clone(), layer.running_var.clone())
            for layer in layers
        }
        self.moments: Dict[_BatchNorm, Moments] = {}
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self.before))
            self.handles.append(layer.register_forward_hook(self.after))

    def before(self, layer: _BatchNorm, args: Sequence) -> None:
        count, mean, m2 = global_moments(args[0], self.world_size)
        previous = self.moments.get(layer, (0, mean, torch.zeros_like(m2)))
        self.moments[layer] = merge_moments(previous, (count, mean, m2))
        if count:
            layer.running_mean.copy_(mean)
            # BatchNorm in training normalizes with the biased variance.
            layer.running_var.copy_(m2 / count)
            layer.training = False

    def after(self, layer: _BatchNorm, args: Sequence, output) -> None:
        layer.training = True

    def close(self, apply: bool) -> None:
        """Remove the hooks; write the population statistics (``apply``) or
        restore the running statistics as they were."""
        for handle in self.handles:
            handle.remove()
        for layer, (mean, var) in self.saved.items():
            layer.training = True
            count, pop_mean, m2 = self.moments.get(layer, (0, None, None))
            if apply and count > 1:
                layer.running_mean.copy_(pop_mean)
                layer.running_var.copy_(m2 / (count - 1))
            else:
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)


@torch.no_grad()
def update_bn_stats(model: nn.Module,
                    loader,
                    num_samples: int = 8192,
                    logger: Optional[logging.Logger] = None) -> int:
    """Set the running statistics of every BatchNorm in training mode to
    its population statistics over the next batches of ``loader``.

    Every rank must call it (with the same model); each runs as many
    batches as the rank with the fewest: ``num_samples // (batch_size *
    world_size)``, at most the length of its loader, at least one. Layers
    without running statistics, and those in eval mode (``norm_eval``), are
    left as they are. Weights and ``num_batches_tracked`` do not change.

    Args:
        model (nn.Module): An mmengine model (``data_preprocessor`` and
            ``forward(..., mode='tensor')``), or a wrapper of one.
        loader (DataLoader): Training batches of this rank.
        num_samples (int): Samples of all ranks together to use.
            Default: 8192.
        logger (logging.Logger, optional): Where to say what was done.

    Returns:
        int: The number of batches each rank ran.
    """
    module = model.module if is_model_wrapper(model) else model
    _, world_size = get_dist_info()
    layers = [
        m for m in module.modules() if isinstance(m, _BatchNorm) and m.training
        and m.running_mean is not None
    ]
    batch_size = loader.batch_size or getattr(loader.batch_sampler,
                                              'batch_size', 1)
    num_iter = torch.tensor(
        max(1, min(num_samples // (batch_size * world_size), len(loader))))
    if world_size > 1:
        all_reduce(num_iter, op='min')
    num_iter = int(num_iter)
    if not layers:
        print_log(
            'PreciseBN: no BatchNorm in training mode with running '
            'statistics',
            logger=logger,
            level=logging.WARNING)
        return 0
    run = _Pass(layers, world_size)
    done = False
    try:
        for data in itertools.islice(loader, num_iter):
            if hasattr(module, 'data_preprocessor'):
                module._run_forward(
                    module.data_preprocessor(data, False), mode='tensor')
            else:
                module(data)
        done = True
    finally:
        run.close(apply=done)
    counts = sorted({int(m[0]) for m in run.moments.values()})
    print_log(
        f'PreciseBN: population statistics of {len(layers)} BatchNorm '
        f'layers over {num_iter} batches of each of {world_size} ranks '
        f'({", ".join(map(str, counts))} values per channel)',
        logger=logger)
    return num_iter


class PreciseBNHook(Hook):
    """Recompute the BatchNorms' running statistics as population
    statistics before they are saved or evaluated.

    A drop-in for mmpretrain's ``PreciseBNHook`` (same arguments, same
    schedule) whose statistics are exact: the count-weighted mean and
    unbiased variance of every input each layer sees over the global batches,
    identical on every rank, for MMSyncBN and plain BN alike (see
    :func:`update_bn_stats`). Its priority is ABOVE_NORMAL, so that it runs
    before EMAHook and CheckpointHook.

    Args:
        num_samples (int): Samples of all ranks together to use.
            Default: 8192.
        interval (int): Every how many epochs (``EpochBasedTrainLoop``) or
            iterations (``IterBasedTrainLoop``). Default: 1.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, num_samples: int = 8192, interval: int = 1) -> None:
        if num_samples <= 0 or interval <= 0:
            raise ValueError('PreciseBNHook needs num_samples > 0 and '
                             f'interval > 0, got num_samples={num_samples}, '
                             f'interval={interval}')
        self.num_samples = num_samples
        self.interval = interval

    def _precise_bn(self, runner) -> None:
        update_bn_stats(
            runner.model,
            runner.train_loop.dataloader,
            self.num_samples,
            logger=runner.logger)

    def after_train_epoch(self, runner) -> None:
        if (isinstance(runner.train_loop, EpochBasedTrainLoop)
                and self.every_n_epochs(runner, self.interval)):
            self._precise_bn(runner)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs=None) -> None:
        if (isinstance(runner.train_loop, IterBasedTrainLoop)
                and self.every_n_train_iters(runner, self.interval)):
            self._precise_bn(runner)


HOOKS.register_module(module=PreciseBNHook)
# Downstream configs find it by its bare name where their scope has no
# PreciseBNHook of its own; mmpretrain's has, so there it is
# 'mmsync.PreciseBNHook'.
ROOT_HOOKS.register_module(module=PreciseBNHook, force=True)
