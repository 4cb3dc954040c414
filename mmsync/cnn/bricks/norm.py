"""Norm layers by config: torch's norms in NORM_LAYERS and their builder.

``build_norm_layer`` keeps mmcv's contract (name from the abbreviation plus a
postfix, ``requires_grad`` applied to every parameter, ``eps`` defaulting to
1e-5, GroupNorm built from ``num_channels``, the exception types mmcv's own
tests expect) and resolves ``type`` in mmsync's ``NORM_LAYERS`` first.

mmsync's layer is also registered as ``'MMSyncBN'`` in mmengine's root
``MODELS``, where mmcv's builders and every downstream registry (mmpretrain,
mmdet, mmseg: children of the root) look a bare name up. mmsync is the
drop-in for mmcv's layer of that name: where mmcv's full build (with
``mmcv.ops``) is installed, its ``sync_bn`` module is imported first (it
registers the name without ``force``, so importing it after mmsync would
fail), then mmsync takes the name over and says so once.
"""
import glob
import importlib
import importlib.util
import inspect
import logging
import os.path as osp
from typing import Dict, List, Tuple, Type, Union

import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.utils.dl_utils.parrots_wrapper import \
    SyncBatchNorm as MMEngineSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ...ops import SyncBatchNorm
from ...registry import NORM_LAYERS

# torch's norm layers under mmcv's names, the very classes mmcv registers
# ('SyncBN' is mmengine's thin subclass of torch's); 'MMSyncBN' is
# registered by mmsync.ops next to its class.
TORCH_NORM_LAYERS: Dict[str, Type[nn.Module]] = {
    'BN': nn.BatchNorm2d,
    'BN1d': nn.BatchNorm1d,
    'BN2d': nn.BatchNorm2d,
    'BN3d': nn.BatchNorm3d,
    'SyncBN': MMEngineSyncBatchNorm,
    'GN': nn.GroupNorm,
    'LN': nn.LayerNorm,
    'IN': nn.InstanceNorm2d,
    'IN1d': nn.InstanceNorm1d,
    'IN2d': nn.InstanceNorm2d,
    'IN3d': nn.InstanceNorm3d,
}
for _name, _cls in TORCH_NORM_LAYERS.items():
    NORM_LAYERS.register_module(name=_name, module=_cls)

NORM_LAYER_NAMES: Tuple[str, ...] = tuple(TORCH_NORM_LAYERS) + ('MMSyncBN', )


def _import_mmcv_sync_bn() -> None:
    """Import mmcv's own MMSyncBN where mmcv's full build is installed."""
    spec = importlib.util.find_spec('mmcv')
    folders = (spec.submodule_search_locations or []) if spec else []
    # mmcv-lite ships mmcv/ops/*.py too, but not the compiled mmcv._ext
    # they import.
    if not any(
            glob.glob(osp.join(d, '_ext.*'))
            and osp.isfile(osp.join(d, 'ops', 'sync_bn.py')) for d in folders):
        return
    try:
        importlib.import_module('mmcv.ops.sync_bn')
    except Exception as e:  # a broken mmcv.ops must not break mmsync
        _say(f'mmsync: mmcv.ops.sync_bn is installed but cannot be imported '
             f'({type(e).__name__}: {e}); mmsync registers MMSyncBN anyway')


def _say(message: str) -> None:
    """A warning at import time: through mmengine's current logger where one
    exists, else printed on stdout.

    Not a new mmengine logger: its device lookup fails at import where torch
    sees a GPU and CUDA_VISIBLE_DEVICES lists fewer devices than LOCAL_RANK
    (one GPU per task under Slurm). Not stderr: there mmsync's tools keep
    one line per failing process.
    """
    if getattr(MMLogger, '_instance_dict', None):
        print_log(message, logger='current', level=logging.WARNING)
    else:
        print(message, flush=True)


def register_root_name(name: str = 'MMSyncBN',
                       module: type = SyncBatchNorm) -> None:
    """Register ``module`` as ``name`` in mmengine's root ``MODELS``.

    A bare ``type=name`` in any OpenMMLab config then resolves to it under
    every default scope. Another class already there under that name (mmcv's
    full build registers its own 'MMSyncBN') is replaced, with one warning.

    Args:
        name (str): The registered name. Default: 'MMSyncBN'.
        module (type): The class. Default: mmsync's ``SyncBatchNorm``.
    """
    current = ROOT_MODELS.module_dict.get(name)
    if current is module:
        return
    if current is not None:
        _say(f'mmsync: {name!r} in mmengine\'s root MODELS registry was '
             f'{current.__module__}.{current.__qualname__}; it is now '
             f'{module.__module__}.{module.__qualname__} (mmsync is the '
             f'drop-in; use "mmsync.{name}" to be explicit)')
    ROOT_MODELS.register_module(name=name, module=module, force=True)


_import_mmcv_sync_bn()
register_root_name()

# _InstanceNorm no longer derives from _BatchNorm in torch 2, so both are
# listed; mmsync's SyncBatchNorm is a _BatchNorm, unlike mmcv's.
NORM_BASES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def registered_norm_layers() -> List[str]:
    """Names in ``NORM_LAYERS`` (and its ancestors) that build norm layers.

    Returns:
        list[str]: Sorted names, e.g. ``['BN', ..., 'MMSyncBN', ...]``.
    """
    names = set()
    registry = NORM_LAYERS
    while registry is not None:
        names.update(name for name, cls in registry.module_dict.items()
                     if inspect.isclass(cls) and issubclass(cls, NORM_BASES))
        registry = registry.parent
    return sorted(names)


