"""The Python steps of ``tools/gpu_check.sh``, one sub-command each.

* ``install WHEELS SITE``: installs into SITE the carried wheels whose
  distribution this Python lacks (a full image keeps its own numpy, PyYAML,
  pytest; a bare Python + torch gets them all);
* ``registered``: imports mmsync and checks that every op has a CUDA kernel;
* ``sanitize``: one small training step per kernel family, for
  compute-sanitizer (memcheck, racecheck, synccheck);
* ``graph``: captures a training step of MMSyncBN in a CUDA graph as its
  very first call (no warm-up), replays it on new data and compares with an
  eager step of an identical layer;
* ``verdict OUT [--rehearsal]``: whether the CUDA tests ran (on a GPU: all
  passed, none skipped) or, in the rehearsal, all skipped with no failure;
* ``summary OUT``: the table of every step's result and number, from the
  logs in OUT (also when a step left nothing: that row says so).

Exit status 3 means "no CUDA GPU here", which the rehearsal expects.
"""
import argparse
import copy
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

OPS = ('sync_bn_forward_stats', 'sync_bn_forward_finalize',
       'sync_bn_forward_output', 'sync_bn_backward_reduce',
       'sync_bn_backward_data')
NO_GPU = 3


def _need_gpu():
    import torch
    if not torch.cuda.is_available():
        print('gpu_check: no CUDA GPU (torch.cuda.is_available() is False)')
        sys.exit(NO_GPU)


def install(wheels: str, site: str) -> None:
    """pip-installs (no index, no deps) the wheels of missing packages."""
    missing = []
    for path in sorted(glob.glob(os.path.join(wheels, '*.whl'))):
        name = os.path.basename(path).split('-')[0]
        try:
            importlib.metadata.version(name)
            print(f'gpu_check: {name} is installed, {path} not needed')
        except importlib.metadata.PackageNotFoundError:
            missing.append(path)
    if not missing:
        return
    print('gpu_check: installing',
          ' '.join(os.path.basename(p) for p in missing))
    subprocess.check_call([
        sys.executable, '-m', 'pip', 'install', '-q', '--no-index',
        '--no-deps', '--no-compile', '--no-cache-dir', '--upgrade', '--target',
        site
    ] + missing)


