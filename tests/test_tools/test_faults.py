"""Faults injected into real runs of tools/dist_train.sh (2 processes).

A checkpoint write that fails (a file-size limit, a full disk), a rank that
fails, a worker killed with SIGKILL under ``MAX_RESTARTS``, torchrun or the
script killed with SIGKILL, Ctrl-C, two jobs at once without ``PORT``, and a
``PORT`` that is taken. Each run is bounded in time; the short run of
tools_launch (333 samples, 21 steps per epoch, a checkpoint every epoch).
"""
import glob
import os
import os.path as osp
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, List

import pytest
import torch
from tools_launch import (REPO, SHORT_RUN_STEPS, SYNC_CONFIG, accuracies,
                          base_env, copy_with_newer_best, finish, losses,
                          python, run, scalars, short_run_options, start,
                          state_dict)

from mmsync.engine import load_checkpoint_file

HERE = osp.dirname(osp.abspath(__file__))


def launch_env(**extra: str) -> dict:
    """The launch environment: GPUs hidden, PORT only if in ``extra``, and
    MKL_NUM_THREADS set (else mmengine warns about it on every start)."""
    env = base_env(CUDA_VISIBLE_DEVICES='', MKL_NUM_THREADS='1')
    env.pop('PORT', None)
    env.update(extra)
    return env


def dist_train(work_dir, *args: str, config: str = SYNC_CONFIG) -> List[str]:
    return [
        'bash', 'tools/dist_train.sh', config, '2', '--work-dir',
        str(work_dir), *args
    ]


def wait_for(condition: Callable[[], bool], timeout: float, what: str):
    """Poll ``condition`` every 50 ms until it holds or ``timeout`` ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'waited {timeout} s for {what}')
        time.sleep(0.05)


def pids_with(*texts: str) -> List[int]:
    """Processes whose command line holds every one of ``texts``."""
    pids = []
    for path in glob.glob('/proc/[0-9]*/cmdline'):
        try:
            with open(path, 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode()
        except OSError:
            continue
        if all(text in cmdline for text in texts):
            pids.append(int(path.split('/')[2]))
    return pids


def workers(work_dir) -> List[int]:
    return pids_with('train.py', str(work_dir), '--launcher pytorch')


def root_cause(stderr: str) -> str:
    """The "Root Cause" section of torchrun's failure summary."""
    found = re.search(r'Root Cause \(first observed failure\):(.*?)={20}',
                      stderr, re.DOTALL)
    assert found, stderr[-3000:]
    return found.group(1)


def run_log(work_dir, run: int = -1) -> str:
    """The log of a run in ``work_dir``; default: the latest."""
    logs = sorted(glob.glob(osp.join(str(work_dir), '*', '*.log')))
    with open(logs[run], encoding='utf-8') as f:
        return f.read()


def leftovers(work_dir) -> List[str]:
    """Checkpoint files and temporary files of the work dir."""
    return sorted(
        name for name in os.listdir(work_dir)
        if name.endswith(('.pth', '.tmp')))


def test_checkpoint_write_over_file_size_limit(tmp_path):
    """Every write beyond 300 KiB fails (EFBIG), as on a full disk: no
    checkpoint appears, none half-written, and torchrun and the log name
    rank 0's OSError."""
    work_dir = tmp_path / 'work'
    result = run([
        'bash', '-c', 'ulimit -f 300 && exec "$@"', 'bash',
        *dist_train(work_dir, *short_run_options('float64', 8))
    ],
                 env=launch_env(),
                 check=False)
    assert result.returncode != 0
    assert leftovers(work_dir) == []
    cause = root_cause(result.stderr)
    assert 'rank      : 0' in cause
    assert 'OSError: [Errno 27] File too large' in cause
    assert 'rank 0 failed: OSError: [Errno 27] File too large' in run_log(
        work_dir)


