"""Batches whose global statistics are not finite, at world 2 on both
collective paths (gathered rows, and the all_reduce of shifted moments
that groups beyond ``GATHER_MAX_RANKS`` use, forced here by setting the
limit to 0).

The oracle is ``F.batch_norm`` in training mode over the concatenated
float64 batch, with the running statistics updated only by the batches
whose statistics are finite: a non-finite batch leaves running_mean,
running_var, num_batches_tracked and the all_reduce path's shift as they
were on every rank, while its output is BatchNorm's (NaN in the channels
whose statistics are not finite).
"""
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from mmsync.ops import SyncBatchNorm, sync_bn_comm

C = 3
SIZES = (3, 5)  # rank 0 holds 3 samples, rank 1 holds 5


def _batch(step, offsets=(0.0, 0.0, 0.0)):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(sum(SIZES), C, 2, 3, generator=gen, dtype=torch.float64)
    x = x * 2 + torch.tensor(offsets, dtype=torch.float64).view(1, C, 1, 1)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, dy


def _mine(t, rank):
    first = sum(SIZES[:rank])
    return t[first:first + SIZES[rank]]


# Per step: the channel offsets, and where a non-finite value goes
# (rank, sample, channel, value) or None. Step 0 puts channel 1 far from
# the zero shift (the all_reduce path refines it) while channel 0 holds a
# NaN on rank 0: the refined shift must keep channel 0's old value.
STEPS = [
    ((0.0, 1000.0, 0.0), (0, 1, 0, float('nan'))),
    ((0.0, 1000.0, 0.0), None),
    ((0.0, 1000.0, 0.0), (1, 4, 2, float('inf'))),
    ((0.0, 1000.0, 0.0), (0, 0, 1, float('-inf'))),
    ((0.0, 1000.0, 0.0), None),
]


def _inputs(step):
    offsets, bad = STEPS[step]
    x, dy = _batch(step, offsets)
    if bad is not None:
        rank, sample, channel, value = bad
        x[sum(SIZES[:rank]) + sample, channel, 0, 1] = value
    return x, dy


def _nonfinite_world(rank, world_size, gather_max_ranks, momentum):
    sync_bn_comm.GATHER_MAX_RANKS = gather_max_ranks
    layer = SyncBatchNorm(C, momentum=momentum, stats_mode='N').double()
    out = []
    for step in range(len(STEPS)):
        x, dy = _inputs(step)
        mine = _mine(x, rank).clone().requires_grad_()
        y = layer(mine)
        y.backward(_mine(dy, rank))
        out.append(
            dict(
                y=y.detach(),
                dx=mine.grad,
                rm=layer.running_mean.clone(),
                rv=layer.running_var.clone(),
                nbt=int(layer.num_batches_tracked),
                skipped=int(getattr(layer, 'nonfinite_batches', -1))))
    return out


def _oracle(momentum):
    """F.batch_norm over each global batch; the running statistics move
    only on batches whose statistics are finite."""
    rm = torch.zeros(C, dtype=torch.float64)
    rv = torch.ones(C, dtype=torch.float64)
    counted = skipped = 0
    out = []
    for step in range(len(STEPS)):
        x, dy = _inputs(step)
        x = x.clone().requires_grad_()
        finite = bool(torch.isfinite(x).all())
        if finite:
            counted += 1
            factor = momentum if momentum is not None else 1.0 / counted
            y = F.batch_norm(x, rm, rv, None, None, True, factor, 1e-5)
        else:
            skipped += 1
            y = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
        y.backward(dy)
        out.append(
            dict(
                y=y.detach(),
                dx=x.grad,
                rm=rm.clone(),
                rv=rv.clone(),
                nbt=counted,
                skipped=skipped))
    return out


def _assert_same(got, want, where):
    # NaN where BatchNorm gives NaN, BatchNorm's values elsewhere.
    assert torch.equal(got.isnan(), want.isnan()), where
    torch.testing.assert_close(
        got, want, rtol=1e-9, atol=1e-9, equal_nan=True, msg=where)


