"""The communication of MMSyncBN: group gathers and sums, sub-groups, and
the opt-in consistency check (``MMSYNC_CHECK_SYNC``).

Every collective of the layer goes through :func:`gather_rows` (forward:
each rank's statistics row, merged afterwards in rank order by the finalize
op) or :func:`group_sum` (backward gradient sums).
"""
import itertools
import os

import torch
import torch.distributed as dist

STATS_MODES = ('default', 'N')

CHECK_ENV = 'MMSYNC_CHECK_SYNC'

# Groups up to this size sum the backward buffers by one all_gather and a
# local sum in rank order; larger ones by one all_reduce. For the few-KB
# buffers of a layer the gather is one exchange between 2 ranks where gloo's
# ring all_reduce takes a reduce-scatter and an all-gather step (measured at
# world 2: 0.18 vs 0.27 ms alone, 10-25% of a training step), while the
# gathered size grows with the group. MMSYNC_GATHER_MAX_RANKS overrides it.
GATHER_MAX_RANKS = int(os.environ.get('MMSYNC_GATHER_MAX_RANKS', '8'))

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
    in group rank order, identical on every rank: one all_gather.

    The forward statistics take this path at any group size: merging the
    ranks' (count, mean, M2) in rank order is exact where a sum of moments
    (E[x^2] - mean^2) cancels when mean >> std.
    """
    try:
        return _gather(tensor, group, group_size)
    except RuntimeError as e:
        raise _failed(what, group, e) from e


def group_sum(tensor: torch.Tensor, group, group_size: int,
              what: str) -> torch.Tensor:
    """The sum of ``tensor`` over the group, in one collective, identical
    on every rank: an all_gather and a sum in rank order up to
    ``GATHER_MAX_RANKS`` ranks, an all_reduce beyond."""
    try:
        if group_size <= GATHER_MAX_RANKS:
            return _gather(tensor, group, group_size).sum(0)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    except RuntimeError as e:
        raise _failed(what, group, e) from e


_CHECK_FIELDS = ('phase', 'layer', 'call', 'channels', 'dtype', 'stats_mode',
                 'valid')
_PHASES = ('forward', 'backward')
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_layer_ids = itertools.count()


class SyncCheck:
    """Opt-in check that every rank of a group makes the same call.

    Before each collective, the ranks exchange (phase, layer, call count,
    channels, dtype, stats_mode, whether the input is valid) in one fixed-size all_gather; when any field differs, or a rank's
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
        fields = [
            phase, self.layer, self.calls[phase], channels,
            _DTYPES.index(dtype) if dtype in _DTYPES else -1,
            STATS_MODES.index(stats_mode),
            int(valid)
        ]
        # On the input's device: NCCL gathers CUDA tensors only.
        mine = torch.tensor(fields, device=device)
        size = dist.get_world_size(group)
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
            raise RuntimeError(
                f'MMSyncBN consistency check ({CHECK_ENV}): the ranks of a '
                f'group of {size} disagree on {", ".join(differ)} before a '
                f'{_PHASES[phase]} collective: {rows}')


def _describe(field: str, value: int):
    if field == 'phase':
        return _PHASES[value]
    if field == 'dtype':
        return str(_DTYPES[value]) if value >= 0 else 'unsupported'
    if field == 'stats_mode':
        return repr(STATS_MODES[value])
    if field == 'valid':
        return bool(value)
    return value


def check_sync_enabled() -> bool:
    """Whether ``MMSYNC_CHECK_SYNC`` asks every layer to check its calls."""
    return os.environ.get(CHECK_ENV,
                          '0').lower() not in ('', '0', 'false', 'no', 'off')


_subgroups = {}


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
