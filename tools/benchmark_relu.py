"""Measures what MMSyncBN's fused ReLU saves, side by side in one run.

For each shape, layout and dtype it times forward+backward steps (one
process, interleaved step by step, medians) of MMSyncBN(act='relu'),
MMSyncBN followed by F.relu, and F.batch_norm followed by F.relu, and counts
the bytes each saves for backward beyond its input. Fusing removes the
ReLU's read and write of the output in forward, its read of the output and
gradient in backward and its saved output (one input-sized tensor).

Example:
    python tools/benchmark_relu.py --shapes 32x64x56x56
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from benchmark import DTYPES, SHAPES, median_ms, tune_malloc

from mmsync.ops import SyncBatchNorm


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--shapes',
        nargs='+',
        default=['x'.join(map(str, s)) for s in SHAPES],
        help='batch shapes N x C x H x W (default: %(default)s)')
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
    args = parser.parse_args()
    args.shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes]
    return args


def make_impls(C):
    """name -> callable(x): the fused layer and the two unfused pairs."""
    fused = SyncBatchNorm(C, act='relu')
    unfused = SyncBatchNorm(C)
    weight = torch.ones(C, requires_grad=True)
    bias = torch.zeros(C, requires_grad=True)
    running = (torch.zeros(C), torch.ones(C))
    return {
        "MMSyncBN(act='relu')":
        fused,
        'MMSyncBN + F.relu':
        lambda t: F.relu(unfused(t)),
        'F.batch_norm + F.relu':
        lambda t: F.relu(
            F.batch_norm(t, running[0], running[1], weight, bias, True)),
    }


def make_input(shape, layout, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def saved_ratio(fn, x):
    """Input-sized tensors saved for backward besides the input, in units
    of the input's size."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    extra = sum(t.numel() * t.element_size() for t in saved
                if t is not x and t.numel() >= x.numel())
    return extra / (x.numel() * x.element_size())


def time_config(shape, layout, dtype, steps, warmup):
    x = make_input(shape, layout, dtype).requires_grad_()
    dy = make_input(shape, layout, dtype, seed=1)
    impls = make_impls(shape[1])
    times = {name: [] for name in impls}
    for step in range(warmup + steps):
        for name, fn in impls.items():
            x.grad = None
            t0 = time.perf_counter()
            fn(x).backward(dy)
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
    small = make_input((4, ) + shape[1:], layout, dtype).requires_grad_()
    return {
        name: (median_ms(times[name]), saved_ratio(fn, small))
        for name, fn in impls.items()
    }


def main():
    args = parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    names = list(make_impls(1))
    print(f'torch {torch.__version__}, {args.threads} threads, '
          f'cpu kernels: {torch.ops.mmsync.cpu_capability()}; '
          'forward+backward ms (median), ratio to the fused layer, '
          'input-sized tensors saved beyond the input')
    header = f'{"shape":>16} {"layout":>13} {"dtype":>8}'
    for name in names:
        header += f' | {name:>25}'
    print(header)
    for shape in args.shapes:
        for layout in args.layouts:
            for dtype_name in args.dtypes:
                res = time_config(shape, layout, DTYPES[dtype_name],
                                  args.steps, args.warmup)
                fused_ms = res[names[0]][0]
                line = (f'{"x".join(map(str, shape)):>16} {layout:>13} '
                        f'{dtype_name:>8}')
                for name in names:
                    ms, saved = res[name]
                    line += (f' | {ms:7.2f} ms {ms / fused_ms:5.2f}x '
                             f'saved {saved:3.1f}')
                print(line, flush=True)


if __name__ == '__main__':
    main()
