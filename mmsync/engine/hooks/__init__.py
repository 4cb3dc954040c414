"""Hooks of mmsync's engine, registered in mmsync's and mmengine's HOOKS."""
from .nonfinite import NonFiniteBatchesHook
from .precise_bn import PreciseBNHook, merge_moments, update_bn_stats

__all__ = [
    'NonFiniteBatchesHook', 'PreciseBNHook', 'merge_moments', 'update_bn_stats'
]
