"""MMSyncBN's contract beyond the numbers: ops, autograd, errors, compile."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_distributed
from sync_bn_cases import no_compile_cache
from torch.library import opcheck
from torch.nn.modules.batchnorm import _BatchNorm

from mmsync.ops import SyncBatchNorm

ops = torch.ops.mmsync
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _layouts(x):
    yield 'contiguous', x.contiguous()
    if x.dim() == 4:
        yield 'channels_last', x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        yield 'channels_last_3d', x.contiguous(
            memory_format=torch.channels_last_3d)
    if x.dim() >= 3:
        yield 'transposed', x.transpose(-1, -2)


def sample_inputs(dtype):
    """(name, input) pairs over dims 2-5 and every layout."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((7, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for layout, xl in _layouts(x):
            yield f'{x.dim()}d-{layout}', xl


def saved_for_backward(fn, x):
    """The tensors that ``fn(x)`` saves for backward (saved-tensor hooks)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


class TestOps:
    """Each op passes torch.library.opcheck (schema, fake, autograd)."""

    @pytest.mark.parametrize('dtype', DTYPES, ids=str)
    @pytest.mark.parametrize('relu', (False, True))
    def test_opcheck(self, dtype, relu):
        for _, x in sample_inputs(dtype):
            C = x.size(1)
            w = torch.rand(C, dtype=torch.float32) + 0.5
            b = torch.randn(C, dtype=torch.float32)
            rm, rv = torch.zeros(C), torch.ones(C)
            nbt = torch.tensor(3)
            stats = ops.sync_bn_forward_stats(x, True)
            count = x.numel() // C
            opcheck(ops.sync_bn_forward_stats, (x, False))
            opcheck(
                ops.sync_bn_forward_finalize,
                (stats, rm, rv, nbt, None, 1e-5, count, True, torch.float64))
            mean, invstd, scale = ops.sync_bn_forward_finalize(
                stats, None, None, None, 0.1, 1e-5, count, True, torch.float64)
            opcheck(ops.sync_bn_forward_output, (x, mean, invstd, w, b, relu))
            dy = torch.randn_like(x)
            opcheck(ops.sync_bn_backward_reduce,
                    (dy, x, mean, invstd, w, b, relu))
            sums = ops.sync_bn_backward_reduce(dy, x, mean, invstd, w, b, relu)
            opcheck(ops.sync_bn_backward_data,
                    (dy, x, mean, invstd, None, None, sums, scale, relu))

    def test_stats_buffer(self):
        """The packed row holds [w, n, shift, mean - shift, M2]: shift is
        the channel's first value, M2 = n * var."""
        x = torch.randn(5, 2, 7, dtype=torch.float64) * 3 + 1
        shift = x[0, :, 0]
        mean = x.mean((0, 2))
        var = x.var((0, 2), unbiased=False)
        for by_count, w in ((True, 35.0), (False, 1.0)):
            stats = ops.sync_bn_forward_stats(x, by_count)
            want = torch.cat([
                torch.tensor([w, 35.0], dtype=torch.float64), shift,
                mean - shift, 35 * var
            ])
            torch.testing.assert_close(stats, want, rtol=1e-12, atol=1e-12)
        empty = ops.sync_bn_forward_stats(x[:0], True)
        assert empty.tolist() == [0.0] * 8

    def test_stats_large_planes_and_rows(self):
        """Chunked planes and row groups merge to the exact moments."""
        gen = torch.Generator().manual_seed(1)
        for x in (torch.randn(2, 2, 10001, generator=gen),
                  torch.randn(3, 5, 70, 90, generator=gen).contiguous(
                      memory_format=torch.channels_last),
                  torch.randn(40000, 6, generator=gen),
                  torch.randn(9, 1500, generator=gen)):
            stats = ops.sync_bn_forward_stats(x, True)
            C = x.size(1)
            dims = [0] + list(range(2, x.dim()))
            x64 = x.double()
            torch.testing.assert_close(
                stats[2:2 + C] + stats[2 + C:2 + 2 * C],
                x64.mean(dims),
                rtol=0,
                atol=1e-6)
            torch.testing.assert_close(
                stats[2 + 2 * C:] / stats[1],
                x64.var(dims, unbiased=False),
                rtol=1e-5,
                atol=1e-6)

    def test_strided_2d_input_reads_as_rows(self):
        """A 2-D input with strided channels is copied to (N, C) rows once:
        the same kernels, so the same bits, as its contiguous copy."""

        def forward(x):
            stats = ops.sync_bn_forward_stats(x, True)
            mean, invstd, _ = ops.sync_bn_forward_finalize(
                stats, None, None, None, 0.1, 1e-5, 40, True, torch.float64)
            return stats, ops.sync_bn_forward_output(x, mean, invstd, None,
                                                     None, False)

        strided = (torch.randn(40, 26) * 3 + 1)[:, ::2]
        assert not strided.is_contiguous()
        for got, want in zip(forward(strided), forward(strided.contiguous())):
            assert torch.equal(got, want)

    def test_bad_op_arguments(self):
        x = torch.randn(4, 3, 5)
        with pytest.raises(RuntimeError, match='floating point input'):
            ops.sync_bn_forward_stats(x.long(), True)
        with pytest.raises(RuntimeError, match='2 or more dimensions'):
            ops.sync_bn_forward_stats(torch.randn(5), True)
        mean, invstd = torch.zeros(4, dtype=torch.float64), torch.ones(4)
        with pytest.raises(RuntimeError, match=r'mean must have shape'):
            ops.sync_bn_forward_output(x, mean, invstd, None, None, False)
        with pytest.raises(RuntimeError, match='stats must be the float64'):
            ops.sync_bn_forward_finalize(
                torch.zeros(5), None, None, None, 0.1, 1e-5, 1, True,
                torch.float64)
        with pytest.raises(RuntimeError, match=r'\(R, 3C\+2\) rows'):
            ops.sync_bn_forward_finalize(
                torch.zeros(2, 2, 7, dtype=torch.float64), None, None, None,
                0.1, 1e-5, 1, True, torch.float64)
        one = ops.sync_bn_forward_stats(torch.randn(1, 3), True)
        empty = ops.sync_bn_forward_stats(torch.randn(0, 3), True)
        with pytest.raises(
                ValueError,
                match='1 value per channel in the '
                'whole group of 2 ranks'):
            ops.sync_bn_forward_finalize(
                torch.stack([empty, one]), None, None, None, 0.1, 1e-5, 0,
                True, torch.float64)


