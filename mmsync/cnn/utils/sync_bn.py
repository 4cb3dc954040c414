"""Swap BatchNorm layers of a model for MMSyncBN and back.

Both directions share the parameters and buffers of the layers they replace
(no copy), so an optimizer built before the swap still updates the model,
and the state_dict keys do not change.

torch's BatchNorm classes become ``SyncBatchNorm`` itself. Any other
``_BatchNorm`` subclass (timm's ``BatchNormAct2d``, a model zoo's own BN with
an activation) keeps what it adds: it becomes an instance of a class derived
from both its own class and MMSyncBN, with its submodules and attributes,
whose batch normalization is MMSyncBN's; ``revert_sync_batchnorm`` gives the
original class back.
"""
import copy
import types
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.lazy import LazyModuleMixin

from ...ops import LazySyncBatchNorm, SyncBatchNorm
from ...ops.sync_bn import NONFINITE, check_act, check_stats_mode
from ...ops.sync_bn_comm import resolve_group_size


class BatchNormXd(_BatchNorm):
    """Single-process BatchNorm for inputs of any rank (N, C, *).

    What ``revert_sync_batchnorm`` turns synchronized layers into: it runs
    without a process group, like ``nn.BatchNorm2d`` but without a check of
    the input rank, and keeps MMSyncBN's fused ReLU so outputs do not change.

    Args:
        num_features (int): Number of channels C.
        eps (float): Added to the variance. Default: 1e-5.
        momentum (float, optional): Running-stat factor; ``None`` for a
            cumulative average. Default: 0.1.
        affine (bool): Learn a per-channel weight and bias. Default: True.
        track_running_stats (bool): Keep running mean and variance.
            Default: True.
        act (str, optional): ``'relu'`` applies a ReLU to the output.
            Default: None.
        device (torch.device, optional): Where the parameters and buffers
            are created. Default: None.
        dtype (torch.dtype, optional): Their dtype. Default: None.
    """

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 act: Optional[str] = None,
                 device=None,
                 dtype=None):
        check_act(act)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype)
        self.act = act

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError('BatchNormXd expects an input of shape (N, C, *) '
                             f'with at least 2 dimensions, got '
                             f'{input.dim()}D input of shape '
                             f'{tuple(input.shape)}')

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = super().forward(input)
        return F.relu(output) if self.act == 'relu' else output

    def extra_repr(self) -> str:
        return super().extra_repr() + (f', act={self.act!r}'
                                       if self.act else '')


