"""Hooks of mmsync's engine, registered in mmsync's and mmengine's HOOKS."""
from .liveness import Liveness, LivenessHook
from .nonfinite import NonFiniteBatchesHook
from .precise_bn import PreciseBNHook, merge_moments, update_bn_stats
from .world_size import WorldSizeHook, scale_lr_state

__all__ = [
    'Liveness', 'LivenessHook', 'NonFiniteBatchesHook', 'PreciseBNHook',
    'WorldSizeHook', 'merge_moments', 'scale_lr_state', 'update_bn_stats'
]
