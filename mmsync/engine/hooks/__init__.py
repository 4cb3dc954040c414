"""Hooks of mmsync's engine, registered in mmsync's and mmengine's HOOKS."""
from .liveness import Liveness, LivenessHook
from .precise_bn import PreciseBNHook, merge_moments, update_bn_stats

__all__ = [
    'Liveness', 'LivenessHook', 'PreciseBNHook', 'merge_moments',
    'update_bn_stats'
]
