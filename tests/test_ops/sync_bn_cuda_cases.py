"""Op-level checks of the sync_bn kernels against a float64 oracle.

Shared by ``test_sync_bn_cuda.py`` (the CUDA ops on a GPU) and
``test_sync_bn_cuda_emulated.py`` (the same CUDA sources run by the CPU
emulation of CUDA). One *step* runs the five ops the way
``SyncBatchNormFunction`` does, for every rank of a split batch, with the
forward all_gather replaced by stacking the ranks' rows and the backward
group sum by a sum, and compares output, grad_input, the reduced
[sum(dy), sum(dy * xhat)], mean / invstd and the running statistics with
``F.batch_norm`` in float64 over the concatenated batch (autograd for the
gradients, ``F.relu`` after it when the ReLU is fused).
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

DTYPES = {
    'float64': torch.float64,
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
}
# Error allowed beyond twice the rounding of the reference to the dtype,
# relative to the reference's magnitude (float32 accumulation of ~1e3..1e6
# terms, and per-channel constants rounded to float32).
FLOOR = {
    'float64': 1e-10,
    'float32': 3e-5,
    'float16': 1e-3,
    'bfloat16': 1e-3,
}

# Elements in a 16-byte vector: the widest load of the CUDA kernels.
VMAX = {'float32': 4, 'float16': 8, 'bfloat16': 8, 'float64': 2}


def geometries(dtype):
    """(name, shape, layout) that select each kernel variant for dtype.

    PLANAR reductions read each plane's aligned interior as vectors of
    VMAX, VMAX/2 or 1 elements: the widest whose vectors cover half of every
    plane (odd planes such as 7x7 too), the edges element by element; the
    flat PLANAR passes
    VMAX unless misaligned (vectors then span planes when S % V != 0); ROWS
    kernels by C % V.
    """
    vmax = VMAX[dtype]
    half = max(vmax // 2, 1)
    out = [
        ('planar-vmax', (5, 3, 4, vmax), 'contiguous'),
        ('planar-odd-S', (5, 3, 5), 'contiguous'),
        ('planar-7x7', (3, 3, 7, 7), 'contiguous'),
        ('planar-misaligned', (4, 3, 2, 3), 'misaligned'),
        ('rows-vmax', (5, 2 * vmax, 2, 3), 'channels_last'),
        ('rows-odd-C', (7, 3), 'contiguous'),
        ('rows-misaligned', (6, 2 * vmax), 'misaligned'),
        ('rows-3d', (3, vmax, 2, 2, 3), 'channels_last'),
        ('strided', (4, 3, 2, 5), 'strided'),
    ]
    if half > 1:
        out += [
            ('planar-vhalf', (5, 3, 3 * half), 'contiguous'),
            ('rows-vhalf', (5, 3 * half), 'contiguous'),
        ]
    return out


@dataclass
class OpCase:
    """A global batch of ``shape`` split across ranks along dim 0."""
    shape: Sequence[int]
    splits: Optional[List[int]] = None  # None: one rank holds everything
    layout: str = 'contiguous'  # or 'channels_last', 'misaligned', 'strided'
    dtype: str = 'float32'
    by_count: bool = True  # stats_mode 'N'
    affine: bool = True
    relu: bool = False
    momentum: Optional[float] = 0.1
    running: bool = True
    offset: float = 0.0
    # What finalize returns mean / invstd / scale in: sync_bn.py asks for
    # float64; the ops accept the accumulate type too.
    finalize_dtype: str = 'float64'
    # weight / bias dtype ('' : the accumulate type, as the module's are for
    # float16 inputs); the backward sums in float64, as a group's are.
    param_dtype: str = ''
    sums_float64: bool = False
    seed: int = 0
    name: str = field(default='')

    def describe(self) -> str:
        if self.name:
            return self.name
        parts = [
            'x'.join(map(str, self.shape)), self.layout, self.dtype,
            'N' if self.by_count else 'default'
        ]
        if self.splits is not None:
            parts.append('splits=' + '+'.join(map(str, self.splits)))
        if not self.affine:
            parts.append('noaffine')
        if self.relu:
            parts.append('relu')
        if self.momentum is None:
            parts.append('cumulative')
        if not self.running:
            parts.append('norunning')
        if self.offset:
            parts.append(f'offset={self.offset:g}')
        if self.finalize_dtype != 'float64':
            parts.append(f'finalize={self.finalize_dtype}')
        if self.param_dtype:
            parts.append(f'params={self.param_dtype}')
        if self.sums_float64:
            parts.append('sums=float64')
        return ','.join(parts)


def _in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (contiguous) with the memory layout the case asks for."""
    if layout == 'contiguous':
        return x.contiguous()
    if layout == 'channels_last':
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == 'misaligned':
        # Contiguous, but one element past a 16-byte boundary: the kernels
        # must fall back from vector loads.
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = buf[1:].view(x.shape)
        view.copy_(x)
        return view
    if layout == 'strided':
        # Neither contiguous nor channels_last: copied once by the ops.
        big = torch.empty(
            x.shape[:-1] + (2 * x.shape[-1], ), dtype=x.dtype, device=x.device)
        view = big[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(layout)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def oracle(x, dy, weight, bias, running, momentum, eps, relu):
    """F.batch_norm (training) in float64 over the whole batch."""
    x = x.double().clone().requires_grad_()
    w = b = None
    if weight is not None:
        w = weight.double().clone().requires_grad_()
        b = bias.double().clone().requires_grad_()
    rm = rv = None
    if running is not None:
        rm, rv = running[0].double().clone(), running[1].double().clone()
    y = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    if relu:
        y = F.relu(y)
    y.backward(dy.double())
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.detach().mean(dims)
    var = x.detach().var(dims, unbiased=False)
    invstd = (var + eps).rsqrt()
    # The backward reduction: g = dy masked by the ReLU, xhat normalized x.
    g = dy.double()
    if relu:
        g = g * (y.detach() > 0)
    xhat = (x.detach() - mean.view(shape)) * invstd.view(shape)
    sums = torch.cat([g.sum(dims), (g * xhat).sum(dims)])
    return dict(
        y=y.detach(),
        dx=x.grad,
        sums=sums,
        mean=mean,
        invstd=invstd,
        running_mean=rm,
        running_var=rv)


def compare(got: torch.Tensor,
            want: torch.Tensor,
            dtype: torch.dtype,
            precision: Optional[torch.dtype] = None) -> str:
    """'' if ``got`` matches ``want``, else what is wrong.

    The tolerance is twice the rounding of ``want`` to ``dtype`` (the dtype
    of ``got``) plus the floor of ``precision`` (the dtype the arithmetic
    ran in, ``dtype`` by default), relative to the magnitude of ``want``.
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return f'shape {tuple(got.shape)} != {tuple(want.shape)}'
    if not torch.isfinite(got).all():
        return 'non-finite values'
    names = {v: k for k, v in DTYPES.items()}
    floor = FLOOR[names[precision or dtype]]
    rounding = _max_err(want.to(dtype), want)
    scale = max(1.0, want.abs().max().item() if want.numel() else 1.0)
    tol = 2 * rounding + floor * scale
    err = _max_err(got, want)
    if not err <= tol:
        return f'max error {err:.3g} > tolerance {tol:.3g}'
    return ''


def run_case(ops, case: OpCase, device: str) -> List[str]:
    """Runs ``case`` with the op namespace ``ops``; returns mismatches."""
    dtype = DTYPES[case.dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(case.seed)
    shape = tuple(case.shape)
    C = shape[1]
    splits = case.splits if case.splits is not None else [shape[0]]
    assert sum(splits) == shape[0]
    eps = 1e-5
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    x64 += case.offset + 0.5
    dy64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    # The oracle sees exactly the (rounded) values the kernels get.
    xq, dyq = x64.to(dtype).double(), dy64.to(dtype).double()
    weight = bias = None
    if case.affine:
        weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        bias = torch.randn(C, generator=gen, dtype=torch.float64) * 0.5
    running = None
    if case.running:
        running = (torch.randn(C, generator=gen, dtype=torch.float64),
                   torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    tracked = 3
    momentum = case.momentum
    eff_momentum = momentum if momentum is not None else 1.0 / tracked

    failures = []

    def fail(what):
        failures.append(f'[{case.describe()}] {what}')

    def expect(what, got, want, dtype_of_got, precision=None):
        err = compare(got, want, dtype_of_got, precision)
        if err:
            fail(f'{what}: {err}')

    to_dev = dict(device=device)
    pdtype = DTYPES[case.param_dtype] if case.param_dtype else acc
    if weight is not None:
        # The oracle sees the parameters as rounded to their dtype.
        weight, bias = weight.to(pdtype).double(), bias.to(pdtype).double()
    w = weight.to(pdtype).to(**to_dev) if weight is not None else None
    b = bias.to(pdtype).to(**to_dev) if bias is not None else None
    # Every rank keeps its own running stats; all must end up equal.
    ranks_running = []
    for _ in splits:
        if running is None:
            ranks_running.append((None, None, None))
        else:
            ranks_running.append(
                (running[0].to(acc, copy=True).to(**to_dev),
                 running[1].to(acc, copy=True).to(**to_dev),
                 torch.tensor(tracked, dtype=torch.long, **to_dev)))

    xs, dys, stats = [], [], []
    offset = 0
    for n in splits:
        xi = _in_layout(x64[offset:offset + n].to(dtype).to(**to_dev),
                        case.layout)
        dyi = _in_layout(dy64[offset:offset + n].to(dtype).to(**to_dev),
                         case.layout)
        offset += n
        xs.append(xi)
        dys.append(dyi)
        stats.append(ops.sync_bn_forward_stats(xi, case.by_count))
    gathered = torch.stack(stats)  # the forward all_gather

    fdtype = DTYPES[case.finalize_dtype]
    results = []
    for xi, (rm, rv, nbt) in zip(xs, ranks_running):
        count = xi.numel() // C if C else 0
        mean, invstd, scale = ops.sync_bn_forward_finalize(
            gathered, rm, rv, nbt, momentum, eps, count, case.by_count, fdtype)
        for what, t in (('mean', mean), ('invstd', invstd), ('scale', scale)):
            if t.dtype != fdtype:
                fail(f'finalize returned {what} as {t.dtype}')
        results.append((mean, invstd, scale))
    sums = []
    for xi, dyi, (mean, invstd, _) in zip(xs, dys, results):
        sums.append(
            ops.sync_bn_backward_reduce(dyi, xi, mean, invstd, w, b,
                                        case.relu))
    total_sums = torch.stack(sums).sum(0)  # the backward group sum
    if case.sums_float64:
        total_sums = total_sums.double()
    ys, dxs = [], []
    for xi, dyi, (mean, invstd, scale) in zip(xs, dys, results):
        y = ops.sync_bn_forward_output(xi, mean, invstd, w, b, case.relu)
        dx = ops.sync_bn_backward_data(dyi, xi, mean, invstd, w, b, total_sums,
                                       scale, case.relu)
        for what, t in (('output', y), ('grad_input', dx)):
            if t.dtype != dtype or t.shape != xi.shape:
                fail(f'{what} is {t.dtype} {tuple(t.shape)}')
            dense = xi.is_contiguous() or xi.movedim(1, -1).is_contiguous()
            if dense and xi.numel() > 0 and t.stride() != xi.stride():
                fail(f'{what} strides {t.stride()} != input {xi.stride()}')
        ys.append(y)
        dxs.append(dx)

    equal = len(set(n for n in splits if n > 0)) <= 1
    if not case.by_count and not equal:
        # 'default' weighs ranks equally: only the consistency between
        # ranks is checked here (the module tests
        # hold its oracle).
        return failures
    ref = oracle(xq, dyq, weight, bias, running, eff_momentum, eps, case.relu)
    if sum(splits) > 0:
        expect('mean', results[0][0], ref['mean'], fdtype, acc)
        expect('invstd', results[0][1], ref['invstd'], fdtype, acc)
        expect('output', torch.cat([y.cpu() for y in ys]), ref['y'], dtype)
        expect('grad_input', torch.cat([d.cpu() for d in dxs]), ref['dx'],
               dtype)
        expect('sums', total_sums, ref['sums'], acc)
        if running is not None:
            for r, (rm, rv, _) in enumerate(ranks_running):
                expect(f'running_mean (rank {r})', rm, ref['running_mean'],
                       acc)
                expect(f'running_var (rank {r})', rv, ref['running_var'], acc)
    for r in range(1, len(splits)):
        for i, what in enumerate(('mean', 'invstd')):
            if not torch.equal(results[r][i], results[0][i]):
                fail(f'{what} differs between rank 0 and rank {r}')
    return failures


def stats_case_failures(ops, x: torch.Tensor, by_count: bool) -> List[str]:
    """The packed statistics row of ``x`` ([w, n, shift, mean - shift, M2])
    against float64 moments."""
    C = x.size(1)
    got = ops.sync_bn_forward_stats(x, by_count).cpu()
    if got.dtype != torch.float64 or got.shape != (3 * C + 2, ):
        return [f'stats is {got.dtype} {tuple(got.shape)}']
    xd = x.double().cpu()
    dims = [0] + list(range(2, x.dim()))
    count = xd.numel() // C if C else 0
    want = torch.zeros(3 * C + 2, dtype=torch.float64)
    mine = got.clone()
    if count > 0:
        want[0] = float(count) if by_count else 1.0
        want[1] = count
        # The shift is one of the channel's values: compare shift + mean.
        mine[2:2 + C] = 0.0
        mine[2 + C:2 + 2 * C] = got[2:2 + C] + got[2 + C:2 + 2 * C]
        want[2 + C:2 + 2 * C] = xd.mean(dims)
        want[2 + 2 * C:] = xd.var(dims, unbiased=False) * count
    scale = max(1.0, want.abs().max().item())
    tol = (1e-12 if x.dtype == torch.float64 else 2e-6) * scale
    err = _max_err(mine, want)
    if not err <= tol:
        return [
            f'stats {tuple(x.shape)} {x.dtype}: max error {err:.3g} > '
            f'{tol:.3g}'
        ]
    return []
