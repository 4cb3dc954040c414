"""The bookkeeping of the GPU check (``tools/gpu_check/gpu_check.py``), which runs here
without a GPU: statuses read from the steps' exit codes and logs (a refused
sanitizer is "unavailable", a step that did not run is never "pass"), what
a follow-up call still runs, the plan's sums and the per-test plugin."""
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO, 'tools', 'gpu_check'))
try:
    import gpu_check
finally:
    sys.path.pop(0)

STEPS = [name for name, _ in gpu_check.PLAN]


def _state(path, rows, logs=None, tests=''):
    """A state folder: steps.tsv from (name, rc, status) rows, logs."""
    with open(path / 'steps.tsv', 'w') as f:
        for name, rc, status in rows:
            f.write(f'{name}\t{rc}\t1\t10\t{status}\t\n')
    for name, text in (logs or {}).items():
        (path / f'{name}.log').write_text(text)
    if tests:
        (path / 'tests.tsv').write_text(tests)
    return str(path)


def test_plan_fits_the_documented_call():
    lines = gpu_check.plan(dict(gpu_check.PLAN), 450, 480, 10)
    assert sum(dict(gpu_check.PLAN).values()) + 10 <= 450
    assert lines[-1].endswith('fits'), lines
    assert gpu_check.plan({'build': 500}, 450, 480,
                          10)[-1].endswith('DOES NOT FIT')


@pytest.mark.parametrize(
    'log, rc, status, note',
    [
        # What KINDS.md saw on gVisor: the device refused, the run went on.
        ('========= Error: Device not supported\n'
         'RuntimeError: CUDA error: unknown error (999)\n', 1, 'unavailable',
         'Device not supported'),
        ('gpu_check: sanitize cases ran (7)\n'
         '========= ERROR SUMMARY: 0 errors\n', 0, 'pass', '7 cases'),
        ('========= Invalid __global__ read of size 4 bytes\n'
         'gpu_check: sanitize cases ran (7)\n'
         '========= ERROR SUMMARY: 2 errors\n', 9, 'FAIL', '2 errors'),
        # No error reported, but the cases never finished: not a pass.
        ('========= ERROR SUMMARY: 0 errors\n', 1, 'FAIL', 'rc 1'),
        ('gpu_check: sanitize case (4, 8, 13, 13)\n', 124, 'timeout', ''),
    ])
def test_sanitizer_status(tmp_path, log, rc, status, note):
    state = _state(tmp_path, [], {'memcheck': log})
    got, why = gpu_check.status_of(state, 'memcheck', rc, False)
    assert got == status and note in why, (got, why)


def test_no_gpu_passes_only_in_the_rehearsal(tmp_path):
    state = _state(
        tmp_path, [], {
            'initcheck': 'gpu_check: no CUDA GPU (x)\n',
            'graph': 'gpu_check: no CUDA GPU (x)\n'
        })
    assert gpu_check.status_of(state, 'initcheck', 3, True)[0] == 'no-gpu'
    assert gpu_check.status_of(state, 'initcheck', 3, False)[0] == 'FAIL'
    assert gpu_check.status_of(state, 'graph', 3, True)[0] == 'no-gpu'
    assert gpu_check.status_of(state, 'graph', 3, False)[0] == 'FAIL'


def test_tests_cut_then_finished_by_the_follow_up(tmp_path):
    done = 'f.py::test_a\tpassed\t0.10\nf.py::test_b[x]\tpassed\t2.00\n'
    rows = [(s, 0, 'pass') for s in STEPS[:5]]
    state = _state(tmp_path, rows, tests=done)
    assert gpu_check.record(state, 'tests', 124, 100, 100, None, '',
                            False) == 1
    assert gpu_check._steps(state)['tests'][3] == 'timeout'
    gpu_check.record(state, 'graph', '-', 0, 15, 'deferred', '', False)
    assert gpu_check.pending(state) == ['tests', 'graph', 'benchmark']
    assert gpu_check.deselect(state) == [
        '--deselect=f.py::test_a', '--deselect=f.py::test_b[x]'
    ]
    with open(tmp_path / 'tests.tsv', 'a') as f:
        f.write('f.py::test_c\tpassed\t1.00\n')
    assert gpu_check.record(state, 'tests', 0, 5, 90, None, '', False) == 0
    assert gpu_check._steps(state)['tests'][3:] == ('pass', '3 passed')
    assert gpu_check.pending(state) == ['graph', 'benchmark']


