"""mmsync: exact synchronized BatchNorm for OpenMMLab-style training."""
from .ops import SyncBatchNorm
from .registry import NORM_LAYERS
from .version import __version__

__all__ = ['NORM_LAYERS', 'SyncBatchNorm', '__version__']
