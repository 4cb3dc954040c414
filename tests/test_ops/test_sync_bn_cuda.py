"""MMSyncBN's CUDA kernels on a GPU, against F.batch_norm over the whole batch.

Skipped, with the reason shown, where there is no CUDA GPU or mmsync was
built without its CUDA kernels (with a GPU, mmsync failing to import is a
collection error, never a skip); ``test_sync_bn_cuda_emulated.py`` runs the
same kernels on the CPU. The oracle is ``F.batch_norm`` in float64 (on the
CPU) over the concatenated global batch: output, grad_input, grad_weight,
grad_bias, running statistics; for every dim (2..5), NCHW and channels_last,
float32 / float16 / bfloat16 / float64, odd sizes, and two processes sharing
one GPU over gloo with unequal and empty splits. Also: no device-to-host sync
in a training step, CUDA-graph capture, determinism, >2^31 elements.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sync_bn_cuda_cases import DTYPES, OpCase, compare, geometries, run_case

if not torch.cuda.is_available():
    _SKIP = 'no CUDA GPU (torch.cuda.is_available() is False)'
else:
    # With a GPU, mmsync must import: a missing dependency or a broken build
    # is an error of this module, never a skip that passes.
    import mmsync.ops  # noqa: F401
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            'mmsync::sync_bn_forward_stats', 'CUDA'):
        _SKIP = ('mmsync._ext has no CUDA kernels: rebuild with a CUDA torch '
                 'and nvcc (FORCE_CUDA=1 python setup.py build_ext --inplace)')
    else:
        _SKIP = ''
pytestmark = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)

ALL_DTYPES = ('float32', 'float16', 'bfloat16', 'float64')


def _ops():
    return torch.ops.mmsync


# --------------------------------------------------------------------------
# The five ops, step by step, with the all_reduces as sums.


@pytest.mark.parametrize('dtype', ALL_DTYPES)
@pytest.mark.parametrize('relu', (False, True))
def test_ops_every_path(dtype, relu):
    failures = []
    for name, shape, layout in geometries(dtype):
        failures += run_case(
            _ops(),
            OpCase(
                shape,
                layout=layout,
                dtype=dtype,
                relu=relu,
                name=f'{name},{dtype},relu={relu}'), 'cuda')
    assert failures == [], '\n'.join(failures)


@pytest.mark.parametrize(
    'options', [
        dict(affine=False),
        dict(momentum=None),
        dict(running=False),
        dict(by_count=False),
        dict(splits=[2, 0, 3]),
        dict(splits=[0, 5]),
        dict(by_count=False, splits=[0, 5, 0]),
        dict(offset=1e4),
        dict(offset=1e4, layout='channels_last'),
        dict(offset=1e4, dtype='float64'),
        dict(finalize_dtype='float32'),
    ],
    ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_ops_options(options):
    shape = (5, 8, 3, 4)
    failures = run_case(_ops(), OpCase(shape, seed=11, **options), 'cuda')
    assert failures == [], '\n'.join(failures)


@pytest.mark.parametrize('shape, layout, dtype', [
    ((32, 64, 56, 56), 'contiguous', 'float16'),
    ((32, 64, 56, 56), 'channels_last', 'bfloat16'),
    ((64, 256, 14, 14), 'contiguous', 'float16'),
    ((16, 32, 112, 112), 'channels_last', 'float32'),
    ((8, 2056, 7, 7), 'channels_last', 'float32'),
    ((32, 2048, 7, 7), 'contiguous', 'float16'),
    ((16, 1024, 13, 13), 'contiguous', 'bfloat16'),
    ((4096, 3), 'contiguous', 'float32'),
])
def test_ops_benchmark_sizes(shape, layout, dtype):
    """Sizes that fill the GPU: split grids, channel tiles, many blocks."""
    failures = run_case(
        _ops(),
        OpCase(shape, layout=layout, dtype=dtype, relu=True, offset=50.0),
        'cuda')
    assert failures == [], '\n'.join(failures)


@pytest.mark.parametrize(
    'shape, layout, splits',
    [
        # PLANAR: 8 channels a reduction tile, 8,750 tiles (grid y holds
        # them); the flat passes.
        ((3, 70000, 3), 'contiguous', [1, 2]),
        # ROWS: 17,500 channel vectors, 547 reduction tiles of 32.
        ((3, 70000, 3), 'channels_last', [1, 2]),
        # PLANAR: 75,000 reduction tiles, past grid y's 65,535: the loop.
        ((2, 600000, 3), 'contiguous', [1, 1]),
        # ROWS: 2,100,000 channel vectors, 65,625 reduction tiles of 32,
        # past grid y: the loop of the ROWS reductions.
        ((2, 8400000), 'contiguous', [1, 1]),
    ])
def test_ops_more_than_65535_channels(shape, layout, splits):
    """Channel counts whose reduction grids need more than grid y's 65535
    tiles (the kernels loop over the rest), or nearly. Two ranks, one
    holding one sample."""
    failures = run_case(
        _ops(),
        OpCase(
            shape,
            splits=splits,
            layout=layout,
            relu=True,
            name=f"{'x'.join(map(str, shape))} channels,{layout}"), 'cuda')
    assert failures == [], '\n'.join(failures[:20])


@pytest.mark.parametrize('dtype, params', [('float32', 'float16'),
                                           ('float32', 'float64'),
                                           ('bfloat16', 'bfloat16'),
                                           ('float64', 'float32')])
@pytest.mark.parametrize('layout', ('contiguous', 'channels_last'))
def test_ops_parameter_and_sum_dtypes(dtype, params, layout):
    """weight / bias in their own dtype, the group's sums in float64."""
    failures = run_case(
        _ops(),
        OpCase((6, 8, 3, 5),
               layout=layout,
               dtype=dtype,
               relu=True,
               param_dtype=params,
               sums_float64=True), 'cuda')
    assert failures == [], '\n'.join(failures)