class LazyBatchNormXd(_LazyNormBase, BatchNormXd):
    """``BatchNormXd`` whose ``num_features`` is read from the first input:
    what ``revert_sync_batchnorm`` makes of a lazy MMSyncBN not yet run.
    Takes ``BatchNormXd``'s arguments but ``num_features``."""

    cls_to_become = BatchNormXd

    def __init__(self,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 act: Optional[str] = None,
                 device=None,
                 dtype=None):
        check_act(act)
        super().__init__(eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.act = act


def _factory(module: nn.Module) -> dict:
    """The device and dtype of ``module``'s parameters or running buffers
    (initialized or not), for a layer replacing it."""
    for tensor in (module.weight, module.running_mean):
        if tensor is not None:
            return dict(device=tensor.device, dtype=tensor.dtype)
    return {}


def _counter_on(layer: SyncBatchNorm, source: nn.Module) -> SyncBatchNorm:
    """Give ``layer`` its skipped-batch counter on ``source``'s device."""
    device = _factory(source).get('device')
    layer.register_buffer(
        NONFINITE,
        torch.zeros((), dtype=torch.long, device=device),
        persistent=False)
    return layer


def _options(module: _BatchNorm) -> tuple:
    """(eps, momentum, affine, track_running_stats): what every BatchNorm
    constructor takes after num_features, to build a replacement."""
    return (module.eps, module.momentum, module.affine,
            module.track_running_stats)


def _share_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Give ``target`` the parameters, buffers and mode of ``source``."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.training = source.training
    if hasattr(source, 'qconfig'):
        target.qconfig = source.qconfig
    return target


# nn.Module's hook dicts (those this torch has), moved as they are so that
# the handles a user holds still remove them.
HOOK_DICTS = tuple(
    name for name in vars(nn.Module())
    if name.endswith('_hooks') or '_hooks_' in name)
# What a lazy module registers on itself (a lazy target has its own).
_LAZY_HOOKS = (LazyModuleMixin._infer_parameters,
               LazyModuleMixin._lazy_load_hook)


def _is_lazy_hook(hook) -> bool:
    return getattr(hook, '__func__', None) in _LAZY_HOOKS


def _move_hooks(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` the hooks of ``source`` (which it replaces): the same
    dicts, with methods bound to ``source`` bound to ``target`` instead, and
    whether its backward hooks are full ones. Where either is lazy (its own
    hooks infer its shape) ``target`` gets its own dicts with ``source``'s
    other hooks added, and ``source`` keeps its dicts whole."""
    for name in HOOK_DICTS:
        hooks = getattr(source, name, None)
        if not isinstance(hooks, dict):
            continue
        own = target.__dict__.get(name)
        if own or any(_is_lazy_hook(h) for h in hooks.values()):
            own = own if own is not None else type(hooks)()
            for key, hook in hooks.items():
                if _is_lazy_hook(hook):
                    continue
                if getattr(hook, '__self__', None) is source:
                    hook = types.MethodType(hook.__func__, target)
                own[key] = hook
            target.__dict__[name] = own
            continue
        for key, hook in list(hooks.items()):
            if getattr(hook, '__self__', None) is source:
                hooks[key] = types.MethodType(hook.__func__, target)
        target.__dict__[name] = hooks
    # register_full_backward_hook sets it True, register_backward_hook
    # False; None (a new layer's) runs neither kind.
    if getattr(source, '_is_full_backward_hook', None) is not None:
        target._is_full_backward_hook = source._is_full_backward_hook
    return target


def _rebuild(cls: type, source: nn.Module, drop: Tuple[str, ...] = (),
             **extra) -> nn.Module:
    """An instance of ``cls`` holding ``source``'s state, without __init__.

    Parameters, buffers and submodules are shared (their dicts are copied,
    not their tensors; hook dicts are shared, see ``_move_hooks``);
    ``drop`` names attributes left out, ``extra`` adds attributes.
    """
    target = cls.__new__(cls)
    state = {
        key:
        copy.copy(value)
        if isinstance(value, (dict, set)) and key not in HOOK_DICTS else value
        for key, value in vars(source).items() if key not in drop
    }
    state.update(extra)
    target.__dict__.update(state)
    return target


# Classes whose own forward is exactly "batch norm, then these submodules in
# order" (matched by the end of the qualified name, across timm versions).
KNOWN_TAILS: Dict[str, Tuple[str, ...]] = {
    'norm_act.BatchNormAct2d': ('drop', 'act'),
    'norm_act.SyncBatchNormAct': ('drop', 'act'),
}
PLAIN_SOURCES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LAZY_SOURCES = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def _known_tail(cls: type) -> Optional[Tuple[str, ...]]:
    for klass in cls.__mro__:
        name = f'{klass.__module__}.{klass.__qualname__}'
        for suffix, tail in KNOWN_TAILS.items():
            if name.endswith(suffix):
                return tail
    return None


def _is_plain(module: _BatchNorm) -> bool:
    """Whether MMSyncBN itself computes what ``module`` does."""
    cls = type(module)
    if cls in PLAIN_SOURCES + (nn.SyncBatchNorm, BatchNormXd):
        return True
    return (cls.forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
            and not any(True for _ in module.children()))


class _SyncProbe(SyncBatchNorm):
    """Notes that the synchronized forward ran, for a subclass's own
    forward that is expected to reach it through ``super().forward``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.__dict__['_mmsync_reached'] = True
        return super().forward(input)


def _tail_forward(tail: Tuple[str, ...]):

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = SyncBatchNorm.forward(self, input)
        for name in tail:
            output = self._modules[name](output)
        return output

    return forward


def _checked_forward(self, input: torch.Tensor) -> torch.Tensor:
    self.__dict__['_mmsync_reached'] = False
    output = self._mmsync_source_cls.forward(self, input)
    needs_sync = self.training or self.running_mean is None
    if needs_sync and not self.__dict__['_mmsync_reached']:
        cls = self._mmsync_source_cls
        raise RuntimeError(
            f'convert_sync_batchnorm: {cls.__module__}.{cls.__qualname__}.'
            'forward does not call super().forward(), so its batch norm '
            'cannot be synchronized; build the model with '
            "norm_cfg=dict(type='MMSyncBN') instead, or add the class to "
            'mmsync.cnn.utils.sync_bn.KNOWN_TAILS if its forward is batch '
            'norm followed by submodules')
    return output


_sync_classes: Dict[type, type] = {}


def _restore(make_class, cls: type, state: dict) -> nn.Module:
    """Unpickle an instance of a class made by ``sync_class_of`` or
    ``local_class_of``: such a class is found through the class it was made
    from, not by its name."""
    module = make_class(cls).__new__(make_class(cls))
    module.__dict__.update(state)
    return module


def _reduce_sync(self):
    return _restore, (sync_class_of, self._mmsync_source_cls, self.__dict__)


def _reduce_local(self):
    return _restore, (local_class_of, self._mmsync_local_of, self.__dict__)


def sync_class_of(cls: type) -> type:
    """The class derived from ``cls`` and MMSyncBN that conversion gives.

    Its batch normalization is MMSyncBN's; everything else is ``cls``'s:
    a known tail (timm's BatchNorm + drop + activation) runs after the
    synchronized batch norm, any other ``forward`` of ``cls`` runs as it is
    and must reach the batch norm through ``super().forward`` (checked at
    every training step: an error, never an unsynchronized result).
    """
    if cls not in _sync_classes:
        tail = _known_tail(cls)
        body = dict(
            __module__=__name__,
            __doc__=f'{cls.__qualname__} whose batch norm is MMSyncBN\'s.',
            _mmsync_source_cls=cls,
            forward=_tail_forward(tail) if tail else _checked_forward,
            __reduce__=_reduce_sync)
        _sync_classes[cls] = type(f'MMSync{cls.__name__}', (cls, _SyncProbe),
                                  body)
    return _sync_classes[cls]


# What SyncBatchNorm.__init__ sets besides _BatchNorm's state, and what a
# converted instance carries for conversion itself.
LAYER_ATTRS = ('group', 'stats_mode', 'subgroup_size', 'check_sync',
               '_sync_check')
SYNC_ATTRS = LAYER_ATTRS + ('_mmsync_reached', '_mmsync_added')


def _to_sync(module: _BatchNorm, group, stats_mode: str,
             group_size: Optional[int]) -> SyncBatchNorm:
    """MMSyncBN computing what ``module`` computes, sharing its state."""
    if (group is None and group_size is None
            and isinstance(module, nn.SyncBatchNorm)):
        group = module.process_group  # torch's layer keeps its group
    if isinstance(module, LazyModuleMixin):
        if module.has_uninitialized_params():
            return _lazy_to_sync(module, group, stats_mode, group_size)
        raise TypeError(f'convert_sync_batchnorm: {type(module).__name__} '
                        'holds initialized parameters but is still lazy; '
                        'run a forward or convert it before its first one')
    if _is_plain(module):
        # Only our own BatchNormXd's act is known to mean a fused ReLU.
        act = module.act if isinstance(module, BatchNormXd) else None
        layer = _share_state(
            module,
            SyncBatchNorm(
                module.num_features,
                *_options(module),
                group=group,
                stats_mode=stats_mode,
                act=act,
                group_size=group_size))
        if type(module) in PLAIN_SOURCES:
            layer._mmsync_source_cls = type(module)
        return _counter_on(layer, module)
    # Built like SyncBatchNorm.__init__ would, for the attributes the
    # subclass does not have already (an 'act' submodule stays a module).
    template = SyncBatchNorm(
        module.num_features,
        group=group,
        stats_mode=stats_mode,
        group_size=group_size)
    added = tuple(
        name for name in ('act', ) + LAYER_ATTRS if not hasattr(module, name))
    return _counter_on(
        _rebuild(
            sync_class_of(type(module)),
            module,
            _mmsync_added=added,
            **{name: getattr(template, name)
               for name in added}), module)


def _lazy_to_sync(module: _BatchNorm, group, stats_mode: str,
                  group_size: Optional[int]) -> LazySyncBatchNorm:
    """A lazy BatchNorm not yet run: a lazy MMSyncBN, whose channels come
    from its first input as the source's would have (nothing to share)."""
    if not _is_plain(module):
        raise TypeError(f'convert_sync_batchnorm: cannot convert '
                        f'{type(module).__qualname__}, a lazy BatchNorm with '
                        'its own forward or submodules, before its first '
                        'forward')
    layer = LazySyncBatchNorm(
        *_options(module),
        group=group,
        stats_mode=stats_mode,
        group_size=group_size,
        **_factory(module))
    layer.training = module.training
    if type(module) in LAZY_SOURCES:
        layer._mmsync_source_cls = type(module)
    return layer


def convert_sync_batchnorm(
        module: nn.Module,
        group=None,
        stats_mode: str = 'N',
        group_size: Union[int, str, None] = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by MMSyncBN.

    BatchNorm1d/2d/3d, torch's ``SyncBatchNorm`` and ``BatchNormXd`` become
    ``mmsync.ops.SyncBatchNorm``; any other ``_BatchNorm`` subclass (e.g.
    timm's ``BatchNormAct2d``) becomes a class derived from both it and
    MMSyncBN that keeps its submodules and attributes (see
    ``sync_class_of``). Parameters and buffers are shared, ``requires_grad``
    and the train/eval mode follow. MMSyncBN layers already there are left
    as they are; ones that ``revert_sync_batchnorm`` made local synchronize
    again.

    The default ``stats_mode='N'`` weighs every rank by its sample count:
    the exact statistics of the global batch, as the BatchNorm or
    ``torch.nn.SyncBatchNorm`` being replaced computes them (the layer's own
    default stays mmcv's 'default').

    Args:
        module (nn.Module): The model, changed in place; if it is itself a
            BatchNorm the new layer is returned instead.
        group (ProcessGroup, optional): Ranks the new layers synchronize;
            ``None`` for the default group. Default: None.
        stats_mode (str): 'default' or 'N', see ``SyncBatchNorm``.
            Default: 'N'.
        group_size (int | str, optional): Synchronize within groups of this
            many consecutive ranks instead of ``group``, or ``'node'`` for
            the processes of one node; see ``SyncBatchNorm``. Default: None.

    Returns:
        nn.Module: The converted module.
    """
    check_stats_mode(stats_mode)
    group_size = resolve_group_size(group_size)
    return _convert(module, group, stats_mode, group_size, {})


def _convert(module: nn.Module, group, stats_mode: str,
             group_size: Optional[int], done: Dict[int, nn.Module]):
    """``convert_sync_batchnorm`` of ``module``; ``done`` maps the modules
    already converted (by id) to their result, so that a layer held by
    two parents stays one layer."""
    if id(module) in done:
        return done[id(module)]
    module_output = module
    local_of = getattr(type(module), '_mmsync_local_of', None)
    if local_of is not None:
        module_output = _rebuild(local_of, module)
    elif (isinstance(module, _BatchNorm)
          and not isinstance(module, SyncBatchNorm)):
        module_output = _to_sync(module, group, stats_mode, group_size)
    if module_output is not module:
        _move_hooks(module, module_output)
    done[id(module)] = module_output
    for name, child in module.named_children():
        module_output.add_module(
            name, _convert(child, group, stats_mode, group_size, done))
    return module_output


def _local_sync_group(self) -> Tuple[None, int]:
    return None, 1


def _local_sync_size(self) -> int:
    return 1


_local_classes: Dict[type, type] = {}


def local_class_of(cls: type) -> type:
    """``cls`` (an MMSyncBN subclass) synchronizing with no other rank."""
    if cls not in _local_classes:
        _local_classes[cls] = type(
            cls.__name__, (cls, ),
            dict(
                __module__=__name__,
                __doc__=f'{cls.__qualname__} normalizing each rank alone.',
                _mmsync_local_of=cls,
                _sync_group=_local_sync_group,
                _sync_size=_local_sync_size,
                __reduce__=_reduce_local))
    return _local_classes[cls]


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace synchronized BatchNorms by ones that need no process group.

    - MMSyncBN and torch's SyncBatchNorm become ``BatchNormXd`` (keeping a
      fused ReLU), or the BatchNorm1d/2d/3d they were converted from;
    - a class made by ``convert_sync_batchnorm`` from another BatchNorm
      (timm's ``BatchNormAct2d``, ...) becomes that class again;
    - any other subclass of MMSyncBN stays an instance of its class (what it
      adds is kept) that normalizes each process alone.

    The new layers share the parameters, buffers and submodules of the old
    ones and keep their train/eval mode, so eval outputs and state_dict keys
    are unchanged.

    Args:
        module (nn.Module): The model, changed in place; if it is itself a
            synchronized BatchNorm the new layer is returned instead.

    Returns:
        nn.Module: The reverted module.
    """
    return _revert(module, {})


def _lazy_local(module: LazySyncBatchNorm) -> nn.Module:
    """A lazy MMSyncBN not yet run as the lazy BatchNorm it was converted
    from, else a lazy ``BatchNormXd``: local at its first forward too."""
    cls = getattr(module, '_mmsync_source_cls', None) or LazyBatchNormXd
    layer = cls(*_options(module), **_factory(module))
    if cls is LazyBatchNormXd:
        layer.act = module.act
    layer.training = module.training
    return layer


def _revert(module: nn.Module, done: Dict[int, nn.Module]) -> nn.Module:
    """``revert_sync_batchnorm`` of ``module``; ``done`` as in
    ``_convert``."""
    if id(module) in done:
        return done[id(module)]
    module_output = module
    cls = type(module)
    source = getattr(cls, '_mmsync_source_cls', None)
    if (isinstance(module, LazySyncBatchNorm)
            and module.has_uninitialized_params()):
        module_output = _lazy_local(module)
    elif source is not None and cls in _sync_classes.values():
        module_output = _rebuild(
            source, module, drop=SYNC_ATTRS + module._mmsync_added)
        module_output._buffers.pop(NONFINITE, None)
        module_output._non_persistent_buffers_set.discard(NONFINITE)
    elif type(module) is SyncBatchNorm or (isinstance(module, nn.SyncBatchNorm)
                                           and _is_plain(module)):
        plain = getattr(module, '_mmsync_source_cls', None)
        if plain is not None:
            new = plain(module.num_features, *_options(module))
        else:
            new = BatchNormXd(
                module.num_features,
                *_options(module),
                act=getattr(module, 'act', None))
        module_output = _share_state(module, new)
    elif (isinstance(module, SyncBatchNorm)
          and getattr(cls, '_mmsync_local_of', None) is None):
        module_output = _rebuild(local_class_of(cls), module)
    if module_output is not module:
        _move_hooks(module, module_output)
    done[id(module)] = module_output
    for name, child in module.named_children():
        module_output.add_module(name, _revert(child, done))
    return module_output
