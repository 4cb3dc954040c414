"""Forwards that activation checkpointing recomputes, recognized and paired
with the forward they repeat.

``torch.utils.checkpoint`` (both ``use_reentrant`` modes, nested too),
mmcv/mmpretrain/mmdet ``with_cp`` blocks and mmengine's
``activation_checkpointing`` run a layer's forward twice in one step: in the
forward pass, and again while autograd runs the backward. Run as a new
forward, the second one would count the batch again (running statistics
and ``num_batches_tracked`` updated twice) and run one more collective.

The rule (no checkpoint internals, which differ between modes and torch
versions): a training forward of a layer is a **recompute** when autograd
is executing a backward on this thread and the layer holds a record of an
earlier forward with the same local sample count on the same device. A
record is kept of every training forward that can be recomputed: one under
``no_grad`` (the reentrant mode's first run) or under saved-tensor hooks
(the non-reentrant mode's). It holds O(C) values: the local statistics row
and the global mean, invstd and gradient scale. Among several records the
recompute takes the one whose local statistics are nearest its own (equal
for a deterministic recompute). Records a recompute used are dropped at the
layer's next forward that is not a recompute; at most ``MAX_RECORDS`` are
kept per layer (the oldest goes first), so forwards that are never
recomputed (``no_grad`` in train mode, an EMA or teacher model, an exception
before backward) cannot grow memory.

Limits: a forward run by other code during backward (a backward hook calling
the model) on a layer that holds a record is taken for a recompute; under
``torch.compile``, ONNX export and TorchScript tracing nothing is recorded
(every forward is a new one).
"""
import weakref
from typing import List, Optional

import torch

MAX_RECORDS = 4

_graph_task_id = getattr(torch._C, '_current_graph_task_id', None)
_top_saved_hooks = getattr(torch._C._autograd,
                           '_top_saved_tensors_default_hooks', None)


class StatsRecord:
    """What a recompute of one forward needs: its local statistics row (to
    tell records apart) and the global mean, invstd and gradient scale."""

    __slots__ = ('row', 'count', 'mean', 'invstd', 'scale', 'used')

    def __init__(self, row: torch.Tensor, count: int, mean: torch.Tensor,
                 invstd: torch.Tensor, scale: torch.Tensor):
        self.row = row
        self.count = count
        self.mean = mean
        self.invstd = invstd
        self.scale = scale
        self.used = False


# Held beside the layers, not in them: a deep copy, a pickle or a converted
# layer starts with none.
_records: 'weakref.WeakKeyDictionary[torch.nn.Module, List[StatsRecord]]' = (
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


def _may_be_recomputed() -> bool:
    if not torch.is_grad_enabled():
        return True
    return _top_saved_hooks is None or _top_saved_hooks(True) is not None


def find_record(module: torch.nn.Module, input: torch.Tensor):
    """Where a training forward of ``module`` on ``input`` stands.

    Returns:
        tuple: ``(candidates, keep)``: the records this forward may be the
        recompute of (None when it is a new forward), and the list to which
        a new forward appends its record (None when none is kept).
    """
    if tracing():
        return None, None
    count = input.numel() // input.size(1) if input.size(1) else 0
    records = _records.get(module)
    if records and in_backward():
        candidates = [
            r for r in records
            if r.count == count and r.mean.device == input.device
        ]
        if candidates:
            return candidates, None
    if records:
        records[:] = [r for r in records if not r.used]
    if not _may_be_recomputed():
        return None, None
    if records is None:
        records = _records.setdefault(module, [])
    return None, records


def records_of(module: torch.nn.Module) -> List[StatsRecord]:
    """The records ``module`` holds now (a copy of the list, oldest first)."""
    return list(_records.get(module, ()))


def keep_record(records: List[StatsRecord], record: StatsRecord) -> None:
    """Append ``record``, dropping the oldest beyond ``MAX_RECORDS``."""
    records.append(record)
    del records[:-MAX_RECORDS]


def pick_record(candidates: List[StatsRecord],
                row: Optional[torch.Tensor]) -> StatsRecord:
    """The record a recompute repeats: the only candidate, or the one whose
    local statistics row is nearest ``row`` (the recompute's own)."""
    if len(candidates) == 1:
        record = candidates[0]
    else:
        distance = torch.stack([(r.row - row).abs().sum() for r in candidates])
        record = candidates[int(distance.argmin())]
    record.used = True
    return record