# --------------------------------------------------------------------------
# The MMSyncBN module (Python autograd + CUDA kernels).


@dataclass
class ModuleCase:
    shape: Sequence[int]
    splits: Optional[List[int]] = None
    channels_last: bool = False
    dtype: str = 'float32'
    act: Optional[str] = None
    stats_mode: str = 'N'
    steps: int = 2
    seed: int = 0

    def describe(self):
        return (f"{'x'.join(map(str, self.shape))},{self.dtype},"
                f"{'cl' if self.channels_last else 'nchw'},"
                f'splits={self.splits},act={self.act},{self.stats_mode}')


def _layout(x, channels_last):
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def check_module(case: ModuleCase,
                 rank: int = 0,
                 world_size: int = 1) -> List[str]:
    """MMSyncBN on cuda, this rank's slice, against the global oracle."""
    from mmsync.ops import SyncBatchNorm
    dtype = DTYPES[case.dtype]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    splits = case.splits or [case.shape[0]]
    assert len(splits) == world_size
    C = case.shape[1]
    gen = torch.Generator().manual_seed(case.seed)
    layer = SyncBatchNorm(
        C, stats_mode=case.stats_mode, act=case.act).to('cuda', pdtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen))
        layer.running_mean.copy_(torch.randn(C, generator=gen))
        layer.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    rm = layer.running_mean.detach().double().cpu()
    rv = layer.running_var.detach().double().cpu()
    lo = sum(splits[:rank])
    hi = lo + splits[rank]
    failures = []
    for step in range(1, case.steps + 1):
        x64 = torch.randn(case.shape, generator=gen, dtype=torch.float64)
        x64 = x64 * 2 + 0.5
        dy64 = torch.randn(case.shape, generator=gen, dtype=torch.float64)
        xq, dyq = x64.to(dtype).double(), dy64.to(dtype).double()
        x = _layout(x64[lo:hi].to(dtype).cuda(), case.channels_last)
        x.requires_grad_()
        dy = _layout(dy64[lo:hi].to(dtype).cuda(), case.channels_last)
        y = layer(x)
        y.backward(dy)
        # Oracle, float64 on the CPU.
        xr = xq.clone().requires_grad_()
        w = layer.weight.detach().double().cpu().requires_grad_()
        b = layer.bias.detach().double().cpu().requires_grad_()
        yr = F.batch_norm(xr, rm, rv, w, b, True, 0.1, 1e-5)
        if case.act == 'relu':
            yr = F.relu(yr)
        yr.backward(dyq)
        tag = f'[{case.describe()} rank {rank} step {step}]'
        for what, got, want, dt in (
            ('output', y, yr[lo:hi], dtype),
            ('grad_input', x.grad, xr.grad[lo:hi], dtype),
            ('grad_weight', layer.weight.grad * world_size, w.grad, pdtype),
            ('grad_bias', layer.bias.grad * world_size, b.grad, pdtype),
            ('running_mean', layer.running_mean, rm, pdtype),
            ('running_var', layer.running_var, rv, pdtype),
        ):
            err = compare(got, want, dt, pdtype if dt == pdtype else None)
            if err:
                failures.append(f'{tag} {what}: {err}')
        if y.dtype != dtype or y.stride() != x.stride():
            failures.append(f'{tag} output is {y.dtype} {y.stride()}, '
                            f'input {x.dtype} {x.stride()}')
        if layer.num_batches_tracked.item() != step:
            failures.append(f'{tag} num_batches_tracked '
                            f'{layer.num_batches_tracked.item()}')
        layer.weight.grad = layer.bias.grad = None
    return failures


