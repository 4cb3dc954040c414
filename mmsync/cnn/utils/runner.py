"""``cfg.sync_bn = 'mmsync'``: mmengine's Runner converting BN to MMSyncBN.

mmengine's ``Runner`` reads ``cfg.sync_bn`` ('torch' or 'mmcv') when it wraps
a distributed model. ``MMSyncRunner`` adds 'mmsync', selected from a config
with::

    runner_type = 'MMSyncRunner'
    sync_bn = 'mmsync'  # or dict(type='mmsync', stats_mode='N')
"""
from typing import Dict, Optional, Union

import torch.nn as nn
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

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


@RUNNERS.register_module()
class MMSyncRunner(Runner):
    """mmengine's ``Runner`` whose ``cfg.sync_bn`` also accepts 'mmsync'.

    In a distributed run, ``sync_bn='mmsync'`` (or ``dict(type='mmsync',
    stats_mode='N')``) converts every BatchNorm of the model to MMSyncBN
    with ``convert_sync_batchnorm`` before the model is wrapped, as
    ``sync_bn='torch'`` does with torch's SyncBatchNorm. Without
    distribution the model is left as it is (MMSyncBN runs in a world of
    one). Every other value of ``sync_bn`` behaves as in ``Runner``.
    """

    def wrap_model(self, model_wrapper_cfg: Optional[Dict],
                   model: nn.Module) -> nn.Module:
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
