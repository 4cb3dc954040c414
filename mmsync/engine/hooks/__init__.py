"""Hooks of mmsync's engine, registered in mmsync's and mmengine's HOOKS."""
from .precise_bn import PreciseBNHook, merge_moments, update_bn_stats

__all__ = ['PreciseBNHook', 'merge_moments', 'update_bn_stats']