def _module_cases():
    cases = []
    seed = 0
    shapes = {2: (6, 5), 3: (4, 3, 7), 4: (3, 4, 5, 6), 5: (2, 3, 2, 3, 4)}
    for dim, shape in shapes.items():
        for dtype in ALL_DTYPES:
            for cl in ((False, True) if dim >= 4 else (False, )):
                seed += 1
                cases.append(
                    ModuleCase(
                        shape,
                        channels_last=cl,
                        dtype=dtype,
                        act='relu' if seed % 2 else None,
                        seed=seed))
    # Odd sizes: C=1, C=3, HW=1, N=1.
    cases += [
        ModuleCase((8, 1, 4, 4), seed=101),
        ModuleCase((8, 1), seed=102),
        ModuleCase((5, 3, 1, 1), channels_last=True, seed=103),
        ModuleCase((1, 3, 4, 5), dtype='float16', seed=104),
        ModuleCase((1, 16, 3, 3),
                   channels_last=True,
                   dtype='bfloat16',
                   seed=105),
        ModuleCase((2, 3, 1), act='relu', seed=106),
    ]
    return cases


@pytest.mark.parametrize('case', _module_cases(), ids=lambda c: c.describe())
def test_module_world_one(case):
    failures = check_module(case)
    assert failures == [], '\n'.join(failures)


def test_module_one_value_per_channel_raises():
    from mmsync.ops import SyncBatchNorm
    layer = SyncBatchNorm(3).cuda()
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        layer(torch.randn(1, 3, device='cuda'))


# --------------------------------------------------------------------------
# Properties of the CUDA path.


def test_no_device_to_host_sync():
    """A training step (forward + backward) never waits on the device."""
    from mmsync.ops import SyncBatchNorm
    layer = SyncBatchNorm(16, act='relu').cuda()
    x = torch.randn(8, 16, 10, 10, device='cuda', requires_grad=True)
    dy = torch.randn_like(x)
    layer(x).backward(dy)  # warm-up: first-call work is not a step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        layer(x).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()


