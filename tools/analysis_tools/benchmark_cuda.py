"""Benchmarks MMSyncBN's CUDA kernels against torch's native batch norm.

Everything is measured side by side in one process on one GPU (world 1, so
no collective runs), with CUDA events and medians:

1. copy: the device-to-device copy bandwidth of a 1 GiB tensor (bytes read
   plus bytes written), the ceiling of every pass below;
2. kernels: the device time of each kernel of the five ops (torch's
   profiler) at ResNet-50 shapes chosen to isolate the suspected slow paths
   (KERNEL_CASES), with each op's bandwidth against the copy;
3. step: forward+backward of MMSyncBN against ``nn.BatchNorm2d`` (cuDNN or
   ATen) for the issue's shapes, float16 / bfloat16 / float32, NCHW and
   channels_last. Each step is timed from CUDA-graph replays (GPU time) and
   eagerly (what a Python loop sees); every replay walks through enough
   input sets to leave the L2 cache;
4. passes: the effective bandwidth of each MMSyncBN kernel on >= 256 MB
   tensors against the copy, the whole step expressed in full-tensor passes
   at copy speed (target <= 8; mmcv's design needs 13), the kernels one step
   launches, and a check that a step never synchronizes with the host
   (``torch.cuda.set_sync_debug_mode('error')``).

The tables are printed last; ``--json`` writes every number, after each
case, and ``--resume`` skips the cases that file already holds (the GPU
check's follow-up call finishes a cut run).

Example:
    python tools/analysis_tools/benchmark_cuda.py --json work_dirs/benchmark_cuda.json
"""
import argparse
import json
import os
import statistics
import subprocess

import torch
import torch.nn as nn

from mmsync.ops import SyncBatchNorm

SHAPES = ((32, 64, 56, 56), (64, 256, 14, 14), (16, 32, 112, 112), (32, 2048,
                                                                    7, 7))
DTYPES = {
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
    'float32': torch.float32
}
LAYOUTS = ('nchw', 'channels_last')
# (shape, dtype, layout, what it isolates): the paths a review suspected.
KERNEL_CASES = (
    ((32, 64, 56, 56), 'float16', 'channels_last',
     'C = 64 ROWS: a reduction of few channels ends in its merge'),
    ((32, 256, 56, 56), 'float16', 'channels_last',
     'fp16 ROWS 8-wide kernels: 1-2 rows of 16 B in flight per thread'),
    ((32, 2048, 7, 7), 'float16', 'channels_last',
     'C = 2048, small N*HW ROWS: partials of split rows'),
    ((32, 2048, 7, 7), 'float16', 'nchw',
     '7x7 planes: the flat passes change channel every vector'),
    ((32, 512, 28, 28), 'bfloat16', 'channels_last',
     'bf16 ROWS at a middle stage'),
    ((32, 256, 56, 56), 'float32', 'nchw', 'float32 PLANAR, large planes'),
)
# Bytes of one step touched by each pass, in units of the input's size.
PASS_BYTES = {'stats': 1, 'output': 2, 'reduce': 2, 'data': 3}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--shapes', nargs='+', default=['x'.join(map(str, s)) for s in SHAPES])
    parser.add_argument(
        '--dtypes', nargs='+', default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        '--layouts', nargs='+', default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument(
        '--big-numel',
        type=int,
        default=2**27,
        help='elements of the pass-bandwidth tensors '
        '(default 2^27: 256 MB in 16 bits)')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--reps', type=int, default=20)
    parser.add_argument('--json', help='write all results here')
    parser.add_argument(
        '--resume',
        action='store_true',
        help='keep the cases the --json file holds, measure the rest')
    args = parser.parse_args()
    args.shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes]
    return args


def fmt_of(layout, dim=4):
    if layout == 'channels_last':
        return torch.channels_last if dim == 4 else torch.channels_last_3d
    return torch.contiguous_format


