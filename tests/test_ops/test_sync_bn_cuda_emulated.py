"""The CUDA kernels and launchers of sync_bn, run by a CPU emulation of CUDA.

CI has no GPU, so ``cuda_emulation/`` compiles ``sync_bn_cuda.cu`` and the
kernel templates with the host compiler (``<<<>>>`` launches rewritten to an
emulator that runs every CUDA thread as a fiber, with real barriers and warp
shuffles in a seeded random order) and registers the ops as
``torch.ops.mmsync_emu.*`` for CPU tensors. The tests compare them with
``F.batch_norm`` in float64 over the concatenated batch, and check that every
kernel instance the launchers can choose has run.

What this cannot show: speed, memory-model effects beyond barriers (the
emulator is sequentially consistent), 64-bit indexing past 2^31 elements,
grids past 65535 channels, and the nvcc code generation itself;
``test_sync_bn_cuda.py`` checks those on a GPU.
"""
import math
import re
import sys

import pytest
import torch
from sync_bn_cuda_cases import (VMAX, OpCase, geometries, run_case,
                                stats_case_failures)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith('linux'),
    reason='the CUDA emulation uses ucontext fibers (Linux only)')

DTYPES = ('float32', 'float16', 'bfloat16', 'float64')
DTYPES_T = {
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
    'float64': torch.float64
}
PARAM_DTYPES = ('float32', 'float64', 'float16', 'bfloat16')
CPP = {
    'float32': 'float',
    'float16': 'Half',
    'bfloat16': 'BFloat16',
    'float64': 'double'
}


@pytest.fixture(scope='module')
def emu():
    sys.path.insert(0, __file__.rsplit('/', 1)[0] + '/cuda_emulation')
    try:
        import emu_build
    finally:
        sys.path.pop(0)
    ops = emu_build.build()
    ops.emu_config(4, 1)
    ops.emu_trace()
    return ops


def _check(emu, case, sms=3, seed=1):
    emu.emu_config(sms, seed)
    failures = run_case(emu, case, 'cpu')
    assert failures == [], '\n'.join(failures)


@pytest.mark.parametrize('dtype', DTYPES)
def test_kernel_variants(emu, dtype):
    """Every vector width and layout path of every op, one rank."""
    for name, shape, layout in geometries(dtype):
        _check(
            emu,
            OpCase(
                shape,
                layout=layout,
                dtype=dtype,
                relu=True,
                name=f'{name},{dtype}'))


@pytest.mark.parametrize(
    'options', [
        dict(),
        dict(relu=True),
        dict(affine=False),
        dict(affine=False, relu=True),
        dict(momentum=None),
        dict(running=False),
        dict(by_count=False),
        dict(splits=[2, 0, 3]),
        dict(splits=[0, 5]),
        dict(splits=[1, 1, 1, 2], relu=True),
        dict(by_count=False, splits=[0, 5, 0]),
        dict(offset=1e4),
        dict(offset=1e4, dtype='float64'),
        dict(offset=1e4, layout='channels_last'),
        dict(finalize_dtype='float32'),
        dict(dtype='float16', finalize_dtype='float32'),
    ],
    ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()) or 'plain')
def test_options(emu, options):
    shape = (5, 4, 3, 4) if 'layout' not in options else (5, 8, 3, 4)
    _check(emu, OpCase(shape, seed=7, **options))


@pytest.mark.parametrize('dtype', ('float32', 'float16'))
@pytest.mark.parametrize('layout', ('contiguous', 'channels_last'))
def test_split_grids(emu, dtype, layout):
    """Channels reduced by several blocks, merged in float64 afterwards."""
    shape = (16, 2, 32, 32) if layout == 'contiguous' else (64, 16, 8, 8)
    emu.emu_config(4, 2)
    emu.emu_trace()
    failures = run_case(
        emu,
        OpCase(shape, layout=layout, dtype=dtype, relu=True,
               offset=100.0), 'cpu')
    trace = emu.emu_trace()
    assert failures == [], '\n'.join(failures)
    assert 'stats_merge_kernel' in trace and 'reduce_merge_kernel' in trace


def test_channel_tiles(emu):
    """ROWS with more channel vectors than one block holds."""
    _check(emu, OpCase((6, 1032), relu=True), sms=2)
    _check(emu, OpCase((3, 1030, 2, 1), layout='channels_last'), sms=2)