def registered() -> None:
    """Every device op of mmsync._ext has its CPU and its CUDA kernel.

    The ops are those the import registered under ``mmsync::`` (OPS must be
    among them); one without a CPU kernel (a catch-all such as
    cpu_capability) is device-independent. Also run by .ci/cuda_env.sh.
    """
    import torch

    import mmsync
    import mmsync.ops  # noqa: F401
    print(f'gpu_check: mmsync from {mmsync.__file__}, torch '
          f'{torch.__version__}, CUDA {torch.version.cuda}')
    ops = sorted(
        name.split('::', 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith('mmsync::'))
    device_ops = [
        op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(
            f'mmsync::{op}', 'CPU')
    ]
    missing = [f'{op}/CPU' for op in OPS if op not in device_ops] + [
        f'{op}/CUDA' for op in device_ops if not torch._C.
        _dispatch_has_kernel_for_dispatch_key(f'mmsync::{op}', 'CUDA')
    ]
    if missing:
        print('gpu_check: kernels not registered:', ', '.join(missing))
        sys.exit(1)
    print(f'gpu_check: CPU and CUDA kernels registered for '
          f'{len(device_ops)} ops: {", ".join(device_ops)}')


def _step(layer, x, dy):
    y = layer(x)
    y.backward(dy)
    return y


def sanitize() -> None:
    """Small steps that reach every kernel family: PLANAR (odd plane, split
    channels: merge kernels), ROWS (channels_last, 2-D), float16 and
    float32, at world 1."""
    _need_gpu()
    import torch

    from mmsync.ops import SyncBatchNorm
    torch.manual_seed(0)
    cases = (((4, 8, 13, 13), torch.float16, False), ((8, 16, 8, 8),
                                                      torch.float32, True),
             ((64, 24), torch.float32, False), ((2, 4, 40000), torch.float32,
                                                False))
    for shape, dtype, channels_last in cases:
        layer = SyncBatchNorm(shape[1], act='relu').cuda()
        x = torch.randn(shape, device='cuda', dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        _step(layer, x, torch.randn_like(x))
    torch.cuda.synchronize()
    print('gpu_check: sanitize cases ran')


def graph() -> None:
    """A training step captured as the layer's first call, replayed on new
    data, equals an eager step of a copy of the layer."""
    _need_gpu()
    import torch

    from mmsync.ops import SyncBatchNorm
    torch.manual_seed(0)
    layer = SyncBatchNorm(32, act='relu').cuda()
    twin = copy.deepcopy(layer)
    x = torch.randn(16, 32, 12, 12, device='cuda', requires_grad=True)
    dy = torch.randn_like(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = _step(layer, x, dy)
    with torch.no_grad():
        x.copy_(torch.randn_like(x) * 3 + 1)
        dy.copy_(torch.randn_like(dy))
    g.replay()
    torch.cuda.synchronize()
    x_eager = x.detach().clone().requires_grad_()
    y_eager = _step(twin, x_eager, dy)
    checks = {
        'output': (y, y_eager),
        'grad_input': (x.grad, x_eager.grad),
        'grad_weight': (layer.weight.grad, twin.weight.grad),
        'running_var': (layer.running_var, twin.running_var),
    }
    # One capture ran no kernel and one replay ran each once: the running
    # stats saw one step in both.
    diffs = {k: (a - b).abs().max().item() for k, (a, b) in checks.items()}
    print('gpu_check: graph replay vs eager, max abs differences:',
          json.dumps(diffs))
    if any(d != 0.0 for d in diffs.values()):
        sys.exit(1)


def _read(path: str) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def _steps(out: str) -> dict:
    """name -> (rc, seconds, note) from OUT/steps.tsv."""
    steps = {}
    for line in _read(os.path.join(out, 'steps.tsv')).splitlines():
        name, rc, secs, note = (line.split('\t') + ['', '', ''])[:4]
        steps[name] = (rc, secs, note)
    return steps


def _ptxas(log: str) -> str:
    regs = [int(r) for r in re.findall(r'Used (\d+) registers', log)]
    spills = sorted(
        set(
            re.findall(r'(\d+ bytes spill stores, \d+ bytes spill loads)',
                       log)) - {'0 bytes spill stores, 0 bytes spill loads'})
    if not regs:
        return 'no ptxas report'
    return (f'{len(regs)} kernels, max {max(regs)} registers, spills: '
            f"{'; '.join(spills) or 'none'}")


def _junit(out: str):
    """(passed, failed, errors, skipped, seconds) of OUT/tests.xml, or
    None."""
    try:
        root = ET.parse(os.path.join(out, 'tests.xml')).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == 'testsuite' else root.find('testsuite')
    n = [int(suite.get(k, 0)) for k in ('failures', 'errors', 'skipped')]
    return (int(suite.get('tests', 0)) - sum(n), *n, suite.get('time', '?'))


def _tests(out: str) -> str:
    n = _junit(out)
    if n is None:
        return 'no result'
    return (f'{n[0]} passed, {n[1]} failed, {n[2]} errors, {n[3]} skipped '
            f'in {n[4]} s')


def verdict(out: str, rehearsal: bool) -> None:
    """Exits 1 unless the CUDA tests ran as they must here: on a GPU every
    test passed (a skip there hides a broken build); without one, every
    test skipped and none failed or errored (collection included)."""
    n = _junit(out)
    ok = n is not None and n[1] == 0 and n[2] == 0 and (
        n[0] == 0 and n[3] > 0 if rehearsal else n[0] > 0 and n[3] == 0)
    print(f"gpu_check: CUDA tests {_tests(out)}: "
          f"{'as expected' if ok else 'NOT as expected'}")
    sys.exit(0 if ok else 1)


def _sanitizer(out: str, tool: str) -> str:
    log = _read(os.path.join(out, f'sanitizer_{tool}.log'))
    m = re.search(r'ERROR SUMMARY: (\d+) error', log)
    if m:
        return f'{m.group(1)} errors'
    m = re.search(r'RACECHECK SUMMARY: (\d+) hazard', log)
    if m:
        return f'{m.group(1)} hazards'
    return 'no result'


def _benchmark(out: str) -> list:
    try:
        with open(os.path.join(out, 'benchmark_cuda.json')) as f:
            b = json.load(f)
    except (OSError, ValueError):
        return [('  results', 'no result')]
    rows = [('copy', f"{b['copy_gbs']:.0f} GB/s")]
    steps = b.get('steps', [])
    if steps:
        ratios = [s['graph_ratio'] for s in steps]
        slower = [
            f"{s['shape']} {s['dtype']} {s['layout']} x{s['graph_ratio']:.2f}"
            for s in steps if s['graph_ratio'] > 1.0
        ]
        rows.append(('step vs native', f'{len(steps)} cases, graph ratio '
                     f'{min(ratios):.2f}..{max(ratios):.2f}; slower: '
                     f"{', '.join(slower) or 'none'}"))
        rows += [
            (f"  {s['shape']} {s['dtype']} {s['layout']}",
             f"{s['mmsync_graph_ms']:.4f} ms vs {s['native_graph_ms']:.4f}"
             f" ms (x{s['graph_ratio']:.2f}), eager "
             f"x{s['eager_ratio']:.2f}") for s in steps
        ]
    for p in b.get('passes', []):
        rows.append(
            (f"  passes {p['dtype']} {p['layout']}",
             ', '.join(f"{k} {p[f'{k}_of_copy']:.2f}"
                       for k in ('stats', 'output', 'reduce', 'data')) +
             f" of copy; step {p['step_passes']:.1f} passes; "
             f"host-sync free {p['host_sync_free']}"))
    return rows


def summary(out: str) -> None:
    """Prints (and writes to OUT/summary.txt) one row per step and number."""
    steps = _steps(out)

    def status(name):
        if name not in steps:
            return 'not run'
        rc, secs, note = steps[name]
        return f'rc {rc}, {secs} s' + (f', {note}' if note else '')

    rows = [
        ('device',
         _read(os.path.join(out, 'device.txt')).strip().replace('\n', '; ')
         or 'unknown'), ('commit', os.environ.get('MMSYNC_COMMIT', 'unknown'))
    ]
    rows.append(('build', status('build')))
    rows.append(('  ptxas', _ptxas(_read(os.path.join(out, 'build.log')))))
    rows.append(('registered', status('registered')))
    rows.append(('tests', status('tests')))
    rows.append(('  results', _tests(out)))
    for tool in ('memcheck', 'racecheck', 'synccheck'):
        rows.append(
            (f'sanitizer {tool}',
             status(f'sanitizer_{tool}') + '; ' + _sanitizer(out, tool)))
    graph_line = re.search(r'max abs differences: (.*)',
                           _read(os.path.join(out, 'graph.log')))
    rows.append(('graph capture', status('graph') + '; ' +
                 (graph_line.group(1) if graph_line else 'no result')))
    rows.append(('benchmark', status('benchmark')))
    rows += _benchmark(out)
    width = max(len(k) for k, _ in rows)
    text = '\n'.join(['-' * 78] + [f'{k:<{width}} | {v}'
                                   for k, v in rows] + ['-' * 78])
    print(text)
    with open(os.path.join(out, 'summary.txt'), 'w', encoding='utf-8') as f:
        f.write(text + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('install')
    p.add_argument('wheels')
    p.add_argument('site')
    for name in ('registered', 'sanitize', 'graph'):
        sub.add_parser(name)
    sub.add_parser('summary').add_argument('out')
    p = sub.add_parser('verdict')
    p.add_argument('out')
    p.add_argument('--rehearsal', action='store_true')
    args = parser.parse_args()
    if args.cmd == 'install':
        install(args.wheels, args.site)
    elif args.cmd == 'verdict':
        verdict(args.out, args.rehearsal)
    elif args.cmd == 'summary':
        summary(args.out)
    else:
        globals()[args.cmd]()


if __name__ == '__main__':
    main()
