"""Forwards that activation checkpointing recomputes, recognized and paired
with the forward they repeat.

``torch.utils.checkpoint`` (both ``use_reentrant`` modes, nested too),
mmcv/mmpretrain/mmdet ``with_cp`` blocks and mmengine's
``activation_checkpointing`` run a layer's forward twice in one step: in the
forward pass, and again while autograd runs the backward. Run as a new
forward, the second one would count the batch again (running statistics
and ``num_batches_tracked`` updated twice) and run one more collective.

A record (O(C): the local statistics row and the global mean, invstd and
gradient scale) is kept of every training forward that a checkpoint can
recompute, in a group per checkpointed segment, in call order: a forward
inside the forward of a custom autograd Function (the reentrant mode runs
its segment in ``CheckpointFunction.forward`` under ``no_grad``; the group
is that Function's node) or under saved-tensor hooks (the non-reentrant
mode's; the group is their unpack hook). A group lives as long as what it
is named after, that is as long as the autograd graph that can recompute
it: records go with their graph, and forwards nothing can recompute
(``no_grad`` outside a checkpoint: precise BN statistics, a teacher; plain
training) keep none.

A training forward of a layer is a **recompute** when autograd is
executing a backward on this thread and the layer holds a record with the
same local sample count on the same device. Which record (any number of
calls of the layer per segment, equal inputs too):

- a reentrant segment's recompute runs inside the backward of the node its
  group is named after: its records, in order;
- otherwise, the recomputes of one segment run inside one node's backward,
  in call order: after a record of a group comes that group's next record;
- a recompute that starts a segment takes the record whose local
  statistics are nearest its own (equal for a deterministic recompute);
  among equal ones, one not yet recomputed in this backward, then the first
  of a group, then the latest (autograd recomputes later segments first).

At most ``MAX_RECORDS`` records are kept per layer at a time: a forward
beyond that raises (on every rank alike, since every rank makes the same
calls) rather than dropping a record that a recompute would need.

Limits: a forward run by other code during backward (a backward hook
calling the model) on a layer that holds a record is taken for a recompute;
under ``torch.compile``, ONNX export and TorchScript tracing nothing is
recorded (every forward is a new one).
"""
import sys
import weakref
from typing import Callable, List, Optional

import torch

# Records a layer keeps at a time. One holds about 5C float64 values (its
# local statistics row of 3C+2, the global mean and invstd): 40 KiB at
# C=1024, so 40 MiB for a layer of 1024 channels at the bound.
MAX_RECORDS = 1024

_graph_task_id = getattr(torch._C, '_current_graph_task_id', None)
_current_node = getattr(torch._C, '_current_autograd_node', None)
_top_saved_hooks = getattr(torch._C._autograd,
                           '_top_saved_tensors_default_hooks', None)
_FunctionCtx = torch.autograd.function.BackwardCFunction


class StatsRecord:
    """What a recompute of one forward needs: its local statistics row (to
    tell segments apart) and the global mean, invstd and gradient scale."""

    __slots__ = ('row', 'count', 'mean', 'invstd', 'scale', 'used', 'task')

    def __init__(self, row: torch.Tensor, count: int, mean: torch.Tensor,
                 invstd: torch.Tensor, scale: torch.Tensor):
        self.row = row
        self.count = count
        self.mean = mean
        self.invstd = invstd
        self.scale = scale
        self.used = False
        self.task = None  # the backward that last recomputed it


class _Group:
    """The records of one layer in one checkpointed segment, in call
    order, alive while the segment's ``owner`` is."""

    __slots__ = ('owner', 'records')

    def __init__(self, owner):
        self.owner = weakref.ref(owner)
        self.records: List[StatsRecord] = []


class _Cursor:
    """Where the last recompute of a layer stands: its backward, node,
    group and record index."""

    __slots__ = ('task', 'node', 'group', 'index')

    def __init__(self, task, node, group: _Group, index: int):
        self.task, self.group, self.index = task, group, index
        # Weakly where it can be: a reentrant checkpoint's node names the
        # group, which must go with its graph.
        try:
            self.node = weakref.ref(node)
        except TypeError:
            self.node = lambda: node

    def at(self, task, node) -> bool:
        """Whether a recompute in ``task`` inside ``node`` continues it."""
        return node is not None and self.task == task and self.node() is node


# Held beside the layers, not in them: a deep copy, a pickle or a converted
# layer starts with none.
_groups: 'weakref.WeakKeyDictionary[torch.nn.Module, List[_Group]]' = (
    weakref.WeakKeyDictionary())
_cursors: 'weakref.WeakKeyDictionary[torch.nn.Module, _Cursor]' = (
    weakref.WeakKeyDictionary())


