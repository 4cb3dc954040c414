"""The Python steps of ``tools/gpu_check/gpu_check.sh``, one sub-command each.

* ``plan``: the caps of the steps (``caps``) and the table that shows they
  fit the budget and the call;
* ``install WHEELS SITE``: installs into SITE the carried wheels whose
  distribution this Python lacks;
* ``registered``: imports mmsync and checks that every op has a CUDA kernel;
* ``sanitize``: small training steps that reach every kernel family, for
  compute-sanitizer (memcheck, initcheck);
* ``graph``: captures a training step of MMSyncBN in a CUDA graph as its
  very first call (no warm-up), replays it on new data and compares with an
  eager step of an identical layer;
* ``record STATE NAME RC SECONDS CAP``: the step's status (pass, FAIL,
  timeout, unavailable, no-gpu, deferred, blocked) from its exit code and
  log, appended to STATE/steps.tsv;
* ``pending STATE`` / ``deselect STATE``: what a follow-up call still has
  to run (steps; pytest arguments that skip the tests that have results);
* ``summary STATE`` and ``verdict STATE``: the table of every step and
  number, and whether the check passed.

Also a pytest plugin (``-p gpu_check``): with GPU_CHECK_TESTS set, each
test's outcome is appended to that file as the test ends.

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

OPS = ('sync_bn_forward_stats', 'sync_bn_forward_finalize',
       'sync_bn_forward_output', 'sync_bn_backward_reduce',
       'sync_bn_backward_data')
NO_GPU = 3
# The steps in order and their caps in seconds on the GPU machine; the
# benchmark's is its least: it takes what is left.
PLAN = (('install', 15), ('build', 190), ('registered', 15), ('memcheck', 40),
        ('initcheck', 40), ('tests', 100), ('graph', 15), ('benchmark', 20))
SANITIZERS = ('memcheck', 'initcheck')
# Statuses after which a follow-up has nothing to do for the step.
FINAL = ('pass', 'FAIL', 'unavailable', 'no-gpu', 'skipped')
# What compute-sanitizer prints where it cannot instrument this device or
# runtime (KINDS.md saw the first on gVisor).
REFUSED = ('Device not supported', 'device not supported',
           'Unable to find injection library', 'not supported on this',
           'Target application terminated before first instrumented API call',
           'Could not attach', 'CUDA_ERROR_NOT_SUPPORTED')
# Sanitizer cases: (shape, dtype, channels_last, the paths they reach). On
# an H200 (132 SMs) the split ones launch the merge kernels.
SANITIZE_CASES = (
    ((4, 8, 13, 13), 'float16', False, 'PLANAR odd planes: vectors + edges'),
    ((2, 4, 40000), 'float32', False, 'PLANAR split over blocks + merges'),
    ((64, 16, 16, 16), 'float32', True, 'ROWS split over blocks + merges'),
    ((64, 16, 16, 16), 'bfloat16', True, 'ROWS split, 8-wide bfloat16'),
    ((8, 2056), 'float32', False, 'ROWS channel tiles (514 vectors)'),
    ((8, 16, 8, 8), 'float64', False, 'PLANAR float64'),
    ((64, 24), 'float64', False, 'ROWS float64, 2-wide'),
)


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
    """One training step (with the fused ReLU) per SANITIZE_CASES entry."""
    _need_gpu()
    import torch

    from mmsync.ops import SyncBatchNorm
    torch.manual_seed(0)
    for shape, dtype, channels_last, what in SANITIZE_CASES:
        dt = getattr(torch, dtype)
        layer = SyncBatchNorm(shape[1], act='relu').cuda()
        if dt == torch.float64:
            layer = layer.double()
        x = torch.randn(shape, device='cuda', dtype=dt)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        _step(layer, x, torch.randn_like(x))
        torch.cuda.synchronize()
        print(f'gpu_check: sanitize case {shape} {dtype}'
              f"{' channels_last' if channels_last else ''}: {what}")
    print(f'gpu_check: sanitize cases ran ({len(SANITIZE_CASES)})')


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


# ---------------------------------------------------------------------------
# The pytest plugin: one line per test as it ends.


def pytest_runtest_logreport(report):
    path = os.environ.get('GPU_CHECK_TESTS')
    if not path:
        return
    if report.when == 'call':
        outcome = report.outcome
    elif report.when == 'setup' and report.outcome != 'passed':
        outcome = 'skipped' if report.skipped else 'error'
    elif report.when == 'teardown' and report.failed:
        outcome = 'error'
    else:
        return
    with open(path, 'a', encoding='utf-8') as f:
        f.write(f'{report.nodeid}\t{outcome}\t{report.duration:.2f}\n')


# ---------------------------------------------------------------------------
# Statuses, the follow-up and the summary, from the files in STATE.


def _read(path: str) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def _steps(state: str) -> dict:
    """name -> (rc, seconds, cap, status, note): the latest row of each."""
    steps = {}
    for line in _read(os.path.join(state, 'steps.tsv')).splitlines():
        row = (line.split('\t') + [''] * 6)[:6]
        steps[row[0]] = tuple(row[1:])
    return steps


def _tests(state: str) -> dict:
    """nodeid -> (outcome, seconds): the latest result of each test."""
    tests = {}
    for line in _read(os.path.join(state, 'tests.tsv')).splitlines():
        parts = line.split('\t')
        if len(parts) == 3:
            tests[parts[0]] = (parts[1], parts[2])
    return tests


def _count(tests: dict) -> dict:
    counts = {}
    for outcome, _ in tests.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _sanitizer_status(log: str, rc: int, rehearsal: bool):
    m = re.search(r'ERROR SUMMARY: (\d+) error', log)
    errors = int(m.group(1)) if m else None
    refused = next(
        (line.strip().lstrip('= ')
         for line in log.splitlines() if any(p in line for p in REFUSED)),
        None)
    ran = 'gpu_check: sanitize cases ran' in log
    if ran and errors == 0 and rc == 0:
        return 'pass', '0 errors in ' + re.search(
            r'sanitize cases ran \((\d+)', log).group(1) + ' cases'
    if errors and (ran or not refused):
        return 'FAIL', f'{errors} errors (the first lines name the kernel)'
    if refused:
        return 'unavailable', refused[:200]
    if 'gpu_check: no CUDA GPU' in log:
        if rehearsal:
            return 'no-gpu', 'the cases reached "no CUDA GPU"'
        return 'FAIL', ('no GPU under compute-sanitizer and no known '
                        'refusal message: see the log')
    if rc in (124, 137):
        return 'timeout', ''
    return 'FAIL', f'no ERROR SUMMARY (rc {rc})'


def _tests_status(state: str, rc: int, rehearsal: bool):
    tests = _tests(state)
    counts = _count(tests)
    text = ', '.join(f'{n} {k}' for k, n in sorted(counts.items()))
    text = text or 'no result'
    bad = counts.get('failed', 0) + counts.get('error', 0)
    if rc in (124, 137):
        return 'timeout', f'{text} when cut (the rest: follow-up)'
    if rehearsal:
        if tests and set(counts) == {'skipped'} and rc == 0:
            return 'no-gpu', f'{text}, as without a GPU they must'
        return 'FAIL', f'{text} (rc {rc}): without a GPU all must skip'
    if rc in (0, 1) and tests and not bad and not counts.get('skipped'):
        return 'pass', text
    if rc in (0, 1) and tests:
        return 'FAIL', text + (' (a skip on a GPU hides a broken build)'
                               if counts.get('skipped') else '')
    return 'FAIL', f'{text} (pytest rc {rc})'


def _benchmark_cases(state: str) -> int:
    try:
        with open(os.path.join(state, 'benchmark_cuda.json')) as f:
            b = json.load(f)
    except (OSError, ValueError):
        return 0
    return sum(len(b.get(k, [])) for k in ('kernels', 'steps', 'passes'))


def _last(log: str) -> str:
    """The log's last line that says something: why a step failed."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:160] if lines else 'no output'