@pytest.fixture
def small_disk(tmp_path, runs):
    """A tmpfs with room for the logs and one checkpoint, not two."""
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    one = osp.getsize(osp.join(runs.sync_2proc(), 'epoch_1.pth'))
    mount = tmp_path / 'disk'
    mount.mkdir()
    done = subprocess.run([
        'mount', '-t', 'tmpfs', '-o', f'size={one * 3 // 2}', 'tmpfs',
        str(mount)
    ],
                          capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs: {done.stderr.strip()}')
    yield mount
    subprocess.run(['umount', '-l', str(mount)], check=True)


def test_full_disk_keeps_the_intact_checkpoint(small_disk, runs):
    """The second checkpoint meets ENOSPC: the first stays, complete and
    loadable, beside no partial file; it equals an undisturbed run's."""
    work_dir = small_disk / 'work'
    result = run(
        dist_train(work_dir, *short_run_options('float64', 8)),
        env=launch_env(),
        check=False)
    assert result.returncode != 0
    assert leftovers(work_dir) == ['epoch_1.pth']
    assert 'OSError: [Errno 28] No space left on device' in root_cause(
        result.stderr)
    load_checkpoint_file(str(work_dir / 'epoch_1.pth'))
    got = state_dict(str(work_dir / 'epoch_1.pth'))
    want = state_dict(osp.join(runs.sync_2proc(), 'epoch_1.pth'))
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_failure_names_its_rank(tmp_path):
    """Rank 1 meets ENOSPC in epoch 2 (an injected hook); rank 0 then loses
    its peer. torchrun's summary and the work dir's log name rank 1."""
    config = tmp_path / 'fails_on_rank_1.py'
    config.write_text(f'_base_ = [{SYNC_CONFIG!r}]\n'
                      "custom_imports = dict(imports=['fault_hooks'])\n"
                      "custom_hooks = [dict(type='FullDiskOnRankHook', "
                      f'rank=1, step={SHORT_RUN_STEPS + 3})]\n')
    work_dir = tmp_path / 'work'
    result = run(
        dist_train(
            work_dir, *short_run_options('float64', 8), config=str(config)),
        env=launch_env(PYTHONPATH=REPO + os.pathsep + HERE),
        check=False)
    assert result.returncode != 0
    cause = root_cause(result.stderr)
    assert 'rank      : 1' in cause, cause
    assert 'OSError: [Errno 28] No space left on device' in cause
    log = run_log(work_dir)
    assert ('rank 1 failed: OSError: [Errno 28] No space left on device'
            in log)
    assert leftovers(work_dir) == ['epoch_1.pth']


def start_training(work_dir) -> subprocess.Popen:
    """Start the short run; return once both workers run."""
    proc = start(
        dist_train(work_dir, *short_run_options('float64', 8)),
        env=launch_env())
    try:
        wait_for(lambda: len(workers(work_dir)) == 2, 120, 'the workers')
    except AssertionError:
        finish(proc, timeout=60)
        raise
    return proc


def test_ctrl_c_ends_in_a_few_lines(tmp_path):
    """SIGINT to the launch's process group, as a terminal sends it."""
    work_dir = tmp_path / 'work'
    proc = start_training(work_dir)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        result = finish(proc, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 130
    assert len(lines) <= 5, result.stderr
    assert lines[-1].startswith('dist_train.sh: interrupted')
    assert 'Traceback' not in result.stderr
    wait_for(lambda: not workers(work_dir), 15, 'the workers to end')


@pytest.mark.parametrize('victim', ['torchrun', 'dist_train.sh'])
def test_no_orphans_after_kill_9(tmp_path, victim):
    """kill -9 of torchrun or of the script: the workers end too."""
    work_dir = tmp_path / 'work'
    proc = start_training(work_dir)
    try:
        if victim == 'torchrun':
            (pid, ) = pids_with('misc/torchrun.py', str(work_dir))
        else:
            pid = proc.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not workers(work_dir), 30, 'the workers to end')
        wait_for(lambda: not pids_with('misc/torchrun.py', str(work_dir)), 30,
                 'torchrun to end')
    finally:
        finish(proc, timeout=60)


def test_elastic_restart_after_kill_9_of_a_worker(runs, tmp_path):
    """MAX_RESTARTS=1: a worker killed in epoch 2 restarts both from
    epoch_1.pth and the run ends exactly as an undisturbed one."""
    reference = runs.sync_2proc()
    work_dir = tmp_path / 'work'
    proc = start(
        dist_train(work_dir, *short_run_options('float64', 8)),
        env=launch_env(MAX_RESTARTS='1'))
    try:
        wait_for(lambda: osp.isfile(work_dir / 'epoch_1.pth'), 240,
                 'the first checkpoint')
        os.kill(max(workers(work_dir)), signal.SIGKILL)
    finally:
        result = finish(proc, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(glob.glob(osp.join(str(work_dir), '*', '*.log'))) == 2
    assert f'resuming from {work_dir / "epoch_1.pth"}' in run_log(work_dir)
    # The restart lost at most the epoch under way: it took steps 22-42.
    assert [s for s, _ in losses(str(work_dir))
            ] == list(range(SHORT_RUN_STEPS + 1, 2 * SHORT_RUN_STEPS + 1))
    assert losses(str(work_dir)) == losses(reference)[SHORT_RUN_STEPS:]
    assert accuracies(str(work_dir))[-1] == accuracies(reference)[-1]
    got = state_dict(str(work_dir / 'epoch_2.pth'))
    want = state_dict(osp.join(reference, 'epoch_2.pth'))
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_two_jobs_without_port(tmp_path):
    """Without PORT each job gets a free port from torchrun: both finish."""
    work_dirs = [tmp_path / 'one', tmp_path / 'two']
    procs = [
        start(
            dist_train(d, *short_run_options('float64', 8, max_epochs=1)),
            env=launch_env()) for d in work_dirs
    ]
    for d, proc in zip(work_dirs, procs):
        result = finish(proc, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert leftovers(d) == ['epoch_1.pth']


def test_port_taken(tmp_path):
    """PORT set and in use: one line that says so, before torchrun."""
    work_dir = tmp_path / 'work'
    with socket.create_server(('127.0.0.1', 0)) as busy:
        port = busy.getsockname()[1]
        result = run(
            dist_train(work_dir),
            timeout=120,
            env=launch_env(PORT=str(port)),
            check=False)
    assert result.returncode == 2
    (line, ) = result.stderr.strip().splitlines()
    assert line.startswith(f'dist_train.sh: error: PORT={port} is in use on '
                           '127.0.0.1')
    assert 'leave PORT unset' in line
    assert not work_dir.exists()


def test_resume_falls_back_to_the_newest_intact_checkpoint(runs, tmp_path):
    """A copied work dir whose newest checkpoint is truncated: --resume takes
    its epoch_1.pth (not the original's, named by last_checkpoint), warns
    once naming both, and ends as the undisturbed run."""
    reference = runs.sync_2proc()
    work_dir = tmp_path / 'copy'
    shutil.copytree(reference, work_dir)
    newest = work_dir / 'epoch_2.pth'
    newest.write_bytes(newest.read_bytes()[:1000])
    result = run(
        dist_train(work_dir, '--resume', *short_run_options('float64', 8)),
        env=launch_env())
    warnings = [
        line for line in run_log(work_dir).splitlines()
        if 'WARNING' in line and 'resuming from' in line
    ]
    assert len(warnings) == 1, result.stdout[-2000:]
    assert f'resuming from {work_dir / "epoch_1.pth"}' in warnings[0]
    assert f"'{newest}' (1000 bytes) cannot be read" in warnings[0]
    got = state_dict(str(newest))
    want = state_dict(osp.join(reference, 'epoch_2.pth'))
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_resume_stays_inside_the_work_dir(runs, tmp_path):
    """A copied work dir without its newest checkpoint: the plan resumes
    from the copy's epoch_1.pth, though last_checkpoint names the
    original's epoch_2.pth."""
    work_dir = tmp_path / 'copy'
    shutil.copytree(runs.sync_2proc(), work_dir)
    os.remove(work_dir / 'epoch_2.pth')
    assert (work_dir / 'last_checkpoint').read_text().endswith('epoch_2.pth')
    result = run(
        python('train.py', SYNC_CONFIG, '--work-dir', str(work_dir),
               '--resume', '--dry-run', '2'),
        timeout=120,
        env=launch_env())
    assert f'resuming from {work_dir / "epoch_1.pth"}' in result.stdout


def test_resume_passes_over_a_newer_best_checkpoint(runs, tmp_path):
    """A work dir whose newest file is a best_*.pth (weights only, as
    CheckpointHook's save_best writes it) after epoch_1.pth: --resume takes
    epoch_1.pth, and epoch 2 runs with the learning rates and losses of the
    undisturbed run (from the best file it would restart the warm-up)."""
    reference = runs.sync_2proc()
    work_dir = tmp_path / 'copy'
    copy_with_newer_best(reference, work_dir, 1)
    run(dist_train(work_dir, '--resume', *short_run_options('float64', 8)),
        env=launch_env())
    assert f'resuming from {work_dir / "epoch_1.pth"}' in run_log(work_dir)

    def rates(path):
        return [(r['step'], r['lr']) for r in scalars(str(path)) if 'lr' in r]

    steps = list(range(SHORT_RUN_STEPS + 1, 2 * SHORT_RUN_STEPS + 1))
    assert [s for s, _ in rates(work_dir)] == steps
    assert rates(work_dir) == rates(reference)[SHORT_RUN_STEPS:]
    assert losses(str(work_dir)) == losses(reference)[SHORT_RUN_STEPS:]
