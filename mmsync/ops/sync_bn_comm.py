"""The communication of MMSyncBN: group gathers and sums, sub-groups, and
the opt-in consistency check (``MMSYNC_CHECK_SYNC``).

Every collective of the layer goes through :func:`group_stats` (forward:
each rank's statistics row, gathered and merged in rank order by the
finalize op in groups up to ``GATHER_MAX_RANKS``, summed as shifted moments
by one all_reduce beyond) or :func:`group_sum` (backward gradient sums).
"""
import itertools
import os
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from .sync_bn_recompute import tracing

STATS_MODES = ('default', 'N')

CHECK_ENV = 'MMSYNC_CHECK_SYNC'

# Groups up to this size sum the backward buffers by one all_gather and a
# local sum in rank order; larger ones by one all_reduce. For the few-KB
# buffers of a layer the gather is one exchange between 2 ranks where gloo's
# ring all_reduce takes a reduce-scatter and an all-gather step (measured at
# world 2: 0.18 vs 0.27 ms alone, 10-25% of a training step), while the
# gathered size grows with the group. MMSYNC_GATHER_MAX_RANKS overrides it.
GATHER_ENV = 'MMSYNC_GATHER_MAX_RANKS'
GATHER_MAX_RANKS = int(os.environ.get(GATHER_ENV, '8'))

# torch 2.13 renamed all_gather_into_tensor to all_gather_single; looked up
# at each call, so that wrappers installed on torch.distributed see it.
_ALL_GATHER = ('all_gather_single' if hasattr(dist, 'all_gather_single') else
               'all_gather_into_tensor')


def _failed(what: str, group, error: RuntimeError) -> RuntimeError:
    """A failed collective (a rank died, the group timed out), re-raised
    naming what was being exchanged and what usually causes it, instead of
    a bare transport error."""
    return RuntimeError(
        f'MMSyncBN: the {what} collective over a group of '
        f'{dist.get_world_size(group)} ranks failed on rank '
        f'{dist.get_rank()}: another rank died, diverged (set '
        f'{CHECK_ENV}=1 to check every call) or did not reach it within '
        f"the process group's timeout. Cause: {error}")


def _gather(tensor: torch.Tensor, group, group_size: int) -> torch.Tensor:
    gathered = tensor.new_empty((group_size, tensor.numel()))
    getattr(dist, _ALL_GATHER)(gathered.view(-1), tensor, group=group)
    return gathered


def gather_rows(tensor: torch.Tensor, group, group_size: int,
                what: str) -> torch.Tensor:
    """Every rank's ``tensor`` as the rows of a (group_size, numel) tensor
    in group rank order, identical on every rank: one all_gather."""
    try:
        return _gather(tensor, group, group_size)
    except RuntimeError as e:
        raise _failed(what, group, e) from e


# An all_reduced sum of moments shifted by K loses about (W + 2) * q units
# of float64 rounding of the variance to cancellation, where q is the mean
# square of the W ranks' (mean - K) over the group's variance (<= 1 + the
# squared distance of K to the mean in standard deviations). Where q exceeds
# REFINE_RATIO (K about 8 standard deviations away), K is replaced by the
# mean just found and the sum made again; the same bytes on every rank
# decide it, so every rank does. At 64, 4096 ranks lose at most 3e-11 of
# the variance, and a shift from the previous step of a layer's training
# (q near 1 / the local batch) is never refused.
REFINE_RATIO = 64.0

# A layer called several times per step (a norm shared by the levels of a
# feature pyramid) keeps one shift per call of the step, up to this many;
# later calls share the last.
MAX_SITES = 16


class StatsShift:
    """The per-channel shifts K of one layer's all_reduced statistics: per
    call of a training step (a call site), the group's mean of that call
    in the previous step (float64, O(C)), identical on every rank because
    every rank computes it from the same reduced bytes.

    A step ends where a backward runs through the layer: the next forward
    is call 0 again. A site not seen yet starts from the shift of the call
    before it, the first one from 0, as every rank of a new group does.
    The group is held weakly: a destroyed group is not kept alive.
    """

    __slots__ = ('values', 'group', 'calls', 'stepped')

    def __init__(self):
        self.values = []
        self.group = None
        self.calls = 0
        self.stepped = False

    def site(self, group) -> int:
        """The call site of a new forward in ``group``: forgets the shifts
        of another (or a destroyed) group, and counts the calls of the step.
        """
        key = dist.group.WORLD if group is None else group
        if self.group is None or self.group() is not key:
            self.values, self.group = [], weakref.ref(key)
            self.calls, self.stepped = 0, False
        if self.stepped:
            self.calls, self.stepped = 0, False
        site = min(self.calls, MAX_SITES - 1)
        self.calls += 1
        return site

    def get(self, site: int) -> Optional[torch.Tensor]:
        """The shift of ``site``, or of the nearest call before it."""
        values = self.values[:site + 1]
        return next((v for v in reversed(values) if v is not None), None)

    def put(self, site: int, value: torch.Tensor) -> None:
        self.values.extend([None] * (site + 1 - len(self.values)))
        self.values[site] = value


