"""Registries of mmsync; imports nothing of mmsync, so every part can use it.

Each is a child of mmengine's registry of the same kind under the scope
'mmsync', so ``type='mmsync.X'`` also resolves through mmengine's roots, and
``locations`` are imported on first use. The children without modules of
their own let mmengine's Runner, whose default scope is 'mmsync', find every
kind of component without warnings.
"""
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOG_PROCESSORS as MMENGINE_LOG_PROCESSORS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import STRATEGIES as MMENGINE_STRATEGIES
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
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

RUNNERS = Registry(
    'runner',
    parent=MMENGINE_RUNNERS,
    scope='mmsync',
    locations=['mmsync.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, scope='mmsync')
STRATEGIES = Registry(
    'strategy',
    parent=MMENGINE_STRATEGIES,
    scope='mmsync',
    locations=['mmsync.engine'])
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='mmsync', locations=['mmsync.engine'])
LOG_PROCESSORS = Registry(
    'log processor', parent=MMENGINE_LOG_PROCESSORS, scope='mmsync')
DATA_SAMPLERS = Registry(
    'data sampler', parent=MMENGINE_DATA_SAMPLERS, scope='mmsync')
MODEL_WRAPPERS = Registry(
    'model wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope='mmsync')
OPTIMIZERS = Registry('optimizer', parent=MMENGINE_OPTIMIZERS, scope='mmsync')
OPTIM_WRAPPERS = Registry(
    'optim wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmsync')
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmsync')
PARAM_SCHEDULERS = Registry(
    'parameter scheduler', parent=MMENGINE_PARAM_SCHEDULERS, scope='mmsync')
VISUALIZERS = Registry(
    'visualizer', parent=MMENGINE_VISUALIZERS, scope='mmsync')
VISBACKENDS = Registry(
    'vis backend', parent=MMENGINE_VISBACKENDS, scope='mmsync')