def infer_abbr(class_type: type) -> str:
    """Infer the abbreviation that names a built norm layer.

    Rules, first match wins: an ``_abbr_`` class attribute; the base class
    (``_InstanceNorm`` -> 'in', ``_BatchNorm`` -> 'bn', ``GroupNorm`` ->
    'gn', ``LayerNorm`` -> 'ln'); 'batch', 'group', 'layer' or 'instance' in
    the lower-cased class name; else 'norm_layer'.

    Args:
        class_type (type): The norm layer class.

    Returns:
        str: The abbreviation, e.g. 'bn' for ``MMSyncBN``.
    """
    if not inspect.isclass(class_type):
        raise TypeError(f'class_type must be a class, got {class_type!r} of '
                        f'type {type(class_type).__name__}')
    if hasattr(class_type, '_abbr_'):
        return class_type._abbr_
    for base, abbr in ((_InstanceNorm, 'in'), (_BatchNorm, 'bn'),
                       (nn.GroupNorm, 'gn'), (nn.LayerNorm, 'ln')):
        if issubclass(class_type, base):
            return abbr
    class_name = class_type.__name__.lower()
    for word, abbr in (('batch', 'bn'), ('group', 'gn'), ('layer', 'ln'),
                       ('instance', 'in')):
        if word in class_name:
            return abbr
    return 'norm_layer'


class NormCfgError(TypeError, AssertionError):
    """A bad ``postfix``: a TypeError, and the AssertionError mmcv raises."""


class NormCfgKeyError(KeyError, AssertionError):
    """A missing GroupNorm key: a KeyError, and mmcv's AssertionError."""


def _get_norm_class(layer_type: Union[str, type]) -> type:
    """Resolve ``cfg['type']`` to a class, or raise a KeyError listing them."""
    if inspect.isclass(layer_type):
        return layer_type
    if not isinstance(layer_type, str):
        raise TypeError('norm cfg "type" must be a str or a class, got '
                        f'{layer_type!r} of type {type(layer_type).__name__}')
    norm_layer = NORM_LAYERS.get(layer_type)
    if norm_layer is None:
        # As mmcv: a layer registered in the default scope (e.g. mmdet's
        # registry while running mmdet) is found by its bare name too.
        with NORM_LAYERS.switch_scope_and_registry(None) as registry:
            norm_layer = registry.get(layer_type)
    if norm_layer is None:
        raise KeyError(
            f'Unknown norm layer type {layer_type!r}: it is not in '
            f'registry {NORM_LAYERS.name!r} (scope {NORM_LAYERS.scope!r}) '
            'nor in the default scope. Registered norm layers: '
            f'{", ".join(registered_norm_layers())}')
    return norm_layer


def build_norm_layer(cfg: Dict,
                     num_features: int,
                     postfix: Union[int, str] = '') -> Tuple[str, nn.Module]:
    """Build a normalization layer from a config dict.

    Example:
        >>> name, layer = build_norm_layer(dict(type='MMSyncBN'), 64, 1)
        >>> name
        'bn1'

    Args:
        cfg (dict): The layer config: ``type`` (a registered name such as
            'BN', 'GN', 'MMSyncBN', 'mmsync.MMSyncBN', or a class), optional
            ``requires_grad`` (bool, default True) applied to every
            parameter, and the layer's own arguments (``eps`` defaults to
            1e-5; 'GN' needs ``num_groups``). ``cfg`` is not modified.
        num_features (int): Channels C of the input (``num_channels`` for
            GroupNorm, ``normalized_shape`` for LayerNorm).
        postfix (int | str): Appended to the abbreviation to form the name.
            Default: ''.

    Returns:
        tuple[str, nn.Module]: The name (abbreviation + postfix, e.g. 'bn1',
        'gn', 'ln_test') and the layer.
    """
    if not isinstance(cfg, dict):
        raise TypeError(f'cfg must be a dict, got {cfg!r} of type '
                        f'{type(cfg).__name__}')
    if 'type' not in cfg:
        raise KeyError(f'the norm cfg must contain the key "type", got keys '
                       f'{sorted(cfg)}')
    if not isinstance(postfix, (int, str)) or isinstance(postfix, bool):
        raise NormCfgError(f'postfix must be an int or a str, got '
                           f'{postfix!r} of type {type(postfix).__name__}')
    cfg_ = dict(cfg)
    layer_type = cfg_.pop('type')
    norm_layer = _get_norm_class(layer_type)
    name = infer_abbr(norm_layer) + str(postfix)

    requires_grad = cfg_.pop('requires_grad', True)
    cfg_.setdefault('eps', 1e-5)
    if issubclass(norm_layer, nn.GroupNorm):
        if 'num_groups' not in cfg_:
            raise NormCfgKeyError(f'the cfg of {layer_type!r} (GroupNorm) '
                                  f'must contain "num_groups", got {cfg!r}')
        layer = norm_layer(num_channels=num_features, **cfg_)
    else:
        layer = norm_layer(num_features, **cfg_)

    for param in layer.parameters():
        param.requires_grad = requires_grad
    return name, layer


def is_norm(layer: nn.Module,
            exclude: Union[type, Tuple[type, ...], None] = None) -> bool:
    """Whether ``layer`` is a normalization layer (MMSyncBN included).

    Args:
        layer (nn.Module): The layer to check.
        exclude (type | tuple[type], optional): Types that do not count.
            Default: None.

    Returns:
        bool: True for BatchNorm (MMSyncBN and torch's SyncBatchNorm
        included), InstanceNorm, GroupNorm and LayerNorm, unless excluded.
    """
    if exclude is not None:
        if not isinstance(exclude, tuple):
            exclude = (exclude, )
        if not all(inspect.isclass(t) for t in exclude):
            raise TypeError('exclude must be None, a type or a tuple of '
                            f'types, got {exclude!r}')
        if isinstance(layer, exclude):
            return False
    return isinstance(layer, NORM_BASES)
