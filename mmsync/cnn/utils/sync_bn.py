"""Swap BatchNorm layers of a model for MMSyncBN and back.

Both directions share the parameters and buffers of the layers they replace
(no copy), so an optimizer built before the swap still updates the model,
and the state_dict keys do not change.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops import SyncBatchNorm
from ...ops.sync_bn import check_act, check_stats_mode


class BatchNormXd(_BatchNorm):
    """Single-process BatchNorm for inputs of any rank (N, C, *).

    What ``revert_sync_batchnorm`` turns synchronized layers into: it runs
    without a process group, like ``nn.BatchNorm2d`` but without a check of
    the input rank, and keeps MMSyncBN's fused ReLU so outputs do not change.

    Args:
        num_features (int): Number of channels C.
        eps (float): Added to the variance. Default: 1e-5.
        momentum (float, optional): Running-stat factor; ``None`` for a
            cumulative average. Default: 0.1.
        affine (bool): Learn a per-channel weight and bias. Default: True.
        track_running_stats (bool): Keep running mean and variance.
            Default: True.
        act (str, optional): ``'relu'`` applies a ReLU to the output.
            Default: None.
    """

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 act: Optional[str] = None):
        check_act(act)
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats)
        self.act = act

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError('BatchNormXd expects an input of shape (N, C, *) '
                             f'with at least 2 dimensions, got '
                             f'{input.dim()}D input of shape '
                             f'{tuple(input.shape)}')

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = super().forward(input)
        return F.relu(output) if self.act == 'relu' else output

    def extra_repr(self) -> str:
        return super().extra_repr() + (f', act={self.act!r}'
                                       if self.act else '')


def _share_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Give ``target`` the parameters, buffers and mode of ``source``."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.training = source.training
    if hasattr(source, 'qconfig'):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchnorm(module: nn.Module,
                           group=None,
                           stats_mode: str = 'default',
                           group_size: Optional[int] = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by MMSyncBN.

    BatchNorm1d/2d/3d, torch's ``SyncBatchNorm``, ``BatchNormXd`` and any
    other ``_BatchNorm`` become ``mmsync.ops.SyncBatchNorm`` sharing the
    same parameters and buffers (``requires_grad`` follows), in the same
    train/eval mode. MMSyncBN layers already there are left as they are.

    Args:
        module (nn.Module): The model, changed in place; if it is itself a
            BatchNorm the new layer is returned instead.
        group (ProcessGroup, optional): Ranks the new layers synchronize;
            ``None`` for the default group. Default: None.
        stats_mode (str): 'default' or 'N', see ``SyncBatchNorm``.
            Default: 'default'.
        group_size (int, optional): Synchronize within groups of this many
            consecutive ranks instead of ``group``, see ``SyncBatchNorm``.
            Default: None.

    Returns:
        nn.Module: The converted module.
    """
    check_stats_mode(stats_mode)
    module_output = module
    if (isinstance(module, _BatchNorm)
            and not isinstance(module, SyncBatchNorm)):
        # Only our own BatchNormXd's act is known to mean a fused ReLU.
        act = module.act if isinstance(module, BatchNormXd) else None
        module_output = _share_state(
            module,
            SyncBatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                group=group,
                stats_mode=stats_mode,
                act=act,
                group_size=group_size))
    for name, child in module.named_children():
        module_output.add_module(
            name, convert_sync_batchnorm(child, group, stats_mode, group_size))
    return module_output


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace MMSyncBN and torch's SyncBatchNorm by ``BatchNormXd``.

    The result runs on CPU in one process without any process group. The
    new layers share the parameters and buffers of the old ones and keep
    their train/eval mode and fused ReLU, so eval outputs and state_dict
    keys are unchanged.

    Args:
        module (nn.Module): The model, changed in place; if it is itself a
            synchronized BatchNorm the new layer is returned instead.

    Returns:
        nn.Module: The reverted module.
    """
    module_output = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        module_output = _share_state(
            module,
            BatchNormXd(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                act=getattr(module, 'act', None)))
    for name, child in module.named_children():
        module_output.add_module(name, revert_sync_batchnorm(child))
    return module_output