def status_of(state: str, name: str, rc: int, rehearsal: bool):
    """(status, note) of step NAME that exited with rc."""
    log = _read(os.path.join(state, f'{name}.log'))
    if name in SANITIZERS:
        return _sanitizer_status(log, rc, rehearsal)
    if name == 'tests':
        return _tests_status(state, rc, rehearsal)
    timed_out = rc in (124, 137)
    if name == 'benchmark':
        cases = _benchmark_cases(state)
        if timed_out:
            return 'timeout', f'{cases} cases measured when cut'
        if rehearsal and 'benchmark_cuda: no CUDA GPU' in log:
            return 'no-gpu', 'imported mmsync, reached "no CUDA GPU"'
        return ('pass', f'{cases} cases') if rc == 0 else ('FAIL', _last(log))
    if rc == NO_GPU and 'gpu_check: no CUDA GPU' in log:
        return ('no-gpu', '') if rehearsal else ('FAIL', 'no CUDA GPU')
    if timed_out:
        return 'timeout', ''
    return ('pass', '') if rc == 0 else ('FAIL', _last(log))


def record(state, name, rc, secs, cap, status, note, rehearsal) -> int:
    """Appends the step's row; exit 0 when later steps may rely on it."""
    if status is None:
        status, auto = status_of(state, name, int(rc), rehearsal)
        note = note or auto
    with open(os.path.join(state, 'steps.tsv'), 'a', encoding='utf-8') as f:
        f.write(f'{name}\t{rc}\t{secs}\t{cap}\t{status}\t{note}\n')
    print(f'gpu_check: {name}: {status}' + (f' ({note})' if note else ''))
    return 0 if status in ('pass', 'no-gpu', 'unavailable', 'skipped') else 1


