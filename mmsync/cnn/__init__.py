"""Norm-layer registry and builders, and BN <-> MMSyncBN conversion."""
from ..registry import NORM_LAYERS
from .bricks import (NORM_LAYER_NAMES, TORCH_NORM_LAYERS, build_norm_layer,
                     infer_abbr, is_norm, registered_norm_layers)
from .utils import BatchNormXd, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    'NORM_LAYERS', 'NORM_LAYER_NAMES', 'TORCH_NORM_LAYERS', 'BatchNormXd',
    'build_norm_layer', 'convert_sync_batchnorm', 'infer_abbr', 'is_norm',
    'registered_norm_layers', 'revert_sync_batchnorm'
]