def tracing() -> bool:
    """Whether this forward is being compiled, traced or exported."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and compiler.is_compiling():
        return True
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def in_backward() -> bool:
    """Whether autograd is executing a backward on this thread."""
    return _graph_task_id is not None and _graph_task_id() != -1


def _function_ctx():
    """The node of the outermost custom autograd Function whose forward is
    running (a reentrant checkpoint's), found on the call stack: nested in
    it, an inner checkpoint runs under no_grad, so its node is dropped at
    once and only the outer one is recomputed by the backward."""
    found = None
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if (code.co_name == 'forward' and code.co_argcount
                and code.co_varnames[0] == 'ctx'):
            ctx = frame.f_locals.get('ctx')
            if isinstance(ctx, _FunctionCtx):
                found = ctx
        frame = frame.f_back
    return found


def _segment_owner():
    """What a forward now could be recomputed by, or None: the reentrant
    checkpoint's node, else the unpack hook of the saved-tensor hooks."""
    if not torch.is_grad_enabled():
        ctx = _function_ctx()
        if ctx is not None:
            return ctx
    hooks = _top_saved_hooks(True) if _top_saved_hooks else None
    return hooks[1] if hooks else None


def _live(module: torch.nn.Module) -> List[_Group]:
    groups = _groups.get(module)
    if groups:
        groups[:] = [g for g in groups if g.owner() is not None]
    return groups or []


class Recompute:
    """A recomputing forward of a layer: :meth:`pick` gives its record."""

    def __init__(self, module: torch.nn.Module, groups: List[_Group],
                 count: int, device: torch.device):
        self.module, self.groups = module, groups
        self.count, self.device = count, device

    def _fits(self, record: StatsRecord) -> bool:
        return (record.count == self.count
                and record.mean.device == self.device)

    def pick(self, local_row: Callable[[], torch.Tensor]) -> StatsRecord:
        """The record this forward repeats; ``local_row()`` computes its own
        statistics row when the records must be told apart."""
        task = _graph_task_id()
        node = _current_node() if _current_node is not None else None
        cursor = _cursors.get(self.module)
        same_run = cursor is not None and cursor.at(task, node)
        group = index = None
        owned = [g for g in self.groups if g.owner() is node]
        if owned:
            group = owned[0]
            index = (
                cursor.index + 1 if same_run and cursor.group is group else 0)
        elif same_run:
            group, index = cursor.group, cursor.index + 1
        if (group is None or index >= len(group.records)
                or not self._fits(group.records[index])):
            group, index = self._start(task, local_row)
        record = group.records[index]
        record.task, record.used = task, True
        _cursors[self.module] = _Cursor(task, node, group, index)
        return record

    def _start(self, task, local_row):
        """The group and index of the record whose segment this recompute
        starts: the nearest local statistics; among equal ones, a record
        not used in this backward, a group's first, the latest."""
        found = [(g, i) for g in self.groups for i, r in enumerate(g.records)
                 if self._fits(r)]
        if len(found) == 1:
            return found[0]
        row = local_row()
        distance = torch.stack([(g.records[i].row - row).abs().sum()
                                for g, i in found]).tolist()
        order = [(distance[k], g.records[i].task == task, i > 0, -k)
                 for k, (g, i) in enumerate(found)]
        return found[order.index(min(order))]


class Keep:
    """Where a new forward that a checkpoint may recompute puts its
    record."""

    def __init__(self, module: torch.nn.Module, owner):
        self.module, self.owner = module, owner

    def __call__(self, record: StatsRecord) -> None:
        groups = _groups.get(self.module)
        if groups is None:
            groups = _groups[self.module] = []
        if not groups or groups[-1].owner() is not self.owner:
            groups.append(_Group(self.owner))
        groups[-1].records.append(record)


def find_record(module: torch.nn.Module, input: torch.Tensor):
    """Where a training forward of ``module`` on ``input`` stands.

    Returns:
        tuple: ``(recompute, keep)``: a :class:`Recompute` when this forward
        repeats a recorded one (else None), and a :class:`Keep` that a new
        forward gives its record to (None when nothing can recompute it).

    Raises:
        RuntimeError: When the layer already holds ``MAX_RECORDS`` records.
    """
    if tracing():
        return None, None
    count = input.numel() // input.size(1) if input.size(1) else 0
    groups = _live(module)
    if groups and in_backward():
        if any(r.count == count and r.mean.device == input.device
               for g in groups for r in g.records):
            return Recompute(module, groups, count, input.device), None
    _cursors.pop(module, None)
    owner = _segment_owner()
    if owner is None:
        return None, None
    held = sum(len(g.records) for g in groups)
    if held >= MAX_RECORDS:
        raise RuntimeError(
            f'MMSyncBN: this layer holds {held} records of forwards that '
            'activation checkpointing may recompute (MAX_RECORDS='
            f'{MAX_RECORDS} in mmsync.ops.sync_bn_recompute): more calls of '
            'one layer inside checkpointed segments than it keeps, or '
            'autograd graphs kept alive (outputs or losses held across '
            'steps). Each record is O(C); raise MAX_RECORDS on every rank '
            'if the calls are meant')
    return None, Keep(module, owner)


def records_of(module: torch.nn.Module) -> List[StatsRecord]:
    """The live records ``module`` holds now, oldest first."""
    return [r for g in _live(module) for r in g.records]