def pending(state: str) -> list:
    """Steps a follow-up runs: cut, deferred, never recorded, or blocked
    behind one of those."""
    steps = _steps(state)
    todo = []
    for name, _ in PLAN:
        status = steps[name][3] if name in steps else ''
        if status not in FINAL and (status != 'blocked' or todo):
            todo.append(name)
    return todo


def deselect(state: str) -> list:
    return [f'--deselect={nodeid}' for nodeid in _tests(state)]


def plan(caps: dict, budget: int, call: int, summary_s: int) -> list:
    """Lines that show the caps, their sum, the budget and the call."""
    total = sum(caps.values()) + summary_s
    lines = [
        'gpu_check plan (seconds, in order; the benchmark takes what is '
        'left, at least its cap, else it waits for the follow-up):'
    ]
    lines += [f'  {name:<11} {cap:>5}' for name, cap in caps.items()]
    lines.append(f'  {"summary":<11} {summary_s:>5}')
    fits = total <= budget < call
    lines.append(f'  total {total} s of a {budget} s budget, inside the '
                 f"call's {call} s (margin {call - total} s): "
                 f"{'fits' if fits else 'DOES NOT FIT'}")
    return lines


def _ptxas(log: str) -> str:
    regs = [int(r) for r in re.findall(r'Used (\d+) registers', log)]
    if not regs:
        return 'no ptxas report'
    frames = {}
    for name, frame in re.findall(
            r'Function properties for (\S+)\n\s*(\d+) bytes stack frame', log):
        if int(frame):
            frames[name] = max(frames.get(name, 0), int(frame))
    spills = sorted(
        set(
            re.findall(r'(\d+ bytes spill stores, \d+ bytes spill loads)',
                       log)) - {'0 bytes spill stores, 0 bytes spill loads'})
    stack = 'none'
    if frames:
        top = max(frames, key=frames.get)
        stack = (f'{len(frames)} functions, max {frames[top]} bytes '
                 f'({top[:60]})')
    return (f'{len(regs)} kernels, max {max(regs)} registers; stack frames: '
            f"{stack}; spills: {'; '.join(spills) or 'none'}")


