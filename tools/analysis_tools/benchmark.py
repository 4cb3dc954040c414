"""Benchmarks MMSyncBN against its peers on the CPU, side by side in one run.

For each shape, layout and dtype it times forward+backward steps of
MMSyncBN, F.batch_norm (the unsynchronized floor), two pure-PyTorch SyncBNs
(one packed all_reduce each way; one of them borrows aten's batch-norm
kernels) and torch.nn.SyncBatchNorm where it runs, interleaved step by step
(medians), at world 1 (one process, all threads) and world 2 (gloo, the
threads split so the total is equal). It prints ratios, the effective
bandwidth of MMSyncBN (8 tensor passes per step) against a measured memory
copy, and the bytes each implementation saves for backward.

Example:
    python tools/analysis_tools/benchmark.py --plot work_dirs/benchmark.png
"""
import argparse
import ctypes
import datetime
import json
import os
import random
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from mmsync.ops import SyncBatchNorm

SHAPES = ((32, 64, 56, 56), (64, 256, 14, 14), (16, 32, 112, 112))
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
PASSES = 8  # x, y, x, dy (stats, output, reduce) + x, dy, dx: 7 reads, 1 w.


def case_parser(description: str) -> argparse.ArgumentParser:
    """The options shared by the CPU benchmarks: which cases, how long."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        '--shapes',
        nargs='+',
        default=['x'.join(map(str, s)) for s in SHAPES],
        help='global batch shapes N x C x H x W (default: %(default)s)')
    parser.add_argument(
        '--dtypes', nargs='+', default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        '--layouts',
        nargs='+',
        default=['nchw', 'channels_last'],
        choices=['nchw', 'channels_last'])
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--steps', type=int, default=25)
    parser.add_argument('--warmup', type=int, default=4)
    return parser


def parse_cases(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parses the command line; ``--shapes`` become tuples of ints."""
    args = parser.parse_args()
    args.shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes]
    return args


