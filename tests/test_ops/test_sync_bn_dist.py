"""MMSyncBN across real processes beyond the numbers: sub-groups by
``group_size``, torch.compile with collectives in the graph, the opt-in
consistency check, and a dead or stuck rank turning into a clear error."""
import copy
import os
import queue
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import free_port, join_group, run_distributed
from sync_bn_cases import no_compile_cache

from mmsync.cnn import build_norm_layer, convert_sync_batchnorm
from mmsync.ops import SyncBatchNorm, sync_bn_comm
from mmsync.ops.sync_bn_comm import _subgroups, sync_subgroup


def _global_bn(x, dy):
    """F.batch_norm over ``x`` in float64: output, grads, running var."""
    x = x.clone().requires_grad_()
    w = torch.ones(x.size(1), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.size(1), dtype=torch.float64, requires_grad=True)
    rm = torch.zeros(x.size(1), dtype=torch.float64)
    rv = torch.ones(x.size(1), dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad, rv


def _group_size_world(rank, world_size):
    """Layers built from norm_cfg with group_size 2 and 4 at world 4."""
    bounds = [0, 3, 8, 10, 14]  # unequal splits 3, 5 | 2, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bounds[-1], 3, 4, 5, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = {}
    for group_size in (2, 4):
        cfg = dict(type='MMSyncBN', group_size=group_size, stats_mode='N')
        name, layer = build_norm_layer(cfg, 3)
        layer = layer.double()
        mine = x[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
        y = layer(mine)
        y.backward(dy[bounds[rank]:bounds[rank + 1]])
        first = bounds[rank // group_size * group_size]
        last = bounds[(rank // group_size + 1) * group_size]
        ref_y, ref_dx, ref_dw, ref_db, ref_rv = _global_bn(
            x[first:last], dy[first:last])
        local = slice(bounds[rank] - first, bounds[rank + 1] - first)
        out[group_size] = dict(
            size=layer.group_size,
            repr=f'group_size={group_size}' in repr(layer),
            error=max(
                (y - ref_y[local]).abs().max().item(),
                (mine.grad - ref_dx[local]).abs().max().item(),
                (layer.weight.grad * group_size - ref_dw).abs().max().item(),
                (layer.bias.grad * group_size - ref_db).abs().max().item(),
                (layer.running_var - ref_rv).abs().max().item()))
    # Groups are created once and shared by every layer of a size.
    again = SyncBatchNorm(3, group_size=2)
    out['shared'] = (
        again._sync_group()[0] is sync_subgroup(2) and len(_subgroups) == 2)
    try:
        SyncBatchNorm(3, group_size=3)
    except ValueError as e:
        out['bad size'] = str(e)
    return out


def test_group_size_world_four():
    """group_size=2: ranks {0, 1} and {2, 3} synchronize apart, exactly as
    F.batch_norm per group; group_size=4 is the whole world."""
    for result in run_distributed(_group_size_world, 4):
        for group_size in (2, 4):
            got = result[group_size]
            assert got['size'] == group_size and got['repr']
            assert got['error'] < 1e-12
        assert result['shared']
        assert result['bad size'] == ('MMSyncBN group_size=3 must divide '
                                      'the world size, which is 4')


def _count_collectives(graph_module):
    graph_module.graph.eliminate_dead_code()
    return sum('_c10d_functional' in str(node.target)
               and 'wait_tensor' not in str(node.target)
               for node in graph_module.graph.nodes)


def _compile_world(rank, world_size, gather_max_ranks):
    """torch.compile(fullgraph=True) at world 2 with an unequal split."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import \
        min_cut_rematerialization_partition

    sync_bn_comm.GATHER_MAX_RANKS = gather_max_ranks

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), SyncBatchNorm(8, act='relu'), nn.Conv2d(8, 4, 1),
        SyncBatchNorm(4, stats_mode='N', group_size=2)).double()
    compiled_model = copy.deepcopy(model)
    counted_model = copy.deepcopy(model)
    torch.manual_seed(rank)
    x = torch.randn(4 + 2 * rank, 3, 10, 10, dtype=torch.float64)
    want = model(x)
    want.square().sum().backward()
    with no_compile_cache():
        got = torch.compile(compiled_model, fullgraph=True)(x)
        got.square().sum().backward()
    errors = [(got - want).abs().max().item()]
    for p, q in zip(compiled_model.parameters(), model.parameters()):
        errors.append((p.grad - q.grad).abs().max().item())
    errors.append((compiled_model[1].running_var -
                   model[1].running_var).abs().max().item())

    collectives = {}

    def counting(phase):

        def compiler(graph_module, example_inputs):
            collectives[phase] = _count_collectives(graph_module)
            return make_boxed_func(graph_module.forward)

        return compiler

    # Partitioned as inductor does: AOTAutograd's default partition copies
    # the forward's ops that feed an all_reduce into the backward graph
    # (unused, but a collective is never dropped as dead code).
    backend = aot_autograd(
        fw_compiler=counting('forward'),
        bw_compiler=counting('backward'),
        partition_fn=min_cut_rematerialization_partition)
    with no_compile_cache():
        torch.compile(counted_model, fullgraph=True, backend=backend)(x)\
            .sum().backward()
    explained = torch._dynamo.explain(copy.deepcopy(model))(x)
    return (max(errors), collectives, explained.graph_count,
            explained.graph_break_count)


@pytest.mark.parametrize(
    'gather_max_ranks', [8, 0], ids=['all_gather', 'all_reduce'])
def test_torch_compile_world_two(gather_max_ranks):
    """One graph, no graph break: dynamo turns the collectives of each
    layer into functional ones, one in the forward graph (gathered rows) or
    two (the all_reduced moments, summed around 0 and then around the mean
    found: no decision on the data inside a graph) and one in the backward
    graph per layer, and the result equals eager."""
    forward = 2 if gather_max_ranks else 4
    for error, collectives, graphs, breaks in run_distributed(
            _compile_world, 2, gather_max_ranks):
        assert error < 1e-10
        assert collectives == {'forward': forward, 'backward': 2}
        assert (graphs, breaks) == (1, 0)


def _raised(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


def _check_world(rank, world_size):
    """Each scenario diverges on purpose; every rank must raise the same."""
    os.environ['MMSYNC_CHECK_SYNC'] = '1'
    torch.manual_seed(0)
    a, b = SyncBatchNorm(3), SyncBatchNorm(5)
    plain = copy.deepcopy(a)
    plain.check_sync = False
    c, d, e, f = (SyncBatchNorm(3) for _ in range(4))
    g = SyncBatchNorm(3, affine=False, track_running_stats=False)
    out = {}
    # Agreeing ranks: the check changes nothing, bit for bit.
    x = torch.randn(2 + rank, 3, 4, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    a(x).square().sum().backward()
    plain(x_plain).square().sum().backward()
    out['same'] = (
        torch.equal(x.grad, x_plain.grad)
        and torch.equal(a.weight.grad, plain.weight.grad)
        and torch.equal(a.running_var, plain.running_var))
    # Rank 0 calls a layer of 3 channels, rank 1 one of 5.
    out['layer'] = _raised(lambda: (a, b)[rank](torch.randn(4, (3, 5)[rank])))
    # One dtype per rank.
    dtype = (torch.float32, torch.float64)[rank]
    out['dtype'] = _raised(lambda: g(torch.randn(4, 3, dtype=dtype)))
    # Rank 0 calls c twice, rank 1 calls c then d.
    c(torch.randn(4, 3))
    out['call'] = _raised(lambda: (c, d)[rank](torch.randn(4, 3)))
    # Both run e and f forward; rank 0 back-propagates through e only and
    # rank 1 through f only.
    ye, yf = e(torch.randn(4, 3)), f(torch.randn(4, 3))
    out['backward'] = _raised(lambda: (ye, yf)[rank].sum().backward())
    # No rank was left inside a collective: the group still works.
    y = SyncBatchNorm(3)(torch.randn(3, 3, requires_grad=True))
    y.sum().backward()
    return out


def test_check_sync_world_two():
    """MMSYNC_CHECK_SYNC=1: the same clear error on every rank, naming
    what differs and each rank's values, instead of a hang."""
    results = run_distributed(_check_world, 2)
    assert results[0] == results[1]
    got = results[0]
    assert got['same']
    prefix = 'MMSyncBN consistency check (MMSYNC_CHECK_SYNC): '
    assert got['layer'].startswith(prefix + 'the ranks of a group of 2 '
                                   'disagree on layer, call, channels before '
                                   'a forward collective: group rank 0: ')
    assert 'channels=3' in got['layer'] and 'channels=5' in got['layer']
    assert 'disagree on dtype before a forward' in got['dtype']
    assert 'dtype=torch.float32' in got['dtype']
    assert 'dtype=torch.float64' in got['dtype']
    assert 'disagree on layer, call before a forward' in got['call']
    assert 'disagree on layer before a backward' in got['backward']


@pytest.mark.parametrize('check_sync', [True, False])
def test_check_sync_world_one(check_sync):
    """Without a group there is nothing to check and nothing to gather."""
    layer = SyncBatchNorm(3, check_sync=check_sync)
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(
        layer(x), F.batch_norm(x, None, None, training=True))


def _bad_input_world(rank, world_size):
    """Rank 1 passes an input of the wrong channels, then a 1D one."""
    layer = SyncBatchNorm(3, check_sync=True)
    out = []
    for bad in (torch.randn(4, 5, 2), torch.randn(4)):
        x = bad if rank == 1 else torch.randn(4, 3, 2)
        start = time.monotonic()
        try:
            layer(x)
        except (RuntimeError, ValueError) as e:
            out.append((type(e).__name__, str(e), time.monotonic() - start))
    # Nobody was left inside a collective: the group still works.
    layer(torch.randn(2, 3, 2)).sum().backward()
    return out


def test_check_sync_reports_bad_input_to_every_rank():
    """With the check on, one rank's invalid input raises its own error
    there and the check's error on the others at once, instead of leaving
    them in a collective until the process group's timeout."""
    results = run_distributed(_bad_input_world, 2, pg_timeout=20)
    (wrong, flat), (wrong_1, flat_1) = results
    for name, message, waited in (wrong, flat):
        assert name == 'RuntimeError' and waited < 10
        assert message.startswith(
            'MMSyncBN consistency check (MMSYNC_CHECK_SYNC): group rank(s) '
            '[1] of 2 got an invalid input before a forward collective')
    assert 'channels=5' in wrong[1] and 'channels=-1' in flat[1]
    assert wrong_1[:2] == ('ValueError', 'MMSyncBN was built for '
                           'num_features=3 channels, got input of shape '
                           '(4, 5, 2) with 5 channels (dim 1)')
    assert flat_1[0] == 'ValueError' and 'at least 2 dimensions' in flat_1[1]


def _no_communication_world(rank, world_size):
    """Layers whose sub-groups are not created yet (built before the group,
    the group re-created, unpickled): reading them must not communicate."""
    out = {}
    _subgroups.clear()
    layer = SyncBatchNorm(3, group_size=2)
    _subgroups.clear()  # as if built before init_process_group
    if rank == 0:  # rank 1 reads nothing: a collective here would hang
        out['repr'] = repr(layer)
        out['size'] = layer.group_size
        out['created'] = len(_subgroups)
    dist.barrier()
    x = torch.randn(2 + rank, 3, 4, dtype=torch.float64)
    layer.double()(x)  # creates the sub-groups, on every rank
    out['after'] = len(_subgroups)
    return out


def test_reading_a_layer_never_communicates():
    """repr(layer) and layer.group_size on one rank return at once, with
    the configured size, and create no group (they used to run
    dist.new_subgroups, a collective of the world, and hang)."""
    got, other = run_distributed(_no_communication_world, 2, pg_timeout=10)
    assert 'group_size=2' in got['repr'] and got['size'] == 2
    assert got['created'] == 0 and got['after'] == other['after'] == 1


def _mixed_dtype_world(rank, world_size):
    """Rank 0 holds float32, rank 1 float64 (3 + 5 samples)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64) * 3 + 2
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dtype = (torch.float32, torch.float64)[rank]
    mine = slice(*((0, 3), (3, 8))[rank])
    layer = SyncBatchNorm(3, stats_mode='N')
    xr = x[mine].to(dtype).requires_grad_()
    y = layer(xr)
    y.backward(dy[mine].to(dtype))
    ref_y, ref_dx, ref_dw, ref_db, ref_rv = _global_bn(x, dy)
    return dict(
        dtypes=(y.dtype, xr.grad.dtype),
        errors=[(y.double() - ref_y[mine]).abs().max().item(),
                (xr.grad.double() - ref_dx[mine]).abs().max().item(),
                (layer.weight.grad.double() * 2 - ref_dw).abs().max().item(),
                (layer.bias.grad.double() * 2 - ref_db).abs().max().item(),
                (layer.running_var.double() - ref_rv).abs().max().item()])


def test_ranks_with_different_dtypes():
    """float32 on one rank and float64 on the other train (the backward
    sums travel in float64; they used to abort the process in gloo), each
    rank's result in its own dtype, within float32 accuracy of the oracle."""
    for rank, got in enumerate(run_distributed(_mixed_dtype_world, 2)):
        dtype = (torch.float32, torch.float64)[rank]
        assert got['dtypes'] == (dtype, dtype)
        assert max(got['errors']) < 1e-4


def _process_group_world(rank, world_size):
    """torch SyncBatchNorm layers synchronizing each rank alone, converted."""
    alone = [dist.new_group([r]) for r in range(world_size)]
    bn = nn.SyncBatchNorm(2, process_group=alone[rank])
    converted = convert_sync_batchnorm(nn.Sequential(bn))[0]
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]) + 10 * rank
    both = convert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(2)))[0]
    return (converted(x).detach(), converted.group
            is alone[rank], both(x).detach())


def test_convert_keeps_the_process_group():
    """convert_sync_batchnorm keeps a torch SyncBatchNorm's process_group
    (it used to sync the whole world: [-1.18, -0.78] where [-1, 1] is
    right); without one the layer syncs the world."""
    for rank, (y, same,
               y_world) in enumerate(run_distributed(_process_group_world, 2)):
        torch.testing.assert_close(
            y, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-4, rtol=0)
        assert same
        assert not torch.allclose(y_world, y, atol=1e-2)


def _rank_fails(rank, port, results, pg_timeout, failure):
    """Trains with one layer; rank 1 dies or stalls at the third step."""
    join_group(rank, 2, port, pg_timeout)
    layer = SyncBatchNorm(4, check_sync=failure == 'dies, checked')
    for step in range(5):
        if rank == 1 and step == 2:
            if failure.startswith('dies'):
                os._exit(3)
            time.sleep(pg_timeout + 30)
        start = time.monotonic()
        try:
            x = torch.randn(3, 4, 5, requires_grad=True)
            layer(x).sum().backward()
        except RuntimeError:
            results.put(
                (rank, step, time.monotonic() - start, traceback.format_exc()))
            return
    results.put((rank, 'finished', None, None))


@pytest.mark.parametrize('failure', ['dies', 'stalls', 'dies, checked'])
def test_failed_rank_stops_the_others(failure):
    """A rank that dies (killed) or stalls mid-training makes the other stop
    with MMSyncBN's error within the process group's timeout; with the
    consistency check on, the check's own collective reports it."""
    pg_timeout = 5
    ctx = mp.get_context('spawn')
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_fails,
            args=(rank, port, results, pg_timeout, failure),
            daemon=True) for rank in range(2)
    ]
    for p in procs:
        p.start()
    try:
        rank, step, waited, error = results.get(timeout=120)
    except queue.Empty:
        raise AssertionError('rank 0 neither failed nor finished') from None
    finally:
        for p in procs:
            p.join(timeout=1 if p is procs[0] else 0)
            if p.is_alive():
                p.kill()
                p.join()
    assert (rank, step) == (0, 2), error
    assert waited < pg_timeout + 5
    what = ('consistency check (MMSYNC_CHECK_SYNC) before a forward'
            if 'checked' in failure else 'forward statistics')
    assert (f'RuntimeError: MMSyncBN: the {what} collective over a group of '
            '2 ranks failed on rank 0: another rank died') in error