def test_nan_on_a_refining_step_keeps_the_shift():
    """Review finding 1: on the all_reduce path, a NaN in channel 0 on the
    step whose channel 1 refines the shift left channel 0's shift NaN, and
    every later output of channel 0 NaN; the steps after the bad one must
    be exact."""
    results = run_distributed(_nonfinite_world, 2, 0, 0.1)
    want = _oracle(0.1)
    for rank, steps in enumerate(results):
        for step in (1, 4):
            where = f'rank {rank} step {step}'
            _assert_same(steps[step]['y'], _mine(want[step]['y'], rank), where)
            _assert_same(steps[step]['dx'], _mine(want[step]['dx'], rank),
                         where)


@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('gather_max_ranks', [8, 0])
def test_nonfinite_batches_leave_the_state_as_it_was(gather_max_ranks,
                                                     momentum):
    """A NaN or an Inf on one rank: that step's output and grad_input are
    BatchNorm's (NaN in the channel it reaches, exact in the others), the
    running statistics and num_batches_tracked skip the batch on both
    ranks alike, the layer counts it in ``nonfinite_batches``, and the
    steps after it are exact (the shift was not poisoned)."""
    results = run_distributed(_nonfinite_world, 2, gather_max_ranks, momentum)
    want = _oracle(momentum)
    for rank, steps in enumerate(results):
        for step, (got, ref) in enumerate(zip(steps, want)):
            where = f'rank {rank} step {step}'
            _assert_same(got['y'], _mine(ref['y'], rank), where)
            _assert_same(got['dx'], _mine(ref['dx'], rank), where)
            torch.testing.assert_close(
                got['rm'], ref['rm'], rtol=1e-10, atol=1e-10, msg=where)
            torch.testing.assert_close(
                got['rv'], ref['rv'], rtol=1e-10, atol=1e-10, msg=where)
            assert got['nbt'] == ref['nbt'], where
            assert got['skipped'] == ref['skipped'], where
            assert torch.equal(got['rm'], results[0][step]['rm']), where
            assert torch.equal(got['rv'], results[0][step]['rv']), where


def test_nonfinite_world_one():
    """Without a process group: the same rule, no collective."""
    layer = SyncBatchNorm(C, stats_mode='N').double()
    bn = torch.nn.BatchNorm2d(C).double()
    x, _ = _batch(0)
    layer(x), bn(x)
    bad = x.clone()
    bad[0, 1, 0, 0] = float('nan')
    y = layer(bad)
    assert torch.equal(y.isnan(), bn(bad).isnan())
    assert int(layer.num_batches_tracked) == 1
    assert int(layer.nonfinite_batches) == 1
    layer(x)
    bn = torch.nn.BatchNorm2d(C).double()
    bn(x), bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == 2
    # Not part of the state_dict: checkpoints keep BatchNorm's keys.
    assert 'nonfinite_batches' not in layer.state_dict()


def test_nonfinite_under_torch_compile_fullgraph():
    """The rule is tensor ops only: torch.compile(fullgraph=True) traces
    it without a graph break and keeps the state as eager does."""
    from sync_bn_cases import no_compile_cache
    eager = SyncBatchNorm(C, momentum=None).double()
    layer = SyncBatchNorm(C, momentum=None).double()
    x, _ = _batch(0)
    bad = x.clone()
    bad[2, 0, 1, 1] = float('nan')
    with no_compile_cache():
        compiled = torch.compile(layer, fullgraph=True)
        for batch in (x, bad, x * 2):
            torch.testing.assert_close(
                compiled(batch), eager(batch), equal_nan=True)
    for name in ('running_mean', 'running_var', 'num_batches_tracked',
                 'nonfinite_batches'):
        assert torch.equal(getattr(layer, name), getattr(eager, name)), name
    assert int(layer.num_batches_tracked) == 2
    assert int(layer.nonfinite_batches) == 1
