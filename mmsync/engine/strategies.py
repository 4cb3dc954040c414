"""Strategies of mmengine's ``FlexibleRunner`` that honour mmsync's options.

mmengine 0.10.7's ``DDPStrategy`` accepts only ``sync_bn='torch'`` or
``'mmcv'``, its ``FSDPStrategy`` ignores ``sync_bn`` altogether, and both
fail on CPU builds of torch: ``init_dist`` calls ``torch.cuda.set_device``,
DDP gets ``device_ids=[LOCAL_RANK]`` and FSDP ``device_id=LOCAL_RANK``. A
config that names these instead::

    custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
    runner_type = 'FlexibleRunner'
    strategy = dict(type='MMSyncDDPStrategy', sync_bn='mmsync')
    # or dict(type='MMSyncFSDPStrategy', sync_bn='mmsync',
    #         model_wrapper=dict(mixed_precision=dict(param_dtype='bfloat16')))

gets, in a distributed run, every BatchNorm converted to MMSyncBN before the
model is wrapped (``sync_bn`` as in ``MMSyncRunner``: ``'mmsync'`` or
``dict(type='mmsync', stats_mode=..., group_size=...)``; 'torch' and 'mmcv'
behave as in mmengine), the process group joined by ``init_dist_from_env``
(gloo on CPU), DDP and FSDP wrappers built for the CPU where there is no
CUDA, and under an FSDP mixed precision policy without an
``auto_wrap_policy`` the norms kept in float32 units
(:func:`mmsync.engine.fsdp.norm_wrap_policy`).
"""
import os

import torch
import torch.nn as nn
from mmengine._strategy import DDPStrategy
from mmengine._strategy.fsdp import FSDPStrategy
from mmengine.device import get_device
from mmengine.dist import is_distributed
from mmengine.model import is_model_wrapper
from mmengine.registry import MODEL_WRAPPERS
from mmengine.registry import STRATEGIES as ROOT_STRATEGIES
from torch.nn.modules.batchnorm import _BatchNorm

from ..cnn import convert_sync_batchnorm
from ..ops import SyncBatchNorm
from ..registry import STRATEGIES
from .preflight import launch_env
from .runner import init_dist_from_env, sync_bn_options


class MMSyncStrategyMixin:
    """What both strategies add: the CPU start and ``sync_bn='mmsync'``."""

    def _setup_distributed(self,
                           launcher: str = 'pytorch',
                           backend: str = 'nccl',
                           **kwargs) -> None:
        """Join the process group as ``MMSyncRunner`` does (gloo without
        CUDA); a group already joined is kept."""
        if not is_distributed():
            os.environ.update(launch_env(launcher))
            init_dist_from_env(backend, **kwargs)

    def convert_model(self, model: nn.Module) -> nn.Module:
        """Convert to MMSyncBN for ``sync_bn='mmsync'`` (in a distributed
        run only, as ``MMSyncRunner`` does); other values as mmengine."""
        options = sync_bn_options(self.sync_bn)
        if options is None:
            return super().convert_model(model)
        if self.distributed:
            model = convert_sync_batchnorm(model, **options)
        return model

    def _log_norms(self, model: nn.Module) -> None:
        """Say how many norm layers are mmsync's, as ``MMSyncRunner``
        does, so a run shows which layer its config reached."""
        norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        synced = sum(isinstance(m, SyncBatchNorm) for m in norms)
        self.logger.info(f'batch norm layers: {synced} of {len(norms)} are '
                         f'mmsync.ops.SyncBatchNorm (MMSyncBN)')


class MMSyncDDPStrategy(MMSyncStrategyMixin, DDPStrategy):
    """mmengine's ``DDPStrategy`` with ``sync_bn='mmsync'`` and a CPU start.

    Without CUDA the wrapper gets ``device_ids=None`` (unless the
    ``model_wrapper`` config gives them). Outside a distributed run the
    model is returned unwrapped, so one config also runs in one process.
    """

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        if is_model_wrapper(model):
            return model
        model = self.convert_model(model.to(get_device()))
        self._log_norms(model)
        if not self.distributed:
            return model
        if self.model_wrapper is None:
            # as mmengine: OpenMMLab models keep their buffers per rank
            self.model_wrapper = dict(
                type='MMDistributedDataParallel', broadcast_buffers=False)
        device_ids = ([int(os.environ['LOCAL_RANK'])]
                      if torch.cuda.is_available() else None)
        return MODEL_WRAPPERS.build(
            self.model_wrapper,
            default_args=dict(
                type='MMDistributedDataParallel',
                module=model,
                device_ids=device_ids))


class MMSyncFSDPStrategy(MMSyncStrategyMixin, FSDPStrategy):
    """mmengine's ``FSDPStrategy`` with ``sync_bn`` honoured, a CPU start,
    and norms kept in float32 under a mixed precision policy.

    Without CUDA the wrapper gets ``device_id=torch.device('cpu')``. Where
    ``model_wrapper`` sets ``mixed_precision`` but no ``auto_wrap_policy``,
    ``auto_wrap_policy='norm_wrap_policy'`` is added: FSDP then puts every
    BatchNorm (MMSyncBN included) in its own unit without the cast, which it
    does only where some policy is given. With a policy of the config's own,
    FSDP's ``MixedPrecision._module_classes_to_ignore`` (``_BatchNorm`` by
    default) does the same.
    """

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        if is_model_wrapper(model):
            return model
        model = self.convert_model(model)
        self._log_norms(model)
        wrapper = dict(self.model_wrapper or {})
        wrapper.setdefault('type', 'MMFullyShardedDataParallel')
        if not torch.cuda.is_available():
            wrapper.setdefault('device_id', torch.device('cpu'))
        if wrapper.get('mixed_precision') is not None:
            wrapper.setdefault('auto_wrap_policy', 'norm_wrap_policy')
        self.model_wrapper = wrapper
        return super()._wrap_model(model)


for _strategy in (MMSyncDDPStrategy, MMSyncFSDPStrategy):
    STRATEGIES.register_module(module=_strategy)
    # Downstream configs (default scope 'mmpretrain', 'mmdet', ...) find
    # them by their bare names.
    ROOT_STRATEGIES.register_module(module=_strategy, force=True)