def event_ms(fn, reps):
    """Median over `reps` of fn's GPU time, each between two events."""
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(reps):
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written."""
    src = torch.randn(2**28, device='cuda')
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = event_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / ms / 1e6


class Impl:
    """A layer stepped over `sets` input sets (to leave the L2 cache)."""

    def __init__(self, name, layer, xs, dys):
        self.name, self.layer, self.xs, self.dys = name, layer, xs, dys

    def step_all(self):
        # autograd.grad, not backward: no leaf .grad accumulation (an extra
        # full-tensor add that a network's hidden activations never pay).
        params = (self.layer.weight, self.layer.bias)
        for x, dy in zip(self.xs, self.dys):
            torch.autograd.grad(self.layer(x), (x, ) + params, dy)

    def capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step_all()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step_all()


def make_inputs(shape, dtype, layout, sets):
    gen = torch.Generator(device='cuda').manual_seed(0)
    xs, dys = [], []
    for _ in range(sets):
        x = torch.randn(shape, device='cuda', dtype=dtype, generator=gen)
        x = (x * 2 + 0.5).contiguous(memory_format=fmt_of(layout))
        x.requires_grad_()
        dy = torch.randn(shape, device='cuda', dtype=dtype, generator=gen)
        xs.append(x)
        dys.append(dy.contiguous(memory_format=fmt_of(layout)))
    return xs, dys


def time_step(shape, dtype, layout, args):
    """Per-step ms of MMSyncBN and native BN, graph-replayed and eager."""
    C = shape[1]
    nbytes = torch.tensor([], dtype=dtype).element_size()
    for n in shape:
        nbytes *= n
    # Enough input sets (x, dy, y, dx each) to exceed a 60 MB L2 twice.
    sets = max(2, min(16, -(-(120 << 20) // (4 * nbytes))))
    xs, dys = make_inputs(shape, dtype, layout, sets)
    impls = [
        Impl('mmsync',
             SyncBatchNorm(C).cuda(), xs, dys),
        Impl('native',
             nn.BatchNorm2d(C).cuda(), xs, dys),
    ]
    for impl in impls:
        impl.capture()
    graph, eager = {i.name: [] for i in impls}, {i.name: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:  # interleaved, so drifts hit both
            graph[impl.name].append(
                event_ms(impl.graph.replay, args.reps) / sets)
            eager[impl.name].append(
                event_ms(impl.step_all, max(2, args.reps // 4)) / sets)
    row = dict(
        shape='x'.join(map(str, shape)),
        dtype=str(dtype)[6:],
        layout=layout,
        sets=sets)
    for impl in impls:
        row[f'{impl.name}_graph_ms'] = statistics.median(graph[impl.name])
        row[f'{impl.name}_eager_ms'] = statistics.median(eager[impl.name])
    row['graph_ratio'] = row['mmsync_graph_ms'] / row['native_graph_ms']
    row['eager_ratio'] = row['mmsync_eager_ms'] / row['native_eager_ms']
    return row


def _kernel_name(name):
    """The short name of a kernel:
    'void mmsync::cuda::k<c10::Half, float, 8>(...)' -> 'k<Half,float,8>'."""
    name = name.split('(')[0].replace('void ', '').replace('c10::', '')
    return name.replace('mmsync::cuda::', '').replace(' ', '')


def op_calls(x, dy, C):
    """The five ops of one step (world 1), each a callable."""
    ops = torch.ops.mmsync
    count = x.numel() // C
    w = torch.rand(C, device=x.device) + 0.5
    b = torch.randn(C, device=x.device)
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    stats = ops.sync_bn_forward_stats(x, True)
    mean, invstd, scale = ops.sync_bn_forward_finalize(stats, rm, rv, None,
                                                       0.1, 1e-5, count, True,
                                                       torch.float64)
    sums = ops.sync_bn_backward_reduce(dy, x, mean, invstd, w, b, True)
    return {
        'stats':
        lambda: ops.sync_bn_forward_stats(x, True),
        'finalize':
        lambda: ops.sync_bn_forward_finalize(stats, rm, rv, None, 0.1, 1e-5,
                                             count, True, torch.float64),
        'output':
        lambda: ops.sync_bn_forward_output(x, mean, invstd, w, b, True),
        'reduce':
        lambda: ops.sync_bn_backward_reduce(dy, x, mean, invstd, w, b, True),
        'data':
        lambda: ops.sync_bn_backward_data(dy, x, mean, invstd, w, b, sums,
                                          scale, True),
    }


def time_kernels(shape, dtype, layout, what, copy_gbs, args):
    """Per-kernel device time (profiler) and per-op bandwidth of one step's
    ops at ``shape``."""
    from torch.profiler import ProfilerActivity, profile
    xs, dys = make_inputs(shape, dtype, layout, 1)
    x, dy = xs[0].detach(), dys[0]
    calls = op_calls(x, dy, shape[1])
    tensor_bytes = x.numel() * x.element_size()
    row = dict(
        shape='x'.join(map(str, shape)),
        dtype=str(dtype)[6:],
        layout=layout,
        what=what,
        op_ms={},
        op_of_copy={},
        kernel_ms={})
    for name, fn in calls.items():
        fn()
        ms = event_ms(fn, args.reps)
        row['op_ms'][name] = ms
        if name in PASS_BYTES:
            gbs = PASS_BYTES[name] * tensor_bytes / ms / 1e6
            row['op_of_copy'][name] = gbs / copy_gbs
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            for fn in calls.values():
                fn()
        torch.cuda.synchronize()
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = _kernel_name(evt.name)
        row['kernel_ms'][name] = (
            row['kernel_ms'].get(name, 0.0) +
            evt.time_range.elapsed_us() / 1e3 / args.reps)
    return row


def big_shape(numel, layout):
    """A 4-D shape of `numel` elements, C = 256."""
    hw = 64
    n = numel // (256 * hw * hw)
    return (n, 256, hw, hw)


def pass_bandwidth(dtype, layout, copy_gbs, args):
    """Effective GB/s of each pass, and the step in full-tensor passes."""
    shape = big_shape(args.big_numel, layout)
    x = torch.randn(shape, device='cuda', dtype=dtype)
    x = x.contiguous(memory_format=fmt_of(layout))
    dy = torch.randn_like(x)
    C = shape[1]
    calls = op_calls(x, dy, C)
    tensor_bytes = x.numel() * x.element_size()
    row = dict(
        dtype=str(dtype)[6:],
        layout=layout,
        shape='x'.join(map(str, shape)),
        mbytes=tensor_bytes / 2**20)
    for name in PASS_BYTES:
        fn = calls[name]
        fn()
        ms = event_ms(fn, args.reps)
        gbs = PASS_BYTES[name] * tensor_bytes / ms / 1e6
        row[f'{name}_ms'] = ms
        row[f'{name}_gbs'] = gbs
        row[f'{name}_of_copy'] = gbs / copy_gbs
    layer = SyncBatchNorm(C).cuda()
    xg = x.detach().requires_grad_()

    def step():
        torch.autograd.grad(layer(xg), (xg, layer.weight, layer.bias), dy)

    step()
    step_ms = event_ms(step, max(3, args.reps // 2))
    # One pass (the tensor read or written once) at the copy's rate, which
    # counts bytes read plus bytes written.
    one_pass_ms = tensor_bytes / copy_gbs / 1e6
    row['step_ms'] = step_ms
    row['step_passes'] = step_ms / one_pass_ms
    row['kernels'] = step_kernels(step)
    row['host_sync_free'] = sync_free(step)
    return row


def step_kernels(step):
    """Name -> count of the CUDA kernels (and memsets) one step launches."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    counts = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name.split('(')[0].replace('void ', '')
        name = name.split('<')[0].replace('mmsync::cuda::', '')
        counts[name] = counts.get(name, 0) + 1
    return counts