def parse_args():
    parser = case_parser(__doc__.split('\n')[0])
    parser.add_argument(
        '--worlds', nargs='+', type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument('--plot', help='write a PNG of the ratios here')
    parser.add_argument('--json', help='write the raw results here')
    return parse_cases(parser)


def shuffled_steps(names, steps: int):
    """Yields (step, names in a new order) for each step.

    The order is seeded, so it is the same on every rank (their collectives
    must pair up): whoever runs first after a given peer inherits its cache
    state, so a fixed order biases the medians.
    """
    order = random.Random(0)
    for step in range(steps):
        shuffled = list(names)
        order.shuffle(shuffled)
        yield step, shuffled


def make_input(shape, layout: str, dtype: torch.dtype,
               generator: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape`` in ``layout`` ('nchw' or
    'channels_last')."""
    x = torch.randn(shape, generator=generator).to(dtype)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def saved_ratio(fn, x: torch.Tensor) -> float:
    """Input-sized tensors that ``fn(x)`` saves for backward besides ``x``,
    in units of the size of ``x`` (measured with saved-tensor hooks)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    extra = sum(t.numel() * t.element_size() for t in saved
                if t is not x and t.numel() >= x.numel())
    return extra / (x.numel() * x.element_size())


def tune_malloc():
    """Keeps large freed blocks in glibc's heap: without it every step's
    large allocations are fresh mmaps and the timing is page-fault bound."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD (the maximum)
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


class PureSyncBNFunction(torch.autograd.Function):
    """A straightforward SyncBN in PyTorch ops: sum and sum of squares,
    one packed float64 all_reduce each way."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, world):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.numel() // xf.size(1)
        packed = torch.cat([
            xf.sum(dims).double(), (xf * xf).sum(dims).double(),
            torch.tensor([float(count)], dtype=torch.float64)
        ])
        if world > 1:
            dist.all_reduce(packed)
        C = x.size(1)
        n = packed[-1]
        mean = packed[:C] / n
        var = packed[C:2 * C] / n - mean * mean
        invstd = torch.rsqrt(var + eps).float()
        mean = mean.float()
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, n.float())
        ctx.world = world
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        dyf = dy.float()
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        packed = torch.cat([dyf.sum(dims), (dyf * xhat).sum(dims)])
        if ctx.world > 1:
            dist.all_reduce(packed)
        C = x.size(1)
        sum_dy, sum_dy_xhat = packed[:C], packed[C:]
        dx = (dyf - (sum_dy / n).view(shape) - xhat *
              (sum_dy_xhat / n).view(shape)) * (invstd * weight).view(shape)
        return (dx.to(x.dtype), sum_dy_xhat / ctx.world, sum_dy / ctx.world,
                None, None)


class AtenSyncBNFunction(torch.autograd.Function):
    """A pure-PyTorch SyncBN that borrows aten's batch-norm kernels: local
    statistics from batch_norm_update_stats, the output from eval-mode
    batch_norm with the global statistics, sum(dy) and sum(dy * xhat) from
    native_batch_norm_backward; one packed all_reduce each way."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, world):
        C = x.size(1)
        count = x.numel() // C
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean, var = mean.double(), var.double()
        packed = torch.cat([
            count * mean, count * (var + mean * mean),
            torch.tensor([float(count)], dtype=torch.float64)
        ])
        if world > 1:
            dist.all_reduce(packed)
        n = packed[-1]
        gmean = packed[:C] / n
        gvar = packed[C:2 * C] / n - gmean * gmean
        gmean, gvar = gmean.float(), gvar.float()
        y = torch.batch_norm(x, weight, bias, gmean, gvar, False, 0.0, eps,
                             False)
        invstd = torch.rsqrt(gvar + eps)
        ctx.save_for_backward(x, weight, gmean, invstd, n.float())
        ctx.world = world
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mean, invstd, True, 0.0,
            [False, True, True])
        packed = torch.cat([sum_dy.float(), sum_dy_xhat.float()])
        if ctx.world > 1:
            dist.all_reduce(packed)
        C = x.size(1)
        sum_dy, sum_dy_xhat = packed[:C], packed[C:]
        k = (weight * invstd).view(shape)
        xmu = x - mean.view(shape).to(x.dtype)
        dx = (dy - (sum_dy / n).view(shape).to(dy.dtype) - xmu *
              (invstd * invstd * sum_dy_xhat / n).view(shape).to(x.dtype)) * k
        return (dx.to(x.dtype), sum_dy_xhat / ctx.world, sum_dy / ctx.world,
                None, None)


def make_impls(C, world, x):
    """name -> callable(x) for every peer that runs here."""
    weight = torch.rand(C) + 0.5
    bias = torch.randn(C)
    w1 = weight.clone().requires_grad_()
    b1 = bias.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    b2 = bias.clone().requires_grad_()
    running = (torch.zeros(C), torch.ones(C))
    mmsync_bn = SyncBatchNorm(C, stats_mode='N')
    impls = {
        'MMSyncBN':
        mmsync_bn,
        'F.batch_norm':
        lambda t: F.batch_norm(t, running[0], running[1], w1, b1, True, 0.1),
        'PureSyncBN':
        lambda t: PureSyncBNFunction.apply(t, w2, b2, 1e-5, world),
        'AtenSyncBN':
        lambda t: AtenSyncBNFunction.apply(t, w2, b2, 1e-5, world),
    }
    torch_sbn = nn.SyncBatchNorm(C)
    try:
        torch_sbn(x.detach()[:2].clone().requires_grad_()).sum().backward()
        impls['torch.SyncBatchNorm'] = torch_sbn
    except (RuntimeError, ValueError) as e:
        impls['torch.SyncBatchNorm'] = str(e).split('\n')[0][:60]
    return impls


def median_ms(times):
    return statistics.median(times) * 1e3


def time_config(shape, layout, dtype, world, rank, steps, warmup):
    """Median forward+backward ms of every implementation, interleaved."""
    N, C = shape[0], shape[1]
    local = (N // world, ) + tuple(shape[1:])
    gen = torch.Generator().manual_seed(rank)
    x = make_input(local, layout, dtype, gen).requires_grad_()
    dy = make_input(local, layout, dtype, gen)
    impls = make_impls(C, world, x)
    runnable = {k: v for k, v in impls.items() if callable(v)}
    times = {k: [] for k in runnable}
    src = torch.empty_like(x).copy_(x)
    dst = torch.empty_like(src)
    copy_times = []
    for step, names in shuffled_steps(runnable, warmup + steps):
        for name in names:
            fn = runnable[name]
            if world > 1:
                dist.barrier()
            x.grad = None
            t0 = time.perf_counter()
            fn(x).backward(dy)
            elapsed = time.perf_counter() - t0
            if step >= warmup:
                times[name].append(elapsed)
        t0 = time.perf_counter()
        dst.copy_(src)
        if step >= warmup:
            copy_times.append(time.perf_counter() - t0)
    result = {k: median_ms(v) for k, v in times.items()}
    result.update({k: v for k, v in impls.items() if not callable(v)})
    result['copy_ms'] = median_ms(copy_times)
    result['bytes'] = x.numel() * x.element_size()
    return result


def saved_bytes(shape, layout, dtype):
    """Bytes each implementation saves for backward beyond its input."""
    small = (4, ) + tuple(shape[1:])
    x = make_input(small, layout, dtype, torch.Generator().manual_seed(0))
    x.requires_grad_()
    return {
        name: saved_ratio(fn, x)
        for name, fn in make_impls(shape[1], 1, x).items() if callable(fn)
    }


def run_world(rank, world, args, threads, port, queue):
    tune_malloc()
    torch.set_num_threads(threads)
    if world > 1:
        os.environ['MASTER_ADDR'] = '127.0.0.1'
        os.environ['MASTER_PORT'] = str(port)
        dist.init_process_group(
            'gloo',
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120))
    rows = []
    for shape in args.shapes:
        for layout in args.layouts:
            for dtype_name in args.dtypes:
                res = time_config(shape, layout, DTYPES[dtype_name], world,
                                  rank, args.steps, args.warmup)
                res.update(
                    shape='x'.join(map(str, shape)),
                    layout=layout,
                    dtype=dtype_name,
                    world=world)
                rows.append(res)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(world, args):
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    threads = max(1, args.threads // world)
    port = free_port()
    procs = [
        ctx.Process(
            target=run_world, args=(r, world, args, threads, port, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join(timeout=60)
    return rows


def report(rows, args):
    """Prints the table and the checks of the targets; returns the rows."""
    floor = {
        (r['shape'], r['layout'], r['dtype']): r['F.batch_norm']
        for r in rows if r['world'] == 1
    }
    names = [
        'MMSyncBN', 'F.batch_norm', 'PureSyncBN', 'AtenSyncBN',
        'torch.SyncBatchNorm'
    ]
    print(f'\nforward+backward ms per step (median of {args.steps}, '
          'interleaved); ratio = ms / F.batch_norm at world 1 on the same '
          'total batch')
    header = (f'{"world":>5} {"shape":>16} {"layout":>13} {"dtype":>8} ' +
              ' '.join(f'{n:>19}' for n in names) +
              f' {"MMSyncBN GB/s":>13} {"copy GB/s":>9} {"of copy":>7}')
    print(header)
    for r in rows:
        base = floor.get((r['shape'], r['layout'], r['dtype']))
        cells = []
        for n in names:
            v = r.get(n)
            if isinstance(v, float):
                ratio = f'({v / base:.2f}x)' if base else ''
                cells.append(f'{v:>10.2f}{ratio:>9}')
            else:
                cells.append(f'{"n/a":>19}')
        bw = PASSES * r['bytes'] / (r['MMSyncBN'] * 1e-3) / 1e9
        copy_bw = 2 * r['bytes'] / (r['copy_ms'] * 1e-3) / 1e9
        r['mmsync_gbps'], r['copy_gbps'] = bw, copy_bw
        print(f'{r["world"]:>5} {r["shape"]:>16} {r["layout"]:>13} '
              f'{r["dtype"]:>8} ' + ' '.join(cells) +
              f' {bw:>13.1f} {copy_bw:>9.1f} {bw / copy_bw:>7.0%}')
    for r in rows:
        for n in names:
            if isinstance(r.get(n), str):
                print(f'n/a: {n} at world {r["world"]}: {r[n]}')
                break
    print('\nMMSyncBN vs the best pure-PyTorch SyncBN (speed-up), world 2:')
    for r in rows:
        if r['world'] == 2:
            best = min(r['PureSyncBN'], r['AtenSyncBN'])
            print(f'  {r["shape"]:>16} {r["layout"]:>13} {r["dtype"]:>8}: '
                  f'{best / r["MMSyncBN"]:.2f}x')
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    floor = {
        (r['shape'], r['layout'], r['dtype']): r['F.batch_norm']
        for r in rows if r['world'] == 1
    }
    names = ['MMSyncBN', 'PureSyncBN', 'AtenSyncBN', 'torch.SyncBatchNorm']
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True, squeeze=False)
    for ax, world in zip(axes[0], (1, 2)):
        sel = [r for r in rows if r['world'] == world]
        labels = [f'{r["shape"]}\n{r["layout"]} {r["dtype"]}' for r in sel]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [
                r[n] / floor[(r['shape'], r['layout'], r['dtype'])]
                if isinstance(r.get(n), float) else 0 for r in sel
            ]
            ax.bar([j + i * width for j in range(len(sel))],
                   vals,
                   width,
                   label=n)
        ax.axhline(1.0, color='k', lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_xticklabels(labels, rotation=60, fontsize=7)
        ax.set_title(f'world {world}: fwd+bwd time / F.batch_norm (world 1)')
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f'plot written to {path}')


def main():
    args = parse_args()
    tune_malloc()
    memory = saved_bytes(args.shapes[0], 'nchw', torch.float32)
    rows = []
    for world in args.worlds:
        rows += run(world, args)
    report(rows, args)
    print('\nsaved for backward beyond the input, in input-sized tensors '
          f'(shape {args.shapes[0]}, float32): ' +
          ', '.join(f'{k} {v:.2f}' for k, v in memory.items()))
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(rows, args.plot)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(rows=rows, saved=memory), f, indent=1)


if __name__ == '__main__':
    main()
