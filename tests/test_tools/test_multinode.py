"""Training across hosts, simulated by network namespaces (see netns.py).

Every host runs the launchers as a user runs them on a node, with
NNODES, NODE_RANK, MASTER_ADDR and PORT; the launcher finds the interface
itself. Each test kills what it started (every process of its namespaces)
and deletes its namespaces, also on failure. Skipped where not root or
``ip netns`` is missing; the checks of the launchers' arguments run
anywhere.
"""
import contextlib
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time
from typing import Callable, List

import pytest
from conftest import device_env
from netns import address, simulated_hosts, unavailable
from tools_launch import (REPO, SYNC_CONFIG, accuracies, free_port, python,
                          run, scalars, short_run_options)

HERE = osp.dirname(osp.abspath(__file__))
CONFIG_5E = osp.join(REPO, 'configs', 'resnet_tiny',
                     'resnet-tiny_mmsyncbn_2xb32-5e_digits.py')
needs_netns = pytest.mark.skipif(
    unavailable() is not None, reason=str(unavailable()))
# The bound of the liveness tests (liveness.timeout) and the slack given
# to 2 shared cores on top of it.
BOUND = 10
SLACK = 15
PORT = '29500'  # free: every host has a network of its own


class Nodes:
    """Launches on simulated hosts, their output in files."""

    def __init__(self, hosts, tmp_path):
        self.hosts = hosts
        self.tmp_path = tmp_path
        self.procs: List[subprocess.Popen] = []

    def out(self, index: int) -> str:
        """Everything node ``index`` printed so far."""
        with open(self.tmp_path / f'node{index}.out', encoding='utf-8') as f:
            return f.read()

    def start(self, index: int, cmd: List[str], **env: str) -> None:
        """Run ``cmd`` on host ``index`` with NODE_RANK=index and ``env``."""
        with open(self.tmp_path / f'node{index}.out', 'w') as out:
            self.procs.append(
                subprocess.Popen(
                    self.hosts.prefix(index) + cmd,
                    cwd=REPO,
                    env=device_env(
                        'cpu', **{
                            'NODE_RANK': str(index),
                            'PYTHONPATH': os.pathsep.join([REPO, HERE]),
                            **env
                        }),
                    stdout=out,
                    stderr=subprocess.STDOUT))

    def wait(self, index: int, timeout: float) -> int:
        """The exit status of node ``index``'s launch."""
        try:
            return self.procs[index].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f'node {index} did not end in {timeout} s:'
                                 f'\n{self.out(index)[-3000:]}')

    def workers(self, index: int) -> List[int]:
        """The pids of training processes on host ``index``."""
        return [
            pid for pid in self.hosts.pids(index)
            if 'train.py' in cmdline(pid) and 'torchrun' not in cmdline(pid)
        ]

    def kill(self, index: int) -> None:
        """SIGKILL every process of host ``index``, as a power loss."""
        for pid in self.hosts.pids(index):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for index in range(len(self.hosts.names)):
            self.kill(index)
        for proc in self.procs:
            proc.wait(timeout=30)


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' once it is gone)."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode()
    except OSError:
        return ''


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f'no {what} within {timeout} s')
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.fixture
def nodes(tmp_path):
    """``nodes(count)``: that many simulated hosts, every process on them
    killed and the hosts deleted after the test, whatever its end."""
    with contextlib.ExitStack() as stack:

        def make(count: int) -> Nodes:
            launched = Nodes(
                stack.enter_context(simulated_hosts(count)), tmp_path)
            stack.callback(launched.close)
            return launched

        yield make


def dist_train(work_dir,
               nproc: int,
               *args: str,
               config: str = CONFIG_5E) -> List[str]:
    return [
        'bash', 'tools/dist_train.sh', config,
        str(nproc), '--work-dir',
        str(work_dir), *args
    ]