def _benchmark(state: str) -> list:
    try:
        with open(os.path.join(state, 'benchmark_cuda.json')) as f:
            b = json.load(f)
    except (OSError, ValueError):
        return [('  results', 'none')]
    rows = [('  copy', f"{b['copy_gbs']:.0f} GB/s")]
    for k in b.get('kernels', []):
        times = ', '.join(f'{name} {ms * 1e3:.1f} us'
                          for name, ms in k['kernel_ms'].items())
        rows.append(
            (f"  kernels {k['shape']} {k['dtype']} {k['layout']}", times))
    steps = b.get('steps', [])
    if steps:
        ratios = [s['graph_ratio'] for s in steps]
        slower = [
            f"{s['shape']} {s['dtype']} {s['layout']} x{s['graph_ratio']:.2f}"
            for s in steps if s['graph_ratio'] > 1.0
        ]
        rows.append(('  step vs native', f'{len(steps)} cases, graph ratio '
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


def summary(state: str, only: str = '') -> None:
    """Prints one row per step (status, seconds of its cap, note) and every
    number; a step with no row reads "not run"."""
    if only == 'ptxas':
        print('gpu_check: ptxas:',
              _ptxas(_read(os.path.join(state, 'build.log'))))
        return
    steps = _steps(state)

    def row(name):
        if name not in steps:
            return 'not run'
        rc, secs, cap, status, note = steps[name]
        return (f'{status}, {secs} s of {cap} s' +
                (f', rc {rc}' if rc not in ('0', '-') else '') +
                (f': {note}' if note else ''))

    rows = [
        ('device',
         _read(os.path.join(state, 'device.txt')).strip().replace('\n', '; ')
         or 'unknown'), ('commit', os.environ.get('MMSYNC_COMMIT', 'unknown'))
    ]
    for name, _ in PLAN:
        rows.append((name, row(name)))
        if name == 'build':
            rows.append(
                ('  ptxas', _ptxas(_read(os.path.join(state, 'build.log')))))
        if name == 'memcheck' and 'sanitize_cases' in steps:
            rows.append(('  sanitize cases', row('sanitize_cases')))
        if name == 'tests':
            tests = _tests(state)
            bad = [
                n.split('::', 1)[-1] for n, (o, _) in tests.items()
                if o in ('failed', 'error')
            ]
            if bad:
                rows.append(
                    ('  failed', ', '.join(bad[:12]) +
                     (f' (+{len(bad) - 12})' if len(bad) > 12 else '')))
        if name == 'graph':
            m = re.search(r'max abs differences: (.*)',
                          _read(os.path.join(state, 'graph.log')))
            if m:
                rows.append(('  differences', m.group(1)))
    rows += _benchmark(state)
    todo = pending(state)
    rows.append(('left for the follow-up', ' '.join(todo) or 'nothing'))
    width = max(len(k) for k, _ in rows)
    print('\n'.join(['-' * 78] + [f'{k:<{width}} | {v}'
                                  for k, v in rows] + ['-' * 78]))


def _expected(name: str, rehearsal: bool) -> tuple:
    """The statuses step NAME may end with in a check that passes."""
    if name == 'install':
        return ('pass', 'skipped')
    if name in ('build', 'registered'):
        return ('pass', )
    if name in SANITIZERS:
        return ('no-gpu' if rehearsal else 'pass', 'unavailable')
    return ('no-gpu' if rehearsal else 'pass', )


def verdict(state: str, rehearsal: bool) -> int:
    """0 when every step passed (a sanitizer may be unavailable) or, in the
    rehearsal, every GPU step reached "no CUDA GPU"."""
    steps = _steps(state)
    names = [name for name, _ in PLAN]
    if 'sanitize_cases' in steps:
        names.append('sanitize_cases')
    bad = [
        f'{name} {steps[name][3] if name in steps else "not run"}'
        for name in names if name not in steps
        or steps[name][3] not in _expected(name, rehearsal)
    ]
    print('gpu_check: ' +
          ('all steps as expected' if not bad else 'not as expected: ' +
           ', '.join(bad)))
    return 0 if not bad else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('install')
    p.add_argument('wheels')
    p.add_argument('site')
    for name in ('registered', 'sanitize', 'graph'):
        sub.add_parser(name)
    p = sub.add_parser('caps')
    p.add_argument('--build', type=int)
    p = sub.add_parser('plan')
    p.add_argument('caps', nargs='+', help='name=seconds, in order')
    p.add_argument('--budget', type=int, required=True)
    p.add_argument('--call', type=int, required=True)
    p.add_argument('--summary', type=int, required=True)
    p = sub.add_parser('record')
    for a in ('state', 'name', 'rc', 'secs', 'cap'):
        p.add_argument(a)
    p.add_argument('--status')
    p.add_argument('--note', default='')
    p.add_argument('--rehearsal', action='store_true')
    for name in ('pending', 'deselect'):
        sub.add_parser(name).add_argument('state')
    p = sub.add_parser('summary')
    p.add_argument('state')
    p.add_argument('--only', default='')
    p = sub.add_parser('verdict')
    p.add_argument('state')
    p.add_argument('--rehearsal', action='store_true')
    args = parser.parse_args()
    if args.cmd == 'install':
        install(args.wheels, args.site)
    elif args.cmd == 'caps':
        for name, cap in PLAN:
            print(name, args.build if name == 'build' and args.build else cap)
    elif args.cmd == 'plan':
        caps = dict(c.split('=') for c in args.caps)
        print('\n'.join(
            plan({
                k: int(v)
                for k, v in caps.items()
            }, args.budget, args.call, args.summary)))
    elif args.cmd == 'record':
        sys.exit(
            record(args.state, args.name, args.rc, args.secs, args.cap,
                   args.status, args.note, args.rehearsal))
    elif args.cmd in ('pending', 'deselect'):
        for line in globals()[args.cmd](args.state):
            print(line)
    elif args.cmd == 'summary':
        summary(args.state, args.only)
    elif args.cmd == 'verdict':
        sys.exit(verdict(args.state, args.rehearsal))
    else:
        globals()[args.cmd]()


if __name__ == '__main__':
    main()
