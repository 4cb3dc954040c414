"""Measures what MMSyncBN's fused ReLU saves, side by side in one run.

For each shape, layout and dtype it times forward+backward steps (one
process, interleaved step by step in a new seeded order, medians) of
MMSyncBN(act='relu'), MMSyncBN followed by F.relu, and F.batch_norm
followed by F.relu, and counts the bytes each saves for backward beyond its
input. Fusing removes the
ReLU's read and write of the output in forward, its read of the output and
gradient in backward and its saved output (one input-sized tensor).

Example:
    python tools/analysis_tools/benchmark_relu.py --shapes 32x64x56x56
"""
import time

import torch
import torch.nn.functional as F
from benchmark import (DTYPES, case_parser, make_input, median_ms, parse_cases,
                       saved_ratio, shuffled_steps, tune_malloc)

from mmsync.ops import SyncBatchNorm


def parse_args():
    return parse_cases(case_parser(__doc__.split('\n')[0]))


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


def time_config(shape, layout, dtype, steps, warmup):
    gen = torch.Generator().manual_seed(0)
    x = make_input(shape, layout, dtype, gen).requires_grad_()
    dy = make_input(shape, layout, dtype, gen)
    impls = make_impls(shape[1])
    times = {name: [] for name in impls}
    for step, names in shuffled_steps(impls, warmup + steps):
        for name in names:
            fn = impls[name]
            x.grad = None
            t0 = time.perf_counter()
            fn(x).backward(dy)
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
    small = make_input((4, ) + shape[1:], layout, dtype, gen).requires_grad_()
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