@needs_netns
def test_two_hosts_train_main_config(nodes, tmp_path):
    """2 hosts x 2 processes, only the four variables set, train the main
    job (5 epochs) to >= 97 % over 4 ranks."""
    hosts = nodes(2)
    work_dir = tmp_path / 'work'
    for index in range(2):
        hosts.start(
            index,
            dist_train(work_dir, 2),
            NNODES='2',
            MASTER_ADDR=address(0),
            PORT=PORT)
    for index in range(2):
        assert hosts.wait(index, 300) == 0, hosts.out(index)[-3000:]
    assert 'process group: gloo, 4 ranks' in hosts.out(0)
    assert accuracies(str(work_dir))[-1] >= 97


@needs_netns
def test_sync_bn_over_two_hosts_matches_one_process(nodes):
    """MMSyncBN over 4 ranks on 2 hosts (splits 3, 0, 5, 2) equals
    F.batch_norm over the whole batch in one process, and with
    group_size='node' over each host's part."""
    hosts = nodes(2)
    for index in range(2):
        hosts.start(
            index, [
                sys.executable, '-m', 'torch.distributed.run', '--nnodes=2',
                f'--node-rank={index}', f'--master-addr={address(0)}',
                f'--master-port={PORT}', '--nproc-per-node=2',
                osp.join(HERE, 'multinode_syncbn.py')
            ],
            GLOO_SOCKET_IFNAME='eth0')
    for index in range(2):
        assert hosts.wait(index, 120) == 0, hosts.out(index)[-3000:]
    assert 'MATCH over 4 ranks and per node of 2' in hosts.out(0)


def elastic(hosts: Nodes, work_dir, count: int, **options: str) -> None:
    """Start ``count`` hosts, 1 process each, NNODES=2:3, resuming."""
    cfg = [
        'default_hooks.checkpoint.interval=1', f'liveness.timeout={BOUND}',
        *[f'{k}={v}' for k, v in options.items()]
    ]
    for index in range(count):
        hosts.start(
            index,
            dist_train(work_dir, 1, '--resume', '--cfg-options', *cfg),
            NNODES='2:3',
            MASTER_ADDR=address(0),
            PORT=PORT,
            MAX_RESTARTS='2',
            RDZV_CONF='last_call_timeout=2')
    wait_for(lambda: 'Saving checkpoint at 2 epochs' in hosts.out(0), 300,
             'second checkpoint')


def finished_at_smaller_world(hosts: Nodes, work_dir) -> None:
    """Nodes 0 and 1 end well, the last run of the work dir on 2 ranks."""
    for index in range(2):
        assert hosts.wait(index, 300) == 0, hosts.out(index)[-3000:]
    log = ''.join(hosts.out(index) for index in range(2))
    assert re.search(r'start: 2 processes on CPU, .*resumed at epoch', log)
    assert ('world size 3 -> 2 since the checkpoint: the train set splits '
            'over 2 processes, 32 samples each: total batch 96 -> 64' in log)
    assert accuracies(str(work_dir))[-1] >= 97


@needs_netns
def test_killed_host_leaves_the_others_to_finish(nodes, tmp_path):
    """3 hosts, NNODES=2:3; host 2 dies (every process killed) after the
    second epoch: hosts 0 and 1 restart at 2 ranks from the newest
    checkpoint and finish."""
    hosts = nodes(3)
    work_dir = tmp_path / 'work'
    elastic(hosts, work_dir, 3)
    hosts.kill(2)
    finished_at_smaller_world(hosts, work_dir)


@needs_netns
def test_cut_off_host_ends_within_the_bound(nodes, tmp_path):
    """3 hosts, NNODES=2:3; host 2's link goes down after the second epoch,
    nothing killed: its worker and the others end within the liveness
    bound, each with a line naming what is lost; hosts 0 and 1 restart at
    2 ranks and finish."""
    hosts = nodes(3)
    work_dir = tmp_path / 'work'
    elastic(hosts, work_dir, 3)
    hosts.hosts.cut_off(2)
    lost = wait_for(lambda: not hosts.workers(2), BOUND + SLACK,
                    'end of the cut-off worker')
    assert re.search(
        r'mmsync: error: rank \d of node 2 \(.*198\.18\.0\.3\): the store '
        r'of the process group at 198\.18\.0\.1:\d+ .*has not answered',
        hosts.out(2)), hosts.out(2)[-3000:]
    wait_for(
        lambda: re.search(
            r'mmsync: error: rank \d of node \d .*: rank \d of node 2 '
            r'\(.*198\.18\.0\.3\) silent for \d+ s',
            hosts.out(0) + hosts.out(1)), BOUND + SLACK - lost,
        'line naming the silent rank')
    finished_at_smaller_world(hosts, work_dir)