# Held beside the layers, not in them (as the recompute records are): not
# a buffer that .half() would round or DDP broadcast, and a deep copy or a
# pickle starts from 0 like every rank of a new group.
_shifts: 'weakref.WeakKeyDictionary[torch.nn.Module, StatsShift]' = (
    weakref.WeakKeyDictionary())


def stats_shift(module: torch.nn.Module,
                group_size: int) -> Optional[StatsShift]:
    """The shift state of ``module``'s all_reduced statistics in a group of
    ``group_size``; None where the statistics are gathered, or where no
    state may be kept (:func:`_static`)."""
    if group_size <= GATHER_MAX_RANKS or _static():
        return None
    shift = _shifts.get(module)
    if shift is None:
        shift = _shifts[module] = StatsShift()
    return shift


def _static() -> bool:
    """Whether no host decision may depend on tensor values: under
    torch.compile, tracing or export (where no record is kept either) or a
    CUDA graph capture."""
    if tracing():
        return True
    return (torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing())


def _shifted_moments(row: torch.Tensor, shift: torch.Tensor,
                     channels: int) -> torch.Tensor:
    """One rank's statistics row (weight w, count n, its shift, mean and M2;
    sync_bn_common.h) as the terms of group sums around ``shift``:
    [w, n, w*d, w*var, w*d^2] with d the rank's mean minus ``shift`` and var
    its biased variance, 3C+2 float64 values."""
    C = channels
    w, n = row[0:1], row[1:2]
    d = (row[2:2 + C] - shift) + row[2 + C:2 + 2 * C]
    m2 = row[2 + 2 * C:]
    within = torch.where(n > 0, w * m2 / n.clamp(min=1), torch.zeros_like(m2))
    wd = w * d
    return torch.cat([w, n, wd, within, wd * d])


def _merged(total: torch.Tensor, shift: torch.Tensor, channels: int):
    """The group's statistics from summed shifted moments: a one-row
    (1, 3C+2) table for the finalize op (weight, count, shift, mean - shift,
    var * count), and which channels' shift was too far to trust."""
    C = channels
    weight = total[0:1]
    w = weight.clamp(min=1e-300)
    d = total[2:2 + C] / w
    within, spread = total[2 + C:2 + 2 * C] / w, total[2 + 2 * C:] / w
    var = within + (spread - d * d).clamp(min=0)
    far = spread > REFINE_RATIO * var
    row = torch.cat([total[0:2], shift, d, var * total[1:2]])
    return row.unsqueeze(0), far


def _all_reduce(tensor: torch.Tensor, group, what: str) -> torch.Tensor:
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as e:
        raise _failed(what, group, e) from e
    return tensor


def reduce_stats(row: torch.Tensor,
                 group,
                 state: Optional[StatsShift],
                 what: str,
                 site: int = 0) -> torch.Tensor:
    """The group's statistics from this rank's row, in one all_reduce of
    3C+2 float64 values (O(C) at any group size), exact at any offset.

    Each rank sums its moments around the same per-channel shift K (the
    group's mean of the previous forward, ``state``): the group's mean is K
    plus the mean of the ranks' (mean - K) and its variance the mean of
    their variances plus that of their (mean - K), with no cancellation
    while K lies within a few standard deviations of the mean. Where it
    does not (the first forward, a new group, data that moved) the sum is
    made once more around the mean just found: two all_reduces, then one
    again. Without a ``state`` (under torch.compile or CUDA graph capture,
    where no host decision may depend on the data) both sums always run.
    The shift is kept per call ``site`` of the step; a channel whose mean
    is not finite keeps the shift it had before this call.

    Returns:
        Tensor: the (1, 3C+2) row ``sync_bn_forward_finalize`` merges.
    """
    C = (row.numel() - 2) // 3
    shift = None
    if state is not None:
        shift = state.get(site)
    shift = row.new_zeros(C) if shift is None else shift.to(row.device)
    before = shift
    merged, far = _merged(
        _all_reduce(_shifted_moments(row, shift, C), group, what), shift, C)
    if state is None or bool(far.any()):
        # d is the mean's distance to the shift, accurate to a few units of
        # rounding at the offset's magnitude: a shift within a fraction of
        # a standard deviation of the mean.
        shift = shift + merged[0, 2 + C:2 + 2 * C]
        merged, _ = _merged(
            _all_reduce(_shifted_moments(row, shift, C), group, what), shift,
            C)
    if state is not None:
        mean = shift + merged[0, 2 + C:2 + 2 * C]
        # A non-finite batch (or an empty group) leaves the shift as it was
        # before this call, not as refined from the non-finite sum.
        keep = torch.isfinite(mean) & (merged[0, 0] > 0)
        state.put(site, torch.where(keep, mean, before))
    return merged