@pytest.mark.parametrize('dtype, params', [
    ('float32', 'float16'),
    ('float32', 'bfloat16'),
    ('float32', 'float64'),
    ('float16', 'float16'),
    ('bfloat16', 'bfloat16'),
    ('float64', 'float32'),
])
@pytest.mark.parametrize('sums_float64', (False, True))
def test_parameter_and_sum_dtypes(emu, dtype, params, sums_float64):
    """weight / bias in any float dtype (read as they are by the channel
    tables of the elementwise passes) and the group's sums in float64."""
    for layout in ('contiguous', 'channels_last'):
        _check(
            emu,
            OpCase((6, 8, 3, 5),
                   layout=layout,
                   dtype=dtype,
                   relu=True,
                   param_dtype=params,
                   sums_float64=sums_float64,
                   seed=5))


def test_rows_reductions_tile_wide_rows(emu):
    """ROWS reductions at large C: blocks of 32 channel vectors by 8 rows,
    so that 512 channels make 4 channel tiles (of 4 row splits here) rather
    than many row splits; the partials merged by blocks of 32 channels by 8
    split lanes in a fixed order: bitwise equal under any schedule."""
    outs = []
    for seed in (1, 77):
        emu.emu_trace()
        _check(emu, OpCase((256, 512), relu=True, offset=10.0), 4, seed)
        trace = emu.emu_trace()
        for kernel in ('stats_rows_kernel', 'reduce_rows_kernel'):
            launches = re.findall(
                rf'{kernel}<[^>]*> grid=\((\d+),(\d+)\) '
                r'block=\((\d+),(\d+)\)', trace)
            assert launches and all(
                (x, y, bx, by) == ('4', '4', '32', '8')
                for x, y, bx, by in launches), (kernel, trace)
        for kernel in ('stats_merge_kernel', 'reduce_merge_kernel'):
            assert re.search(rf'{kernel}<[^>]*> grid=\(16,1\) block=\(32,8\)',
                             trace), (kernel, trace)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(256, 512, generator=gen) + 3
        dy = torch.randn(256, 512, generator=gen)
        stats = emu.sync_bn_forward_stats(x, True)
        mean, invstd, _ = emu.sync_bn_forward_finalize(stats, None, None, None,
                                                       0.1, 1e-5, 256, True,
                                                       torch.float64)
        outs.append((stats,
                     emu.sync_bn_backward_reduce(dy, x, mean, invstd, None,
                                                 None, False)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_empty_batch_everywhere(emu):
    """All ranks empty: zero statistics, no running-stat update."""
    emu.emu_config(3, 1)
    x = torch.empty(0, 3, 4, 4)
    stats = emu.sync_bn_forward_stats(x, True)
    assert torch.equal(stats, torch.zeros(11, dtype=torch.float64))
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd, scale = emu.sync_bn_forward_finalize(stats, rm, rv,
                                                       torch.tensor(1), 0.1,
                                                       1e-5, 0, True,
                                                       torch.float64)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(invstd, torch.full((3, ), 1e-5).double().rsqrt())
    assert scale.item() == 0.0
    assert emu.sync_bn_forward_output(x, mean, invstd, None, None,
                                      False).shape == x.shape
    sums = emu.sync_bn_backward_reduce(x, x, mean, invstd, None, None, True)
    assert torch.equal(sums, torch.zeros(6))
    assert emu.sync_bn_backward_data(x, x, mean, invstd, None, None, sums,
                                     scale, True).shape == x.shape


@pytest.mark.parametrize(
    'run_dtype', (torch.float32, torch.float64, torch.float16, torch.bfloat16))
@pytest.mark.parametrize('contiguous', (True, False))
def test_finalize_running_dtypes(emu, run_dtype, contiguous):
    """Running stats of any float dtype, contiguous or not, updated in place
    from float64 exactly as the CPU op does."""
    import mmsync.ops  # noqa: F401  (the CPU ops are the reference here)
    emu.emu_config(3, 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 7, generator=gen) * 3 + 1
    stats = emu.sync_bn_forward_stats(x, True)
    results = []
    for ops in (emu, torch.ops.mmsync):
        base = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
        rm = base[:, 0].to(run_dtype)
        rv = (base[:, 1].abs() + 0.5).to(run_dtype)
        if contiguous:
            rm, rv = rm.contiguous(), rv.contiguous()
        out = ops.sync_bn_forward_finalize(stats, rm, rv, torch.tensor(4),
                                           None, 1e-5, 42, True, torch.float64)
        results.append((out, rm, rv))
    (out_e, rm_e, rv_e), (out_c, rm_c, rv_c) = results
    assert rm_e.dtype == run_dtype and rv_e.dtype == run_dtype
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm_e, rm_c, rtol=0, atol=0)
    torch.testing.assert_close(rv_e, rv_c, rtol=0, atol=0)


def test_deterministic_under_any_schedule(emu):
    """Fixed-order reductions: bitwise equal results whatever the order in
    which the emulator runs threads between barriers."""
    outs = []
    for seed in (1, 99):
        emu.emu_config(4, seed)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(16, 2, 32, 32, generator=gen)
        dy = torch.randn(16, 2, 32, 32, generator=gen)
        stats = emu.sync_bn_forward_stats(x, True)
        mean, invstd, scale = emu.sync_bn_forward_finalize(
            stats, None, None, None, 0.1, 1e-5, 16 * 32 * 32, True,
            torch.float64)
        sums = emu.sync_bn_backward_reduce(dy, x, mean, invstd, None, None,
                                           False)
        dx = emu.sync_bn_backward_data(dy, x, mean, invstd, None, None, sums,
                                       scale, False)
        outs.append((stats, sums, dx))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_block_counts_stay_exact(emu):
    """More than 2^22 values of a channel in one block would make float32
    counts inexact: the launcher splits such channels."""
    emu.emu_config(1, 1)
    emu.emu_trace()
    x = torch.randn(1, 8, (1 << 22) + 4) + 3.0
    failures = stats_case_failures(emu, x, True)
    trace = emu.emu_trace()
    assert failures == [], failures
    grid = re.search(r'stats_planar_kernel<[^>]*> grid=\((\d+),(\d+)\)', trace)
    assert grid and int(grid.group(1)) >= 2, trace


def _instances(trace):
    """Kernel template instances in an emulator trace."""
    names = set()
    for line in trace.splitlines():
        m = re.match(r'void mmsync::cuda::(\w+)<([^>]*)>', line)
        if m:
            args = ','.join(a.strip().replace('c10::', '')
                            for a in m.group(2).split(','))
            names.add(f'{m.group(1)}<{args}>')
    return names


def test_every_kernel_instance_runs(emu):
    """The matrix above reaches every kernel the launchers can pick."""
    emu.emu_config(4, 5)
    emu.emu_trace()
    for dtype in DTYPES:
        for name, shape, layout in geometries(dtype):
            run_case(emu, OpCase(shape, layout=layout, dtype=dtype), 'cpu')
        for layout, shape in (('contiguous', (16, 2, 32, 32)),
                              ('channels_last', (64, 2 * VMAX[dtype], 8, 8))):
            run_case(emu, OpCase(shape, layout=layout, dtype=dtype), 'cpu')
        run_case(emu, OpCase((5, 3, 4), dtype=dtype, finalize_dtype='float32'),
                 'cpu')
    for dtype in ('float32', 'float64'):
        for params in PARAM_DTYPES:
            for sums_float64 in (False, True):
                run_case(
                    emu,
                    OpCase((5, 3, 4),
                           dtype=dtype,
                           param_dtype=params,
                           sums_float64=sums_float64), 'cpu')
    for run in ('float16', 'bfloat16'):
        x = torch.randn(4, 3, 5)
        stats = emu.sync_bn_forward_stats(x, True)
        for out in (torch.float32, torch.float64):
            emu.sync_bn_forward_finalize(stats,
                                         torch.zeros(3).to(DTYPES_T[run]),
                                         torch.ones(3).to(DTYPES_T[run]), None,
                                         0.1, 1e-5, 20, True, out)
    ran = _instances(emu.emu_trace())
    want = set()
    for dtype in DTYPES:
        t, vmax = CPP[dtype], VMAX[dtype]
        acc = 'double' if dtype == 'float64' else 'float'
        widths = sorted({vmax, max(vmax // 2, 1), 1})
        for v in widths:
            for k in ('stats_planar_kernel', 'stats_rows_kernel',
                      'reduce_planar_kernel', 'reduce_rows_kernel',
                      'output_rows_kernel', 'data_rows_kernel'):
                want.add(f'{k}<{t},{acc},{v}>')
        for v in sorted({vmax, 1}):
            for k in ('output_planar_kernel', 'data_planar_kernel'):
                want.add(f'{k}<{t},{acc},{v}>')
    for acc in ('float', 'double'):
        for param in ('float', 'double', 'Half', 'BFloat16'):
            want.add(f'channel_table_kernel<{acc},{param},{acc},false>')
            want.add(f'channel_table_kernel<{acc},{param},{acc},true>')
            want.add(f'channel_table_kernel<{acc},{param},double,true>')
        want.add(f'stats_merge_kernel<{acc}>')
        want.add(f'reduce_merge_kernel<{acc}>')
        for run in ('float', 'double', 'Half', 'BFloat16'):
            want.add(f'finalize_kernel<{acc},{run}>')
    missing = sorted(want - ran)
    assert missing == [], f'kernel instances never run: {missing}'


def _widths(trace, kernel):
    """Vector widths V of ``kernel<..., V>`` launches in an emulator trace."""
    return {int(v) for v in re.findall(rf'{kernel}<[^>]*,\s*(\d+)>', trace)}


def test_non_contiguous_2d_takes_rows_path(emu):
    """A 2-D input with strided channels is copied to contiguous (N, C):
    rows of C channels, read by the ROWS kernels, not planes of 1 value."""
    emu.emu_config(3, 1)
    emu.emu_trace()
    _check(emu, OpCase((6, 8), layout='strided', relu=True))
    trace = emu.emu_trace()
    assert 'stats_rows_kernel' in trace and 'data_rows_kernel' in trace
    assert 'planar_kernel' not in trace, trace


@pytest.mark.parametrize('channels, width', [(16, 8), (12, 4), (6, 1), (7, 1)])
def test_16_bit_vector_widths(emu, channels, width):
    """float16 ROWS kernels read 8, 4 or 1 values at once: the widest of
    those that divides C (no 2-wide choice that runs as 1)."""
    emu.emu_config(3, 1)
    emu.emu_trace()
    _check(emu, OpCase((5, channels), dtype='float16'))
    trace = emu.emu_trace()
    for kernel in ('stats_rows_kernel', 'output_rows_kernel',
                   'reduce_rows_kernel', 'data_rows_kernel'):
        assert _widths(trace, kernel) == {width}, (kernel, trace)


def _plane_vectors(S, V):
    """Aligned V-vectors inside every plane of S elements, whatever its
    offset: at most V - gcd(S, V) elements precede the first."""
    before = V - math.gcd(S, V)
    return (S - before) // V if S > before else 0


def _planar_launches(trace, kernel):
    """(V, grid.x, grid.y) of each ``kernel`` launch in an emulator trace."""
    return [(int(v), int(x), int(y)) for v, x, y in re.findall(
        rf'{kernel}<[^>]*,\s*(\d+)> grid=\((\d+),(\d+)\)', trace)]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', [(3, 5, 7, 7), (2, 3, 13, 13), (4, 6, 3, 3),
                                   (3, 4, 5, 5)])
def test_odd_planes_read_vectors(emu, dtype, shape):
    """Planes of an odd size (7x7, 13x13 in ResNets' last stages) are read
    as 16-byte vectors in their aligned interior and element by element at
    their edges, whatever the plane's offset."""
    emu.emu_trace()
    _check(emu, OpCase(shape, dtype=dtype, relu=True, offset=10.0))
    trace = emu.emu_trace()
    # Ranks' slices start anywhere (vectors where they are aligned).
    _check(emu,
           OpCase(shape, dtype=dtype, relu=True, splits=[1, 0, shape[0] - 1]))
    S, vmax = shape[2] * shape[3], VMAX[dtype]
    want = next((v for v in (vmax, vmax // 2)
                 if v > 1 and 2 * _plane_vectors(S, v) * v >= S), 1)
    for kernel in ('stats_planar_kernel', 'reduce_planar_kernel'):
        assert {v for v, _, _ in _planar_launches(trace, kernel)} == {want}
    if S >= 49:
        assert want == vmax


@pytest.mark.parametrize(
    'shape, dtype, tile',
    [
        ((2, 64, 7, 7), 'float32', 8),  # 32 loads a channel: a warp each
        ((8, 16, 13, 13), 'float16', 4),  # 232 loads: 64 threads each
        ((8, 10, 16, 16), 'float32', 2),  # 512 loads: 128 threads
        ((16, 10, 16, 16), 'float32', 1),  # 1024: the whole block
    ])
def test_reduction_block_sized_from_the_channel(emu, shape, dtype, tile):
    """Few values a channel: one block reduces kThreads / group channels at
    once, group threads (32..256) each, sized from N * S per channel."""
    emu.emu_config(4, 3)
    emu.emu_trace()
    _check(emu, OpCase(shape, dtype=dtype, relu=True), sms=4)
    trace = emu.emu_trace()
    C = shape[1]
    for kernel in ('stats_planar_kernel', 'reduce_planar_kernel'):
        launches = _planar_launches(trace, kernel)
        assert launches and all(y == -(-C // tile)
                                for _, _, y in launches), (kernel, trace)


@pytest.mark.parametrize('dtype', ('float16', 'float64'))
def test_odd_planes_split_over_blocks(emu, dtype):
    """A channel of many odd planes split over blocks: each block's vectors
    and edge elements start mid-plane and the partials merge in float64."""
    emu.emu_config(4, 2)
    emu.emu_trace()
    _check(
        emu,
        OpCase((16, 2, 33, 33), dtype=dtype, relu=True, offset=100.0),
        sms=4)
    trace = emu.emu_trace()
    launches = _planar_launches(trace, 'stats_planar_kernel')
    assert launches and all(x >= 2 for _, x, _ in launches), trace
    assert 'stats_merge_kernel' in trace and 'reduce_merge_kernel' in trace