@needs_netns
def test_unreachable_master_is_one_line(nodes, tmp_path):
    """A MASTER_ADDR that no route reaches ends the launch in one line."""
    hosts = nodes(1)
    hosts.start(
        0,
        dist_train(tmp_path / 'work', 1),
        NNODES='2',
        NODE_RANK='1',
        MASTER_ADDR='198.19.0.1',
        PORT=PORT)
    assert hosts.wait(0, 120) == 2
    assert hosts.out(0).strip().splitlines()[-1] == (
        'dist_train.sh: error: MASTER_ADDR=198.19.0.1 (198.19.0.1) is '
        'unreachable from this node: Network is unreachable')


@pytest.mark.parametrize('nnodes,addr,error', [
    ('3:2', '127.0.0.1', "NNODES must be a positive integer N or MIN:MAX "
     "with MIN <= MAX, got '3:2'"),
    ('2', 'localhost', 'MASTER_ADDR=localhost resolves to the loopback '
     'address 127.0.0.1 on a multi-node run'),
])
def test_bad_multi_node_settings_are_one_line(tmp_path, nnodes, addr, error):
    """NNODES out of order, or a host name that resolves to loopback on
    several nodes, end in one line before any worker starts."""
    result = run(
        dist_train(tmp_path / 'work', 1),
        timeout=120,
        env=device_env(
            'cpu',
            NNODES=nnodes,
            NODE_RANK='0',
            MASTER_ADDR=addr,
            PORT=str(free_port())),
        check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f'dist_train.sh: error: {error}'), lines


def test_long_rank_0_evaluation_is_no_loss(tmp_path):
    """Rank 0 computes for twice the liveness bound after each validation
    while rank 1 waits: no rank is called lost and the run finishes."""
    config = tmp_path / 'slow_evaluation.py'
    config.write_text(f'_base_ = [{SYNC_CONFIG!r}]\n'
                      "custom_imports = dict(imports=['fault_hooks'])\n"
                      'custom_hooks = [dict(type="SlowEvaluationHook", '
                      f'seconds={2 * BOUND / 2})]\n'
                      f'liveness = dict(timeout={BOUND / 2})\n')
    result = run(
        dist_train(
            tmp_path / 'work',
            2,
            '--cfg-options',
            'train_cfg.max_epochs=2',
            'train_dataloader.dataset.indices=64',
            config=str(config)),
        timeout=300,
        env=device_env(
            'cpu',
            PORT=str(free_port()),
            PYTHONPATH=os.pathsep.join([REPO, HERE])),
        check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'mmsync: error' not in result.stderr
    assert 'liveness: a lost peer ends every rank within 5 s' in result.stdout


def test_resume_at_another_world_scales_the_lr(tmp_path):
    """A run of 2 processes with auto_scale_lr resumed by 1 process: the
    log says what changed and the learning rate halves with the total
    batch (mmengine alone would bring back the rate of 2 processes)."""
    work_dir = tmp_path / 'work'
    options = ['auto_scale_lr.enable=True', 'auto_scale_lr.base_batch_size=16']
    run(dist_train(
        work_dir,
        2,
        *short_run_options('float64', 8, max_epochs=1),
        *options,
        config=SYNC_CONFIG),
        env=device_env('cpu', PORT=str(free_port())))
    before = [r['lr'] for r in scalars(str(work_dir)) if 'lr' in r][-1]
    result = run(
        python('train.py', SYNC_CONFIG, '--work-dir', str(work_dir),
               '--resume', *short_run_options('float64', 8), *options),
        env=device_env('cpu'))
    assert ('world size 2 -> 1 since the checkpoint: the train set splits '
            'over 1 processes, 8 samples each: total batch 16 -> 8; '
            'learning rate x0.5 (auto_scale_lr)') in result.stdout
    after = [r['lr'] for r in scalars(str(work_dir)) if 'lr' in r][0]
    assert after == pytest.approx(before / 2, rel=0.05)
