"""The state of the all_reduce path (groups beyond ``GATHER_MAX_RANKS``,
forced at world 2 by a limit of 0): the shift kept per call site of a step,
held without keeping a destroyed group alive; and the consistency check
comparing which collective each rank will run.

Numbers are checked against ``F.batch_norm`` in training mode over the
concatenated float64 batch.
"""
import gc
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from sync_bn_cases import CollectiveCounter

from mmsync.ops import SyncBatchNorm, sync_bn_comm

C = 4
SIZES = (3, 5)
OFFSETS = (0.0, 1e4)  # two pyramid levels far apart (in std of 1-3)
STEPS = 4


def _level(step, level):
    gen = torch.Generator().manual_seed(10 * step + level)
    x = torch.randn(sum(SIZES), C, 3, 2, generator=gen, dtype=torch.float64)
    x = x * (1 + level) + OFFSETS[level] + 0.1 * step
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, dy


def _mine(t, rank):
    first = sum(SIZES[:rank])
    return t[first:first + SIZES[rank]]


def _shared_world(rank, world_size):
    sync_bn_comm.GATHER_MAX_RANKS = 0
    layer = SyncBatchNorm(C, stats_mode='N').double()
    out = []
    for step in range(STEPS):
        layer.zero_grad()
        xs, ys, loss = [], [], 0
        with CollectiveCounter() as counter:
            for level in range(2):
                x, dy = _level(step, level)
                xs.append(_mine(x, rank).clone().requires_grad_())
                ys.append(layer(xs[-1]))
                loss = loss + (ys[-1] * _mine(dy, rank)).sum()
            forward = counter.take()
            loss.backward()
            backward = counter.take()
        out.append(
            dict(
                forward=forward,
                backward=backward,
                y=[y.detach() for y in ys],
                dx=[x.grad for x in xs],
                dw=layer.weight.grad.clone(),
                db=layer.bias.grad.clone(),
                rm=layer.running_mean.clone(),
                rv=layer.running_var.clone()))
    return out


def _shared_oracle():
    w = torch.ones(C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    rm = torch.zeros(C, dtype=torch.float64)
    rv = torch.ones(C, dtype=torch.float64)
    out = []
    for step in range(STEPS):
        w.grad = b.grad = None
        xs, ys, loss = [], [], 0
        for level in range(2):
            x, dy = _level(step, level)
            xs.append(x.clone().requires_grad_())
            ys.append(F.batch_norm(xs[-1], rm, rv, w, b, True, 0.1, 1e-5))
            loss = loss + (ys[-1] * dy).sum()
        loss.backward()
        out.append(
            dict(
                y=[y.detach() for y in ys],
                dx=[x.grad for x in xs],
                dw=w.grad.clone(),
                db=b.grad.clone(),
                rm=rm.clone(),
                rv=rv.clone()))
    return out


def test_shift_kept_per_call_site():
    """Review finding 9: a layer called twice per step on levels 1e4 apart
    refined its single shift on every call (two all_reduces per forward).
    With a shift per call site only the first step refines; every step
    equals F.batch_norm over the global batch (the grads of the weight and
    bias are the group's sum / 2)."""
    results = run_distributed(_shared_world, 2)
    want = _shared_oracle()
    for rank, steps in enumerate(results):
        for step, (got, ref) in enumerate(zip(steps, want)):
            where = f'rank {rank} step {step}'
            assert got["forward"] == (3 if step == 0 else 2), where
            assert got['backward'] == 2, where
            for level in range(2):
                torch.testing.assert_close(
                    got['y'][level],
                    _mine(ref['y'][level], rank),
                    rtol=1e-9,
                    atol=1e-9)
                torch.testing.assert_close(
                    got['dx'][level],
                    _mine(ref['dx'][level], rank),
                    rtol=1e-9,
                    atol=1e-9)
            torch.testing.assert_close(got['dw'] * 2, ref['dw'])
            torch.testing.assert_close(got['db'] * 2, ref['db'])
            torch.testing.assert_close(
                got['rm'], ref['rm'], rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(
                got['rv'], ref['rv'], rtol=1e-12, atol=1e-9)


def _group_world(rank, world_size):
    sync_bn_comm.GATHER_MAX_RANKS = 0
    group = dist.new_group([0, 1])
    layer = SyncBatchNorm(C, group=group).double()
    layer(torch.randn(3, C, dtype=torch.float64)).sum().backward()
    ref = weakref.ref(group)
    layer.group = None
    dist.destroy_process_group(group)
    del group
    gc.collect()
    return ref() is None


def test_shift_does_not_keep_a_destroyed_group():
    """Review item 4: the shift state held its process group strongly, so
    a group destroyed by the user stayed alive with the layer."""
    assert run_distributed(_group_world, 2) == [True, True]


def _limits_world(rank, world_size):
    # Rank 1 all_reduces where rank 0 gathers.
    sync_bn_comm.GATHER_MAX_RANKS = (8, 0)[rank]
    layer = SyncBatchNorm(C, check_sync=True)
    try:
        layer(torch.randn(3 + rank, C))
    except RuntimeError as e:
        return str(e)
    return None


def test_check_sync_compares_the_collective():
    """Review finding 8: ranks with different MMSYNC_GATHER_MAX_RANKS ran
    an all_gather against an all_reduce under check_sync and waited out
    the group's timeout; the check must raise the same error on both,
    naming the collective and the variable."""
    results = run_distributed(_limits_world, 2, timeout=60, pg_timeout=10)
    assert results[0] == results[1]
    assert results[0] is not None
    assert 'disagree on collective before a forward' in results[0]
    assert 'MMSYNC_GATHER_MAX_RANKS' in results[0]
    assert 'collective=all_gather' in results[0]
    assert 'collective=all_reduce' in results[0]
