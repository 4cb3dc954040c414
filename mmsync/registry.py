"""Registries of mmsync; imports nothing of mmsync, so every part can use it.

Each is a child of mmengine's registry of the same kind under the scope
'mmsync', so ``type='mmsync.X'`` also resolves through mmengine's roots, and
``locations`` are imported on first use.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model',
    parent=MMENGINE_MODELS,
    scope='mmsync',
    locations=['mmsync.ops', 'mmsync.cnn', 'mmsync.models'])
DATASETS = Registry(
    'dataset',
    parent=MMENGINE_DATASETS,
    scope='mmsync',
    locations=['mmsync.datasets'])
METRICS = Registry(
    'metric',
    parent=MMENGINE_METRICS,
    scope='mmsync',
    locations=['mmsync.datasets'])
# Norm layers live in MODELS (as in mmcv 2.x), so both build_norm_layer and
# mmengine's MODELS.build(dict(type='mmsync.MMSyncBN')) find them.
NORM_LAYERS = MODELS
