"""mmsync: exact synchronized BatchNorm for OpenMMLab-style training."""
from . import cnn, engine
from .cnn import (build_norm_layer, convert_sync_batchnorm, is_norm,
                  revert_sync_batchnorm)
from .ops import SyncBatchNorm
from .registry import NORM_LAYERS
from .version import __version__

__all__ = [
    'NORM_LAYERS', 'SyncBatchNorm', '__version__', 'build_norm_layer', 'cnn',
    'convert_sync_batchnorm', 'engine', 'is_norm', 'revert_sync_batchnorm'
]