def sync_free(step):
    """Whether a step runs under sync debug mode 'error' without raising."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
        ok = True
    except RuntimeError:
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()
    return ok


def commit():
    """MMSYNC_COMMIT (what gpu_check.sh records), else git's HEAD."""
    if os.environ.get('MMSYNC_COMMIT'):
        return os.environ['MMSYNC_COMMIT']
    try:
        return subprocess.check_output(
            ['git', 'rev-parse', '--short', 'HEAD'],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            stderr=subprocess.DEVNULL).decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('benchmark_cuda: no CUDA GPU')
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            'mmsync::sync_bn_forward_stats', 'CUDA'):
        raise SystemExit('benchmark_cuda: mmsync._ext has no CUDA kernels')
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    results = None
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json, encoding='utf-8') as f:
            results = json.load(f)
        print(f"benchmark_cuda: resuming {args.json}: "
              f"{len(results.get('kernels', []))} kernel, "
              f"{len(results['steps'])} step, {len(results['passes'])} "
              'pass cases kept')
    if results is None:
        results = dict(
            info=dict(
                device=props.name,
                sms=props.multi_processor_count,
                torch=torch.__version__,
                cuda=torch.version.cuda,
                commit=commit()),
            copy_gbs=copy_bandwidth(args.reps),
            steps=[],
            passes=[])
    results.setdefault('kernels', [])

    def done(section, **key):
        return any(
            all(r.get(k) == v for k, v in key.items())
            for r in results[section])

    def save():
        # After every case: a run stopped at its deadline keeps what it
        # measured.
        if args.json:
            os.makedirs(
                os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, 'w', encoding='utf-8') as f:
                json.dump(results, f, indent=1)

    save()
    for shape, d, layout, what in KERNEL_CASES:
        key = dict(shape='x'.join(map(str, shape)), dtype=d, layout=layout)
        if not done('kernels', **key):
            results['kernels'].append(
                time_kernels(shape, DTYPES[d], layout, what,
                             results['copy_gbs'], args))
            save()
    for shape in args.shapes:
        for d in args.dtypes:
            for layout in args.layouts:
                key = dict(
                    shape='x'.join(map(str, shape)), dtype=d, layout=layout)
                if not done('steps', **key):
                    results['steps'].append(
                        time_step(shape, DTYPES[d], layout, args))
                    save()
    for d in args.dtypes:
        for layout in args.layouts:
            if not done('passes', dtype=d, layout=layout):
                results['passes'].append(
                    pass_bandwidth(DTYPES[d], layout, results['copy_gbs'],
                                   args))
                save()
    report(results)