def test_a_skip_on_a_gpu_fails_the_tests(tmp_path):
    state = _state(
        tmp_path, [],
        tests='f.py::test_a\tpassed\t0.1\nf.py::test_b\tskipped\t0.0\n')
    assert gpu_check.status_of(state, 'tests', 0, False)[0] == 'FAIL'
    assert gpu_check.status_of(state, 'tests', 0, True)[0] == 'FAIL'


def test_blocked_steps_wait_only_behind_a_cut_build(tmp_path):
    rows = [('install', 0, 'pass'), ('build', 124, 'timeout')]
    rows += [(s, '-', 'blocked') for s in STEPS[2:]]
    assert gpu_check.pending(_state(tmp_path, rows)) == STEPS[1:]
    rows[1] = ('build', 1, 'FAIL')
    assert gpu_check.pending(_state(tmp_path, rows)) == []


def test_summary_never_says_pass_for_what_did_not_run(tmp_path, capsys):
    rows = [('install', 0, 'pass'), ('build', 0, 'pass'),
            ('registered', 0, 'pass'), ('memcheck', 1, 'unavailable'),
            ('initcheck', 1, 'unavailable'), ('tests', '-', 'deferred')]
    state = _state(tmp_path, rows)
    gpu_check.summary(state)
    out = capsys.readouterr().out
    lines = {
        line.split('|')[0].strip(): line.split('|', 1)[1].strip()
        for line in out.splitlines() if '|' in line
    }
    assert lines['memcheck'].startswith('unavailable')
    assert lines['tests'].startswith('deferred')
    assert lines['graph'] == 'not run' and lines['benchmark'] == 'not run'
    assert lines['left for the follow-up'] == 'tests graph benchmark'
    assert gpu_check.verdict(state, False) == 1
    rows[5] = ('tests', 0, 'pass')
    rows += [('graph', 0, 'pass'), ('benchmark', 0, 'pass')]
    assert gpu_check.verdict(_state(tmp_path, rows), False) == 0


def test_ptxas_reports_stack_frames():
    log = ('ptxas info    : Compiling entry function \'_Z1kv\' for \'sm_90\'\n'
           'ptxas info    : Function properties for _Z1kv\n'
           '    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill '
           'loads\n'
           'ptxas info    : Used 40 registers, used 0 barriers\n'
           'ptxas info    : Function properties for _Z1jv\n'
           '    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill '
           'loads\n'
           'ptxas info    : Used 30 registers, used 0 barriers\n')
    assert gpu_check._ptxas(log) == (
        '2 kernels, max 40 registers; stack frames: 1 functions, max 16 '
        'bytes (_Z1kv); spills: none')


def test_plugin_writes_each_result_as_it_ends(tmp_path):
    (tmp_path / 'test_sample.py').write_text(
        'import pytest\n'
        'def test_ok():\n    pass\n'
        'def test_bad():\n    assert False\n'
        '@pytest.mark.skip(reason="x")\n'
        'def test_skipped():\n    pass\n')
    results = tmp_path / 'tests.tsv'
    env = dict(os.environ, GPU_CHECK_TESTS=str(results))
    env['PYTHONPATH'] = os.pathsep.join(
        [osp.join(REPO, 'tools', 'gpu_check'),
         env.get('PYTHONPATH', '')])
    subprocess.run([
        sys.executable, '-m', 'pytest', '-q', '-p', 'gpu_check', '-p',
        'no:cacheprovider',
        str(tmp_path / 'test_sample.py')
    ],
                   cwd=tmp_path,
                   env=env,
                   capture_output=True,
                   check=False)
    got = {k: v[0] for k, v in gpu_check._tests(str(tmp_path)).items()}
    assert got == {
        'test_sample.py::test_ok': 'passed',
        'test_sample.py::test_bad': 'failed',
        'test_sample.py::test_skipped': 'skipped'
    }


@pytest.mark.parametrize('cmd', ('pending', 'deselect'))
def test_nothing_left_prints_nothing(tmp_path, cmd):
    """An empty answer is no line at all: the shell reads each line as one
    argument, and an empty one would make pytest collect the whole tree."""
    rows = [(s, 0, 'pass') for s in STEPS]
    state = _state(tmp_path, rows)
    done = subprocess.run([
        sys.executable,
        osp.join(REPO, 'tools', 'gpu_check', 'gpu_check.py'), cmd, state
    ],
                          capture_output=True,
                          text=True,
                          check=True)
    assert done.stdout == ''
