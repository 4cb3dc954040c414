from .norm import (NORM_LAYER_NAMES, TORCH_NORM_LAYERS, build_norm_layer,
                   infer_abbr, is_norm, registered_norm_layers)

__all__ = [
    'NORM_LAYER_NAMES', 'TORCH_NORM_LAYERS', 'build_norm_layer', 'infer_abbr',
    'is_norm', 'registered_norm_layers'
]