def group_stats(row: torch.Tensor,
                group,
                group_size: int,
                state: Optional[StatsShift],
                what: str,
                site: int = 0) -> torch.Tensor:
    """The forward statistics of a group for the finalize op, in one
    collective of O(C) values per rank: the ranks' rows gathered (merged in
    rank order: exact at any offset) in groups of up to
    ``GATHER_MAX_RANKS``, :func:`reduce_stats` beyond."""
    if group_size <= GATHER_MAX_RANKS:
        return gather_rows(row, group, group_size, what)
    return reduce_stats(row, group, state, what, site)


def group_sum(tensor: torch.Tensor, group, group_size: int,
              what: str) -> torch.Tensor:
    """The sum of ``tensor`` over the group, in one collective, identical
    on every rank: an all_gather and a sum in rank order up to
    ``GATHER_MAX_RANKS`` ranks, an all_reduce beyond."""
    if group_size <= GATHER_MAX_RANKS:
        return gather_rows(tensor, group, group_size, what).sum(0)
    return _all_reduce(tensor, group, what)


_CHECK_FIELDS = ('phase', 'layer', 'call', 'channels', 'dtype', 'stats_mode',
                 'collective', 'valid')
_COLLECTIVES = ('all_gather', 'all_reduce')
_PHASES = ('forward', 'backward')
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_layer_ids = itertools.count()


class SyncCheck:
    """Opt-in check that every rank of a group makes the same call.

    Before each collective, the ranks exchange (phase, layer, call count,
    channels, dtype, stats_mode, which collective the rank will run, whether
    the input is valid) in one fixed-size all_gather; when any field
    differs (``MMSYNC_GATHER_MAX_RANKS`` set apart), or a rank's
    input is invalid, every rank raises the same RuntimeError listing each
    rank's values (the rank with the invalid input raises its own error),
    instead of pairing mismatched collectives (which hangs or mixes up
    data) or leaving the healthy ranks waiting. A layer is named by the
    order of construction in its process, so the ranks must build their
    models the same way.
    """

    def __init__(self):
        self.layer = next(_layer_ids)
        self.calls = [0, 0]

    def __call__(self, group, phase: int, channels: int, dtype: torch.dtype,
                 stats_mode: str, device: torch.device) -> None:
        self._exchange(group, phase, channels, dtype, stats_mode, device, True)

    def bad_input(self, group, input: torch.Tensor, stats_mode: str,
                  error: Exception):
        """Report this rank's invalid forward ``input`` to the whole group,
        then raise ``error`` here (the others raise the check's error)."""
        channels = input.size(1) if input.dim() >= 2 else -1
        self._exchange(group, 0, channels, input.dtype, stats_mode,
                       input.device, False)
        raise error

    def _exchange(self, group, phase: int, channels: int, dtype: torch.dtype,
                  stats_mode: str, device: torch.device, valid: bool):
        self.calls[phase] += 1
        size = dist.get_world_size(group)
        fields = [
            phase, self.layer, self.calls[phase], channels,
            _DTYPES.index(dtype) if dtype in _DTYPES else -1,
            STATS_MODES.index(stats_mode),
            int(size > GATHER_MAX_RANKS),
            int(valid)
        ]
        # On the input's device: NCCL gathers CUDA tensors only.
        mine = torch.tensor(fields, device=device)
        try:
            table = _gather(mine, group, size).cpu()
        except RuntimeError as e:
            raise _failed(
                f'consistency check ({CHECK_ENV}) before a '
                f'{_PHASES[phase]}', group, e) from e
        rows = '; '.join(
            f'group rank {r}: ' +
            ', '.join(f'{name}={_describe(name, v)}'
                      for name, v in zip(_CHECK_FIELDS, row.tolist()))
            for r, row in enumerate(table))
        invalid = [r for r, ok in enumerate(table[:, -1].tolist()) if not ok]
        if invalid:
            if not valid:
                return  # the caller raises its own error
            raise RuntimeError(
                f'MMSyncBN consistency check ({CHECK_ENV}): group rank(s) '
                f'{invalid} of {size} got an invalid input before a forward '
                f'collective (their own error says why): {rows}')
        differ = [
            name for i, name in enumerate(_CHECK_FIELDS[:-1])
            if (table[:, i] != table[0, i]).any()
        ]
        if differ:
            hint = ''
            if 'collective' in differ:
                hint = (f' (set {GATHER_ENV} alike on every rank: it chooses '
                        'between them)')
            raise RuntimeError(
                f'MMSyncBN consistency check ({CHECK_ENV}): the ranks of a '
                f'group of {size} disagree on {", ".join(differ)} before a '
                f'{_PHASES[phase]} collective{hint}: {rows}')