def report(results):
    info, copy_gbs = results['info'], results['copy_gbs']
    steps, passes = results['steps'], results['passes']
    print(f"\n{info['device']} ({info['sms']} SMs), torch {info['torch']}, "
          f"CUDA {info['cuda']}, commit {info['commit']}")
    print(f'device-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n')
    if passes:
        print('kernels of one step (MMSyncBN, first pass-bandwidth config):')
        for name, n in sorted(passes[0]['kernels'].items()):
            print(f'  {n:3d} x {name}')
    for k in results['kernels']:
        print(f"\n{k['shape']} {k['dtype']} {k['layout']}: {k['what']}")
        print('  ops, ms (of copy): ' + ', '.join(
            f"{op} {ms:.4f}" +
            (f" ({k['op_of_copy'][op]:.2f})" if op in k['op_of_copy'] else '')
            for op, ms in k['op_ms'].items()))
        for name, ms in k['kernel_ms'].items():
            print(f'  {ms * 1e3:9.1f} us  {name}')
    print('\nforward+backward per step, ms (graph: CUDA-graph replay, '
          'GPU time; eager: Python loop); ratio = mmsync / native')
    head = (f"{'shape':>16} {'dtype':>8} {'layout':>13} {'mmsync':>8} "
            f"{'native':>8} {'ratio':>6} {'eager':>8} {'eager':>8} "
            f"{'ratio':>6}")
    print(head)
    for r in steps:
        print(f"{r['shape']:>16} {r['dtype']:>8} {r['layout']:>13} "
              f"{r['mmsync_graph_ms']:8.4f} {r['native_graph_ms']:8.4f} "
              f"{r['graph_ratio']:6.2f} {r['mmsync_eager_ms']:8.4f} "
              f"{r['native_eager_ms']:8.4f} {r['eager_ratio']:6.2f}")
    print('\neffective bandwidth of each pass / copy bandwidth '
          '(target >= 0.80), whole step in full-tensor passes (<= 8), '
          'host-sync free')
    print(f"{'dtype':>8} {'layout':>13} {'MB':>6} {'stats':>6} "
          f"{'output':>6} {'reduce':>6} {'data':>6} {'passes':>6} "
          f"{'nosync':>6}")
    for r in passes:
        print(f"{r['dtype']:>8} {r['layout']:>13} {r['mbytes']:6.0f} "
              f"{r['stats_of_copy']:6.2f} {r['output_of_copy']:6.2f} "
              f"{r['reduce_of_copy']:6.2f} {r['data_of_copy']:6.2f} "
              f"{r['step_passes']:6.2f} {str(r['host_sync_free']):>6}")


if __name__ == '__main__':
    main()
