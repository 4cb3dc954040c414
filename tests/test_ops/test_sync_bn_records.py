"""Activation checkpointing with one MMSyncBN called several times per step
(a norm shared by the levels of a feature pyramid, as detection heads
share theirs), at world 2 on both collective paths and in both checkpoint
modes: every recomputed call must reuse the statistics of its own first
forward, however many calls a segment holds and whatever their inputs
(equal ones too).

The oracle is ``F.batch_norm`` in training mode over each level's
concatenated float64 batch, the levels applied in order to the same
running statistics: output and grad_input per slice, grad_weight and
grad_bias (the group's sum / 2 on each rank), running statistics and
num_batches_tracked.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from sync_bn_cases import CollectiveCounter
from torch.utils.checkpoint import checkpoint

from mmsync.ops import SyncBatchNorm, sync_bn_comm, sync_bn_recompute
from mmsync.ops.sync_bn_recompute import records_of

C = 3
STEPS = 2
# Per level, the samples of rank 0 and rank 1 (the review's sizes).
FPN = [(4, 5), (1, 1), (2, 2), (3, 3), (4, 4)]
PAIR = [(3, 2), (3, 4)]


def _levels(sizes, step, tie):
    """Per level the global batch and its dy; with ``tie`` every level's
    rank 0 slice equals level 0's (rank 1's differ)."""
    gen = torch.Generator().manual_seed(step)
    out = []
    for level, (n0, n1) in enumerate(sizes):
        x = torch.randn(n0 + n1, C, 3, 3, generator=gen, dtype=torch.float64)
        x = x * (1 + level) + level
        if tie:
            x[:n0] = out[0][0][:n0] if out else x[:n0]
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        out.append((x, dy))
    return out


def _slice(t, sizes, rank):
    return t[:sizes[0]] if rank == 0 else t[sizes[0]:]


def _run(layer, *xs):
    return tuple(layer(x) for x in xs)


def _forward(layer, xs, segments, reentrant):
    """The layer on every level: ``segments`` checkpointed segments of
    consecutive levels (0: none)."""
    if not segments:
        return _run(layer, *xs)
    per = -(-len(xs) // segments)
    ys = ()
    for first in range(0, len(xs), per):
        ys += checkpoint(
            _run, layer, *xs[first:first + per], use_reentrant=reentrant)
    return ys


def _records_world(rank, world_size, sizes, tie, segments, reentrant,
                   gather_max_ranks):
    sync_bn_comm.GATHER_MAX_RANKS = gather_max_ranks
    torch.manual_seed(0)
    layer = SyncBatchNorm(C, stats_mode='N').double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for step in range(STEPS):
            layer.zero_grad()
            levels = _levels(sizes, step, tie)
            xs = [
                _slice(x, s, rank).clone().requires_grad_()
                for (x, _), s in zip(levels, sizes)
            ]
            with CollectiveCounter() as counter:
                ys = _forward(layer, xs, segments, reentrant)
                loss = sum((y * _slice(dy, s, rank)).sum()
                           for y, (_, dy), s in zip(ys, levels, sizes))
                loss.backward()
            out.append(
                dict(
                    y=[y.detach() for y in ys],
                    dx=[x.grad for x in xs],
                    dw=layer.weight.grad.clone(),
                    db=layer.bias.grad.clone(),
                    rm=layer.running_mean.clone(),
                    rv=layer.running_var.clone(),
                    nbt=int(layer.num_batches_tracked),
                    collectives=counter.count))
            del ys, loss
    out.append(len(records_of(layer)))
    return out


def _oracle(sizes, tie):
    torch.manual_seed(0)
    layer = SyncBatchNorm(C).double()  # for its initial parameters only
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    rm = torch.zeros(C, dtype=torch.float64)
    rv = torch.ones(C, dtype=torch.float64)
    out = []
    for step in range(STEPS):
        w.grad = b.grad = None
        levels = _levels(sizes, step, tie)
        xs = [x.clone().requires_grad_() for x, _ in levels]
        ys = [F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) for x in xs]
        sum((y * dy).sum() for y, (_, dy) in zip(ys, levels)).backward()
        out.append(
            dict(
                y=[y.detach() for y in ys],
                dx=[x.grad for x in xs],
                dw=w.grad.clone(),
                db=b.grad.clone(),
                rm=rm.clone(),
                rv=rv.clone(),
                nbt=(step + 1) * len(sizes)))
    return out


def _check(results, sizes, tie):
    want = _oracle(sizes, tie)
    for rank, steps in enumerate(results):
        for step, (got, ref) in enumerate(zip(steps, want)):
            where = f'rank {rank} step {step}'
            assert got['nbt'] == ref['nbt'], where
            for level, s in enumerate(sizes):
                for key in ('y', 'dx'):
                    torch.testing.assert_close(
                        got[key][level],
                        _slice(ref[key][level], s, rank),
                        rtol=1e-9,
                        atol=1e-9,
                        msg=f'{where} level {level} {key}')
            for key in ('dw', 'db'):
                torch.testing.assert_close(
                    got[key] * 2,
                    ref[key],
                    rtol=1e-9,
                    atol=1e-9,
                    msg=f'{where} {key}')
            for key in ('rm', 'rv'):
                torch.testing.assert_close(
                    got[key],
                    ref[key],
                    rtol=1e-10,
                    atol=1e-10,
                    msg=f'{where} {key}')
        assert steps[-1] == 0, 'records outlive their graphs'


@pytest.mark.parametrize('gather_max_ranks', [8, 0])
@pytest.mark.parametrize('reentrant', [True, False])
def test_five_calls_in_one_segment(reentrant, gather_max_ranks):
    """Review finding 2: one layer for 5 pyramid levels inside one
    checkpointed segment, 4+5, 1+1, 2+2, 3+3, 4+4 samples: 5 counted
    batches and 10 collectives per step (one each way per call; more on
    the all_reduce path's first step, which refines), exact."""
    results = run_distributed(_records_world, 2, FPN, False, 1, reentrant,
                              gather_max_ranks)
    _check(results, FPN, False)
    if gather_max_ranks:
        for steps in results:
            assert [s['collectives'] for s in steps[:-1]] == [10] * STEPS


@pytest.mark.parametrize('segments', [1, 2])
@pytest.mark.parametrize('gather_max_ranks', [8, 0])
@pytest.mark.parametrize('reentrant', [True, False])
def test_equal_inputs_recompute_their_own_statistics(reentrant,
                                                     gather_max_ranks,
                                                     segments):
    """Review finding 3: two calls whose inputs are equal on rank 0 (not on
    rank 1), in one segment or one per segment: each recompute takes its
    own call's statistics."""
    results = run_distributed(_records_world, 2, PAIR, True, segments,
                              reentrant, gather_max_ranks)
    _check(results, PAIR, True)


def test_records_beyond_the_bound_raise(monkeypatch):
    """No silent cap: a segment holding more calls of one layer than
    MAX_RECORDS raises at the forward that would exceed it (every rank
    makes the same calls, so every rank raises), instead of dropping a
    record and computing a wrong recompute."""
    monkeypatch.setattr(sync_bn_recompute, 'MAX_RECORDS', 3)
    xs = [
        torch.randn(2, C, 2, dtype=torch.float64, requires_grad=True)
        for _ in range(4)
    ]
    for reentrant in (True, False):
        layer = SyncBatchNorm(C).double()
        ys = checkpoint(_run, layer, *xs[:3], use_reentrant=reentrant)
        sum(y.sum() for y in ys).backward()
        with pytest.raises(RuntimeError, match='MAX_RECORDS'):
            checkpoint(_run, layer, *xs, use_reentrant=reentrant)


def test_no_record_without_a_checkpoint():
    """Forwards that nothing can recompute (no_grad in train mode, as
    precise BN statistics or a teacher run them; plain training) keep no
    record; a checkpoint's go with its graph."""
    layer = SyncBatchNorm(C).double()
    x = torch.randn(4, C, 2, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        for _ in range(10):
            layer(x)
    layer(x).sum().backward()
    assert records_of(layer) == []
    y = checkpoint(layer, x, use_reentrant=False)
    assert len(records_of(layer)) == 1
    y.sum().backward()
    del y
    assert records_of(layer) == []
    assert int(layer.num_batches_tracked) == 12


@pytest.mark.parametrize('reentrant', [True, False])
def test_a_second_backward_recomputes_again(reentrant):
    """backward(retain_graph=True) twice: the second backward recomputes
    the segment again from the same records (3 calls, the first and last
    equal): gradients twice those of one backward, the batches counted
    once each."""
    torch.manual_seed(0)
    layer = SyncBatchNorm(C).double()
    base = torch.randn(4, C, 3, dtype=torch.float64)
    xs = [base.clone(), base * 2 + 1, base.clone()]
    xs = [x.requires_grad_() for x in xs]
    ys = checkpoint(_run, layer, *xs, use_reentrant=reentrant)
    loss = sum((y * (i + 1)).square().sum() for i, y in enumerate(ys))
    if reentrant:
        # The reentrant mode supports one backward per forward.
        loss.backward()
        first = [x.grad.clone() for x in xs]
    else:
        loss.backward(retain_graph=True)
        first = [x.grad.clone() for x in xs]
        loss.backward()
        for x, g in zip(xs, first):
            torch.testing.assert_close(x.grad, 2 * g)
    assert int(layer.num_batches_tracked) == 3
    ref = torch.nn.BatchNorm1d(C).double()
    refs = [x.detach().clone().requires_grad_() for x in xs]
    sum((ref(x) * (i + 1)).square().sum()
        for i, x in enumerate(refs)).backward()
    for x, g in zip(refs, first):
        torch.testing.assert_close(g, x.grad)
    torch.testing.assert_close(layer.running_var, ref.running_var)