def _describe(field: str, value: int):
    if field == 'phase':
        return _PHASES[value]
    if field == 'dtype':
        return str(_DTYPES[value]) if value >= 0 else 'unsupported'
    if field == 'stats_mode':
        return repr(STATS_MODES[value])
    if field == 'valid':
        return bool(value)
    if field == 'collective':
        return _COLLECTIVES[value]
    return value


def check_sync_enabled() -> bool:
    """Whether ``MMSYNC_CHECK_SYNC`` asks every layer to check its calls."""
    return os.environ.get(CHECK_ENV,
                          '0').lower() not in ('', '0', 'false', 'no', 'off')


_subgroups = {}
NODE = 'node'
# Processes per node as the launchers export it: torchrun, then Slurm.
LOCAL_SIZE_VARS = ('LOCAL_WORLD_SIZE', 'SLURM_NTASKS_PER_NODE')
_node_sizes = {}


def resolve_group_size(group_size):
    """``group_size`` as an int: ``'node'`` is the number of processes of
    this node (``LOCAL_WORLD_SIZE`` under torchrun, ``SLURM_NTASKS_PER_NODE``
    under Slurm), checked equal on every node once per default group (one
    small all_reduce); anything else is returned as it is.

    Raises:
        ValueError: The launcher exported no count, or the nodes differ.
    """
    if group_size != NODE:
        return group_size
    if not (dist.is_available() and dist.is_initialized()):
        return 1  # a world of one
    world = dist.group.WORLD
    cached = _node_sizes.get(NODE)
    if cached is not None and cached[0] is world:
        return cached[1]
    name = next((n for n in LOCAL_SIZE_VARS if os.environ.get(n)), None)
    if name is None or not os.environ[name].isdigit():
        raise ValueError("MMSyncBN group_size='node' needs the processes per "
                         f'node in {" or ".join(LOCAL_SIZE_VARS)} (torchrun '
                         'and srun export them)')
    size = int(os.environ[name])
    sizes = torch.tensor([size, -size], dtype=torch.long)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if sizes[0] != -sizes[1]:
        raise ValueError("MMSyncBN group_size='node' needs the same number "
                         f'of processes on every node; they range from '
                         f'{-int(sizes[1])} to {int(sizes[0])}')
    _node_sizes[NODE] = (world, size)
    return size


def sync_subgroup(group_size: int):
    """The process group of ``group_size`` consecutive ranks holding this
    rank, created once per default group and reused by every layer.

    Like Apex's ``create_syncbn_process_group``: the world is split into
    ``world_size / group_size`` groups of consecutive ranks. Every rank must
    make the first call (it creates all the groups collectively).
    """
    world_size = dist.get_world_size()
    if world_size % group_size:
        raise ValueError(f'MMSyncBN group_size={group_size} must divide the '
                         f'world size, which is {world_size}')
    world = dist.group.WORLD
    cached = _subgroups.get(group_size)
    if cached is None or cached[0] is not world:
        # A new default group (destroyed and initialized again) gets new
        # sub-groups.
        cached = (world, dist.new_subgroups(group_size)[0])
        _subgroups[group_size] = cached
    return cached[1]
