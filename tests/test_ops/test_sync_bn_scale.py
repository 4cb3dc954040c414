"""MMSyncBN in groups beyond ``GATHER_MAX_RANKS`` (8): 12 and 16 real gloo
processes (one thread each).

What is checked, on every rank:

- every collective of a training step moves at most 4C + 16 values per rank
  (the forward: one all_reduce of 3C+2 shifted moments, a second one only
  where the shift is far from the data: the first step at an offset, a new
  group; the backward: one all_reduce of 2C), constant in the group size;
- float64 output, grad_input, grad_weight, grad_bias and running statistics
  equal ``F.batch_norm`` (or mmcv's rank-weighted statistics for 'default')
  over the concatenated batch at offsets 0, 1e6 and 1e8 with empty ranks,
  on the first and later steps, within 10 times the oracle's own error, and
  the running statistics bit for bit the same on every rank
  (as in test_sync_bn_offset: the oracle runs on the batch shifted by the
  offset, which is exact);
- a layer loaded from a state_dict (a resume) and a process group created
  again start from a zero shift and stay exact;
- sub-groups on both sides of the limit: half the world gathers (8 or 6
  ranks), and all_reduces with the limit moved to 4;
- what the ranks send is what tools/analysis_tools/benchmark_collectives.py's cost model
  counts for mmsync.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import free_port, join_group, run_distributed
from sync_bn_cases import CollectiveCounter, _weighted_reference
from tool_utils import load_tool

from mmsync.ops import SyncBatchNorm, sync_bn_comm

C = 5
SAMPLE = (3, 2)
MOMENTUM = 0.1
OFFSETS = (0.0, 1e6, 1e8)
EPS = 2.0**-52


def _splits(world_size):
    """Unequal per-rank batch sizes with two empty ranks."""
    pattern = (3, 0, 2, 5, 1, 4, 0, 2)
    return [pattern[r % len(pattern)] for r in range(world_size)]


def _batch(sizes, offset, step, seed):
    """Per-rank float64 (n, C, 3, 2) slices around ``offset`` whose local
    means differ by rank and move a little with the step, and their dy."""
    gen = torch.Generator().manual_seed(seed * 100 + step)
    xs, dys = [], []
    for r, n in enumerate(sizes):
        noise = torch.randn(
            (n, C) + SAMPLE, generator=gen, dtype=torch.float64)
        xs.append(noise * (1 + r % 3) + (0.5 * r + 0.1 * step) + offset)
        dys.append(torch.randn((n, C) + SAMPLE, generator=gen).double())
    return xs, dys


def _oracle(x, dy, sizes, shift, stats_mode, weight, bias, running):
    """Output, grads and new running stats of the concatenated batch minus
    ``shift`` (running_mean of the unshifted batch)."""
    x = (x - shift).requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    rm, rv = running[0] - shift, running[1].clone()
    if stats_mode == 'N':
        y = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, 1e-5)
    else:
        y, mean, var = _weighted_reference(x, sizes, w, b, 1e-5)
        n = x.numel() // x.size(1)
        rm = (1 - MOMENTUM) * rm + MOMENTUM * mean
        rv = (1 - MOMENTUM) * rv + MOMENTUM * var * n / (n - 1)
    y.backward(dy)
    return (y.detach(), x.grad, w.grad, b.grad, rm.detach() + shift,
            rv.detach())


def _err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _steps(layer, sizes, offset, stats_mode, steps, seed, counter, group_rank,
           what):
    """Trains ``layer`` (this rank's slice) for ``steps`` steps; returns per
    step the collectives of forward and backward, and the errors against the
    oracle with its own error (``F.batch_norm`` without the shift)."""
    out = []
    lo = sum(sizes[:group_rank])
    mine = slice(lo, lo + sizes[group_rank])
    for step in range(1, steps + 1):
        xs, dys = _batch(sizes, offset, step, seed)
        x, dy = torch.cat(xs), torch.cat(dys)
        weight, bias = layer.weight.detach().clone(), layer.bias.detach(
        ).clone()
        running = (layer.running_mean.clone(), layer.running_var.clone())
        ref = _oracle(x, dy, sizes, offset, stats_mode, weight, bias, running)
        own = _oracle(x, dy, sizes, 0.0, stats_mode, weight, bias, running)
        xr = xs[group_rank].clone().requires_grad_()
        counter.take_calls()
        y = layer(xr)
        forward = counter.take_calls()
        y.backward(dys[group_rank])
        backward = counter.take_calls()
        size = len(sizes)
        got = (y.detach(), xr.grad, layer.weight.grad * size,
               layer.bias.grad * size, layer.running_mean, layer.running_var)
        layer.weight.grad = layer.bias.grad = None
        names = ('output', 'grad_input', 'grad_weight', 'grad_bias',
                 'running_mean', 'running_var')
        errors = {}
        for i, name in enumerate(names):
            want = ref[i][mine] if i < 2 else ref[i]
            own_err = _err(own[i][mine] if i < 2 else own[i], want)
            scale = max(1.0, want.abs().max().item() if want.numel() else 1)
            errors[name] = (_err(got[i], want), own_err, scale)
        out.append(
            dict(
                step=step,
                forward=forward,
                backward=backward,
                errors=errors,
                running=torch.cat([layer.running_mean, layer.running_var]),
                offset=offset,
                mode=stats_mode,
                what=what))
    return out


def _layer(group_size=None):
    layer = SyncBatchNorm(
        C, momentum=MOMENTUM, stats_mode='N', group_size=group_size).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1, 1, C))
    return layer


def _scale_world(rank, world_size, port):
    sizes = _splits(world_size)
    results = []
    with CollectiveCounter() as counter:
        # The whole world, beyond the limit: both modes, three offsets.
        for seed, (mode, offset) in enumerate(
            (m, o) for m in ('N', 'default') for o in OFFSETS):
            layer = _layer()
            layer.stats_mode = mode
            results += _steps(layer, sizes, offset, mode, 3, seed, counter,
                              rank, 'world')
        # A resume: the trained layer's state_dict in a new layer.
        resumed = _layer()
        resumed.load_state_dict(layer.state_dict())
        resumed.stats_mode = 'default'
        results += _steps(resumed, sizes, 1e8, 'default', 2, 7, counter, rank,
                          'resume')
        # Sub-groups of half the world: gathered (6 or 8 ranks, within the
        # limit) and, with the limit moved to 4, all_reduced per sub-group.
        group_size = world_size // 2
        first = rank // group_size * group_size
        sub = sizes[first:first + group_size]
        for limit in (8, 4):
            sync_bn_comm.GATHER_MAX_RANKS = limit
            results += _steps(
                _layer(group_size), sub, 1e8, 'N', 2, 8 + limit, counter,
                rank - first, 'gathered' if limit == 8 else 'sub-group')
            sync_bn_comm.GATHER_MAX_RANKS = 8
        # The same layer in a new process group: its shift starts again.
        layer = _layer()
        results += _steps(layer, sizes, 1e6, 'N', 1, 11, counter, rank,
                          'before')
        dist.destroy_process_group()
        join_group(rank, world_size, port, 30)
        results += _steps(layer, sizes, 1e6, 'N', 2, 12, counter, rank,
                          'new group')
    return results


def _modeled_calls(group_size):
    """What tools/analysis_tools/benchmark_collectives.py's cost model says mmsync sends
    per layer and step: (kind, bytes each rank contributes)."""
    return load_tool('benchmark_collectives').calls('mmsync', C, group_size)


def _as_sent(calls, group_size):
    """Recorded (collective, values) as the model counts them: the kind,
    and the bytes of float64 each rank contributes."""
    return [
        ('all_gather' if name.startswith('all_gather') else name, 8 *
         (values // group_size if name.startswith('all_gather') else values))
        for name, values in calls
    ]


@pytest.mark.parametrize('world_size', [12, 16])
def test_beyond_gather_limit(world_size):
    results = run_distributed(
        _scale_world, world_size, free_port(), timeout=600, pg_timeout=120)
    limit = 4 * C + 16
    modeled = {
        False: _modeled_calls(world_size),
        True: _modeled_calls(world_size // 2)
    }
    # The reduced bytes are the same on every rank: so are the statistics.
    for i, s in enumerate(results[0]):
        if s['what'] not in ('gathered', 'sub-group'):
            assert all(
                torch.equal(r[i]['running'], s['running'])
                for r in results), (s['what'], s['step'])
    for rank, steps in enumerate(results):
        for s in steps:
            where = (f"rank {rank} {s['what']} mode={s['mode']} "
                     f"offset={s['offset']:g} step {s['step']}")
            gathered = s['what'] == 'gathered'
            if gathered:
                # A sub-group within the limit: one gather of its rows.
                rows = world_size // 2 * (3 * C + 2)
                assert [v for _, v in s['forward']] == [rows], where
                assert s['forward'][0][0].startswith('all_gather'), where
            else:
                # Every collective moves O(C) values, whatever the group.
                for name, values in s['forward'] + s['backward']:
                    assert name == 'all_reduce' and values <= limit, (where,
                                                                      name,
                                                                      values)
                # Summed twice where the shift starts at 0 far from the
                # data: a new layer's (or a new group's) first step.
                far = s['offset'] != 0 and s['step'] == 1
                assert s['forward'] == [
                    ('all_reduce', 3 * C + 2)
                ] * (2 if far else 1), (where, s['forward'])
                assert s['backward'] == [('all_reduce', 2 * C)], where
            if s['step'] > 1 and s['what'] in ('world', 'gathered'):
                size = world_size // 2 if gathered else world_size
                assert _as_sent(s['forward'] + s['backward'],
                                size) == modeled[gathered], where
            for name, (err, own, scale) in s['errors'].items():
                tol = 10 * max(own, 4 * EPS * scale)
                assert err <= tol, (where, name, err, own)