@pytest.mark.parametrize('channels_last', (False, True))
def test_module_grad_output_in_the_other_layout(channels_last):
    """dy in the other memory layout than x (converted once, in the
    backward): the gradients of F.batch_norm."""
    from mmsync.ops import SyncBatchNorm
    fmts = (torch.contiguous_format, torch.channels_last)
    fmt, other = fmts[::-1] if channels_last else fmts
    x = torch.randn(8, 16, 6, 7, device='cuda').contiguous(memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn(
        8, 16, 6, 7, device='cuda').contiguous(memory_format=other)
    layer = SyncBatchNorm(16, stats_mode='N').cuda()
    layer(x).backward(dy)
    x64 = x.detach().cpu().double().requires_grad_()
    F.batch_norm(x64, None, None,
                 layer.weight.detach().cpu().double(),
                 layer.bias.detach().cpu().double(),
                 True).backward(dy.cpu().double())
    assert x.grad.stride() == x.stride()
    err = compare(x.grad, x64.grad, torch.float32)
    assert not err, err


def _op_step(x, dy, w, b, rm, rv, nbt):
    ops = _ops()
    count = x.numel() // x.size(1)
    stats = ops.sync_bn_forward_stats(x, True)
    mean, invstd, scale = ops.sync_bn_forward_finalize(stats, rm, rv, nbt, 0.1,
                                                       1e-5, count, True,
                                                       torch.float64)
    y = ops.sync_bn_forward_output(x, mean, invstd, w, b, True)
    sums = ops.sync_bn_backward_reduce(dy, x, mean, invstd, w, b, True)
    dx = ops.sync_bn_backward_data(dy, x, mean, invstd, w, b, sums, scale,
                                   True)
    return y, dx, sums


@pytest.mark.parametrize('channels_last', (False, True))
def test_cuda_graph_capture(channels_last):
    """The whole op sequence (running-stat update included) replays from a
    CUDA graph and matches eager execution on new data."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 32, 12, 12, device='cuda').to(memory_format=fmt)
    dy = torch.randn_like(x)
    w = torch.rand(32, device='cuda') + 0.5
    b = torch.randn(32, device='cuda')
    rm, rv = torch.zeros(32, device='cuda'), torch.ones(32, device='cuda')
    nbt = torch.ones((), dtype=torch.long, device='cuda')
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _op_step(x, dy, w, b, rm, rv, nbt)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _op_step(x, dy, w, b, rm, rv, nbt)
    x.copy_(torch.randn_like(x) * 3 + 1)
    dy.copy_(torch.randn_like(dy))
    rm0, rv0 = rm.clone(), rv.clone()
    graph.replay()
    rm_g, rv_g = rm.clone(), rv.clone()
    rm.copy_(rm0)
    rv.copy_(rv0)
    eager = _op_step(x, dy, w, b, rm, rv, nbt)
    for a, e in zip(out, eager):
        assert torch.equal(a, e)
    assert torch.equal(rm_g, rm) and torch.equal(rv_g, rv)


def test_deterministic():
    x = torch.randn(32, 64, 28, 28, device='cuda', dtype=torch.float16)
    dy = torch.randn_like(x)
    w = torch.rand(64, device='cuda') + 0.5
    b = torch.randn(64, device='cuda')
    first = _op_step(x, dy, w, b, None, None, None)
    for _ in range(3):
        for a, e in zip(_op_step(x, dy, w, b, None, None, None), first):
            assert torch.equal(a, e)


@pytest.mark.parametrize('layout', ('planar', 'rows'))
def test_more_than_2_31_elements(layout):
    """64-bit indexing: statistics and the last elements of y and dx."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip('needs 24 GiB of free GPU memory')
    n = 2**30 + 96
    shape = (1, 2, n) if layout == 'planar' else (n, 2)
    gen = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(shape, device='cuda', dtype=torch.float16, generator=gen)
    x.add_(3)
    assert x.numel() > 2**31
    dy = torch.randn(shape, device='cuda', dtype=torch.float16, generator=gen)
    ops = _ops()
    stats = ops.sync_bn_forward_stats(x, True)
    mean, invstd, scale = ops.sync_bn_forward_finalize(stats, None, None, None,
                                                       0.1, 1e-5, n, True,
                                                       torch.float64)
    y = ops.sync_bn_forward_output(x, mean, invstd, None, None, False)
    sums = ops.sync_bn_backward_reduce(dy, x, mean, invstd, None, None, False)
    dx = ops.sync_bn_backward_data(dy, x, mean, invstd, None, None, sums,
                                   scale, False)
    # (n, 2) views of both layouts; references in float64, chunk by chunk.
    xs = x.view(-1, 2) if layout == 'rows' else x.view(2, -1).t()
    dys = dy.view(-1, 2) if layout == 'rows' else dy.view(2, -1).t()
    chunk = 2**26
    s1 = sum(xs[i:i + chunk].double().sum(0) for i in range(0, n, chunk))
    ref_mean = s1 / n
    s2 = sum(((xs[i:i + chunk].double() - ref_mean)**2).sum(0)
             for i in range(0, n, chunk))
    ref_var = s2 / n
    err = compare(mean, ref_mean, torch.float64, torch.float32)
    assert not err, f'mean: {err}'
    err = compare(invstd, (ref_var + 1e-5).rsqrt(), torch.float64,
                  torch.float32)
    assert not err, f'invstd: {err}'
    assert stats[1].item() == n
    sdy = torch.zeros(2, dtype=torch.float64, device='cuda')
    sdyx = torch.zeros(2, dtype=torch.float64, device='cuda')
    for i in range(0, n, chunk):
        xc, dc = xs[i:i + chunk].double(), dys[i:i + chunk].double()
        sdy += dc.sum(0)
        sdyx += (dc * (xc - mean)).sum(0)
    sdyx *= invstd
    err = compare(sums, torch.cat([sdy, sdyx]), torch.float32)
    assert not err, f'sums: {err}'
    # The last elements, past 2^31, against the formula in float64.
    tail_x, tail_dy = xs[-64:].double(), dys[-64:].double()
    tail_y = y.view(-1, 2)[-64:] if layout == 'rows' else y.view(2,
                                                                 -1).t()[-64:]
    tail_dx = dx.view(-1, 2)[-64:] if layout == 'rows' else dx.view(
        2, -1).t()[-64:]
    xhat = (tail_x - mean) * invstd
    err = compare(tail_y, xhat, torch.float16, torch.float32)
    assert not err, f'output: {err}'
    a = scale.double()
    want_dx = invstd * (tail_dy - a * (sdy + xhat * sdyx))
    err = compare(tail_dx, want_dx, torch.float16, torch.float32)
    assert not err, f'grad_input: {err}'


# --------------------------------------------------------------------------
# Last: two processes (the slowest test, and the likeliest to hang); the GPU
# check's per-test results keep everything above when it is cut here.


def test_gloo_available():
    """The distributed test below relies on gloo (CUDA tensors are staged
    through the host)."""
    assert dist.is_available() and dist.is_gloo_available()


def _gloo_worker(rank, world_size, cases):
    torch.cuda.set_device(0)
    failures = []
    for case in cases:
        failures += check_module(case, rank, world_size)
    return failures


def test_gloo_two_processes_one_gpu():
    """Two ranks on one GPU, gloo all_reduce of CUDA tensors."""
    from dist_utils import run_distributed
    cases = [
        ModuleCase((8, 3, 4, 5), splits=[3, 5], seed=201),
        ModuleCase((6, 4, 3, 3),
                   splits=[0, 6],
                   channels_last=True,
                   dtype='float16',
                   act='relu',
                   seed=202),
        ModuleCase((7, 5), splits=[7, 0], dtype='bfloat16', seed=203),
        ModuleCase((4, 2, 3, 2, 2),
                   splits=[2, 2],
                   stats_mode='default',
                   dtype='float64',
                   seed=204),
    ]
    results = run_distributed(_gloo_worker, 2, cases, timeout=240)
    failures = [f for r in results for f in r]
    assert failures == [], '\n'.join(failures[:20])
