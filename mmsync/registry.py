"""Registries of mmsync; imports nothing of mmsync, so every part can use it.

``NORM_LAYERS`` is a child of mmengine's ``MODELS``: layers registered here
are found by ``MODELS.build(dict(type='mmsync.MMSyncBN'))`` too.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

NORM_LAYERS = Registry(
    'norm layer', parent=MMENGINE_MODELS, scope='mmsync', locations=[])