class TestModule:
    """The nn.Module: construction, state, errors and autograd."""

    def test_is_a_batchnorm_with_bn_state_dict(self):
        layer = SyncBatchNorm(8)
        assert isinstance(layer, _BatchNorm)
        assert layer.state_dict().keys() == nn.BatchNorm2d(
            8).state_dict().keys()
        layer.load_state_dict(nn.BatchNorm2d(8).state_dict())
        text = repr(SyncBatchNorm(8, stats_mode='N', act='relu'))
        assert 'group_size=1' in text and "stats_mode='N'" in text
        assert "act='relu'" in text

    def test_constructor_errors(self):
        with pytest.raises(
                ValueError,
                match=r"stats_mode must be one of "
                r"\('default', 'N'\), got 'sum'"):
            SyncBatchNorm(4, stats_mode='sum')
        with pytest.raises(ValueError, match='act must be'):
            SyncBatchNorm(4, act='gelu')
        for bad in (0, -2, 1.5, True, '2'):
            with pytest.raises(
                    ValueError,
                    match='group_size must be None or a positive int'):
                SyncBatchNorm(4, group_size=bad)
        with pytest.raises(ValueError, match='either group or group_size'):
            SyncBatchNorm(4, group=object(), group_size=2)

    def test_group_size_without_distribution(self):
        """Without a process group, group_size leaves a world of one."""
        layer = SyncBatchNorm(4, group_size=2)
        assert layer.group_size == 1
        x = torch.randn(3, 4, 5)
        torch.testing.assert_close(
            layer(x), F.batch_norm(x, None, None, training=True))

    @pytest.mark.parametrize('x, error, match', [
        (torch.randn(5), ValueError, 'at least 2 dimensions'),
        (torch.randn(2, 5, 3), ValueError, 'num_features=4'),
        (torch.ones(2, 4, 3, dtype=torch.int64), TypeError, 'torch.int64'),
        (torch.ones(2, 4, 3, dtype=torch.complex64), TypeError, 'complex64'),
    ])
    def test_bad_input(self, x, error, match):
        with pytest.raises(error, match=match):
            SyncBatchNorm(4)(x)

    def test_one_value_per_channel(self):
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            SyncBatchNorm(3)(torch.randn(1, 3))
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            F.batch_norm(torch.randn(1, 3), None, None, training=True)

    def test_empty_batch(self):
        """As F.batch_norm: empty output, zero grads, stats unchanged."""
        layer = SyncBatchNorm(3)
        x = torch.randn(0, 3, 4, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert layer.weight.grad.eq(0).all() and layer.bias.grad.eq(0).all()
        assert layer.running_mean.eq(0).all()
        assert layer.running_var.eq(1).all()

    @pytest.mark.parametrize('stats_mode', ('default', 'N'))
    @pytest.mark.parametrize('act', (None, 'relu'))
    def test_gradcheck(self, stats_mode, act):
        layer = SyncBatchNorm(3, stats_mode=stats_mode, act=act).double()
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(3, dtype=torch.float64).requires_grad_()

        def fn(x, w, b):
            return torch.func.functional_call(layer, {
                'weight': w,
                'bias': b
            }, (x, ))

        assert torch.autograd.gradcheck(fn, (x, w, b))

    @pytest.mark.parametrize('dtype', DTYPES, ids=str)
    def test_fused_relu(self, dtype):
        """act='relu' equals BN followed by ReLU, forward and backward."""
        for _, x in sample_inputs(dtype):
            C = x.size(1)
            fused = SyncBatchNorm(C, act='relu')
            with torch.no_grad():
                fused.weight.uniform_(0.5, 1.5)
                fused.bias.uniform_(-1, 1)
            plain = copy.deepcopy(fused)
            plain.act = None
            x1 = x.detach().clone().requires_grad_()
            x2 = x.detach().clone().requires_grad_()
            y1 = fused(x1)
            y2 = F.relu(plain(x2))
            dy = torch.randn_like(y1)
            y1.backward(dy)
            y2.backward(dy)
            tol = dict(
                float64=1e-12, float32=1e-5)[str(dtype)[6:]] if (dtype in (
                    torch.float64, torch.float32)) else 2e-2
            torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
            torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
            torch.testing.assert_close(
                fused.weight.grad, plain.weight.grad, rtol=tol, atol=tol)

    @pytest.mark.parametrize('dtype', DTYPES, ids=str)
    def test_fused_relu_saves_less_than_the_pair(self, dtype):
        """act='relu' saves the input only; BN then ReLU also saves the
        ReLU's output."""

        for name, x in sample_inputs(dtype):
            if name.endswith('transposed'):
                continue  # saved as the contiguous copy the kernels read
            x = x.detach().requires_grad_()
            fused = [
                t for t in saved_for_backward(
                    SyncBatchNorm(x.size(1), act='relu'), x) if t is not x
            ]
            plain = SyncBatchNorm(x.size(1))
            pair = [
                t for t in saved_for_backward(lambda t: F.relu(plain(t)), x)
                if t is not x
            ]
            assert all(t.numel() < x.numel() for t in fused)
            extra = [t for t in pair if t.numel() >= x.numel()]
            assert len(extra) == 1 and extra[0].shape == x.shape
            assert (sum(t.numel()
                        for t in pair) - sum(t.numel()
                                             for t in fused) == x.numel())

    def test_saves_nothing_of_input_size_but_the_input(self):
        x = torch.randn(8, 16, 10, 10, requires_grad=True)
        saved = saved_for_backward(SyncBatchNorm(16), x)
        big = [t for t in saved if t.numel() >= x.numel()]
        assert len(big) == 1 and big[0] is x
        assert sum(t.numel() for t in saved if t is not x) <= 6 * 16 + 1

    def test_momentum_none_is_cumulative_average(self):
        layer = SyncBatchNorm(2, momentum=None)
        ref = nn.BatchNorm2d(2, momentum=None)
        for _ in range(4):
            x = torch.randn(3, 2, 4, 4)
            layer(x)
            ref(x)
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
        assert layer.num_batches_tracked.item() == 4

    def test_num_batches_tracked_none(self):
        """torch allows num_batches_tracked=None: training works and, as in
        BatchNorm2d, momentum=None then leaves the running stats alone."""
        x = torch.randn(4, 3, 5, dtype=torch.float64)
        for momentum in (0.1, None):
            layer = SyncBatchNorm(3, momentum=momentum).double()
            ref = nn.BatchNorm1d(3, momentum=momentum).double()
            layer.num_batches_tracked = ref.num_batches_tracked = None
            torch.testing.assert_close(layer(x), ref(x))
            torch.testing.assert_close(layer.running_var, ref.running_var)
            torch.testing.assert_close(layer.running_mean, ref.running_mean)

    def test_factory_arguments(self):
        """device/dtype as torch's layers take them: skip_init and
        build_norm_layer(dict(type='MMSyncBN', dtype=...)) work as for
        'BN'."""
        from mmsync.cnn import build_norm_layer
        layer = nn.utils.skip_init(SyncBatchNorm, 3)
        assert layer.weight.device.type == 'cpu' and layer.num_features == 3
        for name in ('MMSyncBN', 'BN'):
            _, layer = build_norm_layer(
                dict(type=name, dtype=torch.float64), 3)
            assert layer.weight.dtype == layer.running_var.dtype == (
                torch.float64)
        layer = SyncBatchNorm(3, device='meta')
        assert layer.running_mean.is_meta

    def test_torch_compile_fullgraph(self):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), SyncBatchNorm(8, act='relu'),
            nn.Conv2d(8, 4, 1), SyncBatchNorm(4, stats_mode='N'))
        compiled_model = copy.deepcopy(model)
        x = torch.randn(4, 3, 10, 10)
        want = model(x)
        want.square().sum().backward()
        with no_compile_cache():
            compiled = torch.compile(compiled_model, fullgraph=True)
            got = compiled(x)
            got.square().sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for p, q in zip(compiled_model.parameters(), model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def _gradcheck_world(rank, world_size):
    """gradcheck of rank 0's input at an unequal split (3 vs 5 samples).

    Both ranks call gradcheck on inputs of one shape, so they run the same
    sequence of collectives; rank 1 feeds the layer constants (its own
    perturbations do nothing) and passes a zero upstream gradient, so the
    Jacobian checked on rank 0 is exactly rank 0's.
    """
    torch.manual_seed(rank)
    layer = SyncBatchNorm(3, stats_mode='N').double()
    x = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    const = torch.randn(5, 3, 4, dtype=torch.float64)
    if rank == 0:
        fn = layer
    else:

        def fn(x):
            inputs = torch.cat([x * 0 + const[:3], const[3:]])
            return layer(inputs)[:3] * 0

    return torch.autograd.gradcheck(fn, (x, ))


def _errors_world(rank, world_size):
    """Bad input raises the same error on every rank, and nothing hangs."""
    layer = SyncBatchNorm(3, stats_mode='N')
    raised = []
    for bad in (torch.randn(5), torch.randn(4, 2, 3),
                torch.ones(4, 3, dtype=torch.int32)):
        try:
            layer(bad)
        except (ValueError, TypeError) as e:
            raised.append(type(e).__name__)
    # The whole group holds one value per channel: every rank raises.
    try:
        layer(torch.randn(1 if rank == 0 else 0, 3))
    except ValueError as e:
        raised.append(str(e).split(',')[0])
    # The group still works afterwards: no rank is left in a collective.
    x = torch.randn(2 + rank, 3, 4, requires_grad=True)
    layer(x).sum().backward()
    # An all-empty group behaves as F.batch_norm on an empty batch.
    before = layer.running_mean.clone()
    y = layer(torch.randn(0, 3, 4, requires_grad=True))
    y.sum().backward()
    raised.append(
        (tuple(y.shape), bool(torch.equal(before, layer.running_mean))))
    return raised


def test_gradcheck_world_two():
    assert run_distributed(_gradcheck_world, 2) == [True, True]


def test_errors_world_two():
    want = [
        'ValueError', 'ValueError', 'TypeError',
        'Expected more than 1 value per channel when training',
        ((0, 3, 4), True)
    ]
    assert run_distributed(_errors_world, 2) == [want, want]


_CAPABILITY_SCRIPT = '''
import sys, torch, mmsync
torch.manual_seed(0)
out = {'capability': torch.ops.mmsync.cpu_capability()}
for name, x in [('nchw', torch.randn(4, 70, 9, 11)),
                ('nhwc', torch.randn(4, 70, 9, 11).contiguous(
                    memory_format=torch.channels_last)),
                ('bf16', torch.randn(3, 5, 40).bfloat16())]:
    layer = mmsync.SyncBatchNorm(x.size(1), act='relu')
    x.requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    out[name] = (y.detach().float(), x.grad.float(), layer.weight.grad)
torch.save(out, sys.argv[1])
'''


def test_cpu_capabilities_agree(tmp_path):
    """Kernels built for each instruction set compute the same numbers."""
    results = {}
    for cap in ('default', 'avx2', 'avx512'):
        path = tmp_path / f'{cap}.pt'
        env = dict(os.environ, MMSYNC_CPU_CAPABILITY=cap)
        subprocess.run([sys.executable, '-c', _CAPABILITY_SCRIPT,
                        str(path)],
                       env=env,
                       check=True,
                       timeout=120)
        results[cap] = torch.load(path)
    base = results.pop('default')
    assert base['capability'] == 'default'
    for out in results.values():
        for name in ('nchw', 'nhwc', 'bf16'):
            for got, want in zip(out[name], base[name]):
                tol = 2e-2 if name == 'bf16' else 1e-4
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _subgroup_world(rank, world_size):
    """Ranks {0, 1} and {2, 3} synchronize within their own group only."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    bounds = [0, 3, 8, 10, 14]  # unequal splits 3, 5 | 2, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bounds[-1], 3, 4, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    layer = SyncBatchNorm(3, group=group, stats_mode='N').double()
    mine = x[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
    y = layer(mine)
    y.backward(dy[bounds[rank]:bounds[rank + 1]])
    first = bounds[rank // 2 * 2]
    last = bounds[rank // 2 * 2 + 2]
    ref_x = x[first:last].clone().requires_grad_()
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rm = torch.zeros(3, dtype=torch.float64)
    rv = torch.ones(3, dtype=torch.float64)
    ref = F.batch_norm(ref_x, rm, rv, w, b, True, 0.1, 1e-5)
    ref.backward(dy[first:last])
    local = slice(bounds[rank] - first, bounds[rank + 1] - first)
    errors = [
        (y - ref[local]).abs().max().item(),
        (mine.grad - ref_x.grad[local]).abs().max().item(),
        (layer.weight.grad * 2 - w.grad).abs().max().item(),
        (layer.bias.grad * 2 - b.grad).abs().max().item(),
        (layer.running_var - rv).abs().max().item(),
    ]
    return layer.group_size, 'group_size=2' in repr(layer), max(errors)


def test_process_subgroups():
    """group= synchronizes within a sub-group of the world (world 4)."""
    for group_size, in_repr, error in run_distributed(_subgroup_world, 4):
        assert group_size == 2 and in_repr
        assert error < 1e-12
