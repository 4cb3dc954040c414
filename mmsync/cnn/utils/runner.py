"""``MMSyncRunner``: mmengine's Runner on CPU and GPU, with ``sync_bn='mmsync'``.

mmengine's ``Runner`` reads ``cfg.sync_bn`` ('torch' or 'mmcv') when it wraps
a distributed model. ``MMSyncRunner`` adds 'mmsync', selected from a config
with::

    runner_type = 'MMSyncRunner'
    sync_bn = 'mmsync'  # or dict(type='mmsync', stats_mode='default')

It also trains any OpenMMLab config on a CPU build of torch: mmengine's
``init_dist`` assumes CUDA (it calls ``torch.cuda.set_device``) and its
default DDP wrapper passes ``device_ids=[LOCAL_RANK]``, which DDP rejects for
a CPU model. ``tools/train.py`` uses it for every config without its own
``runner_type``.
"""
import datetime
import os
from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS as ROOT_RUNNERS
from mmengine.runner import Runner

from ...registry import RUNNERS
from .sync_bn import convert_sync_batchnorm

SYNC_BN_TYPE = 'mmsync'


def sync_bn_options(sync_bn: Union[str, Dict, None]) -> Optional[Dict]:
    """Keyword arguments of ``convert_sync_batchnorm`` from ``cfg.sync_bn``.

    Args:
        sync_bn (str | dict, optional): ``'mmsync'``, or a dict with
            ``type='mmsync'`` and optionally ``stats_mode`` and
            ``group_size``; any other
            string or None is left to mmengine.

    Returns:
        dict | None: The options, or None when the value is not mmsync's.
    """
    if sync_bn is None or isinstance(sync_bn, str):
        return {} if sync_bn == SYNC_BN_TYPE else None
    if not isinstance(sync_bn, dict):
        raise TypeError('cfg.sync_bn must be a str, a dict or None, got '
                        f'{sync_bn!r} of type {type(sync_bn).__name__}')
    options = dict(sync_bn)
    sync_bn_type = options.pop('type', None)
    if sync_bn_type != SYNC_BN_TYPE:
        raise ValueError(f'cfg.sync_bn as a dict must have type='
                         f'{SYNC_BN_TYPE!r}, got {sync_bn!r}')
    unknown = sorted(set(options) - {'stats_mode', 'group_size'})
    if unknown:
        raise ValueError('cfg.sync_bn accepts only the keys "stats_mode" and '
                         f'"group_size" besides "type", got {unknown} in '
                         f'{sync_bn!r}')
    return options


ENV_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def init_dist_from_env(backend: Optional[str] = None,
                       timeout: Union[int, float, datetime.timedelta,
                                      None] = None,
                       **kwargs) -> str:
    """Join the default process group from torchrun's environment.

    Works on CPU builds of torch, unlike mmengine's ``init_dist``: with CUDA
    the process takes the GPU of its LOCAL_RANK and the backend defaults to
    NCCL; without CUDA it is gloo, also where the config asks for NCCL (as
    OpenMMLab's default runtimes do), so that a GPU config runs on CPU.

    Args:
        backend (str, optional): 'nccl', 'gloo' or None to choose as above.
        timeout (int | float | timedelta, optional): Seconds a collective may
            wait (mmengine's ``dist_cfg.timeout``). Default: torch's.
        **kwargs: Passed to ``torch.distributed.init_process_group``.

    Returns:
        str: The backend.
    """
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise RuntimeError('init_dist_from_env needs the environment '
                           f'variable(s) {", ".join(missing)}: start the '
                           'processes with torchrun (tools/dist_train.sh)')
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        backend = backend or 'nccl'
    elif backend in (None, 'nccl'):
        backend = 'gloo'
    if timeout is not None:
        kwargs['timeout'] = (
            timeout if isinstance(timeout, datetime.timedelta) else
            datetime.timedelta(seconds=timeout))
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
        **kwargs)
    return backend


@RUNNERS.register_module()
class MMSyncRunner(Runner):
    """mmengine's ``Runner`` whose ``cfg.sync_bn`` also accepts 'mmsync'.

    In a distributed run, ``sync_bn='mmsync'`` (or ``dict(type='mmsync',
    stats_mode='default')``) converts every BatchNorm of the model to
    MMSyncBN with ``convert_sync_batchnorm`` (``stats_mode='N'`` unless
    given) before the model is wrapped, as ``sync_bn='torch'`` does with
    torch's SyncBatchNorm. Without distribution the model is left as it is
    (MMSyncBN runs in a world of one). Every other value of ``sync_bn``
    behaves as in ``Runner``.

    With a launcher and torchrun's environment, the process group is joined
    by ``init_dist_from_env`` (gloo on CPU); without ``model_wrapper_cfg``
    a CPU model is wrapped in ``MMDistributedDataParallel`` with
    ``device_ids=None``.
    """

    def setup_env(self, env_cfg: Dict) -> None:
        if (self.distributed and not dist.is_initialized()
                and all(name in os.environ for name in ENV_VARS)):
            init_dist_from_env(**env_cfg.get('dist_cfg', {}))
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: Optional[Dict],
                   model: nn.Module) -> nn.Module:
        if (model_wrapper_cfg is None and self.distributed
                and not torch.cuda.is_available()):
            model_wrapper_cfg = dict(
                type='MMDistributedDataParallel',
                device_ids=None,
                broadcast_buffers=False,
                find_unused_parameters=self.cfg.get('find_unused_parameters',
                                                    False))
        options = sync_bn_options(self.cfg.get('sync_bn', None))
        if options is None:
            return super().wrap_model(model_wrapper_cfg, model)
        if self.distributed and not is_model_wrapper(model):
            model = convert_sync_batchnorm(model, **options)
        # Runner rejects any sync_bn but 'torch' and 'mmcv'; the conversion
        # is done, so it must not see the value while it wraps.
        sync_bn = self.cfg.sync_bn
        self.cfg.sync_bn = None
        try:
            return super().wrap_model(model_wrapper_cfg, model)
        finally:
            self.cfg.sync_bn = sync_bn


# Downstream configs (default scope 'mmpretrain', 'mmdet', ...) find it by
# its bare name: runner_type='MMSyncRunner'.
ROOT_RUNNERS.register_module(module=MMSyncRunner, force=True)
