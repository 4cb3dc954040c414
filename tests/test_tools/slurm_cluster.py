"""A real one-node Slurm cluster for a test: munge, slurmctld, slurmd.

Follows shared/notes/slurm-single-node.md, with free ports instead of
6817/6818 so that it does not collide with another cluster on the machine.
Every wait is bounded; daemons are stopped by their own process ids.
"""
import contextlib
import os
import os.path as osp
import shutil
import signal
import subprocess
import time
from typing import Dict, Iterator, List, Optional

from tools_launch import free_port

SLURM_PROGRAMS = ('srun', 'sinfo', 'scontrol', 'scancel', 'slurmctld',
                  'slurmd', 'munge', 'munged')
MUNGE_SOCKET_DIR = '/run/munge'


def unavailable() -> Optional[str]:
    """Why a Slurm cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return 'starting slurmctld/slurmd/munged needs root'
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f'Slurm/munge programs missing: {", ".join(missing)} '
                '(apt-get install slurmctld slurmd slurm-client munge)')
    return None


def _munge_works() -> bool:
    return subprocess.run(['munge', '-n'], capture_output=True,
                          timeout=10).returncode == 0


def _start_munged() -> Optional[int]:
    """Start munged as the munge user unless one answers; its pid or None."""
    if _munge_works():
        return None
    os.makedirs(MUNGE_SOCKET_DIR, exist_ok=True)
    shutil.chown(MUNGE_SOCKET_DIR, 'munge', 'munge')
    if not osp.exists('/etc/munge/munge.key'):
        subprocess.run(['mungekey', '-c', '-f'], check=True, timeout=30)
        shutil.chown('/etc/munge/munge.key', 'munge', 'munge')
    subprocess.run(['runuser', '-u', 'munge', '--',
                    shutil.which('munged')],
                   check=True,
                   timeout=30)
    _wait(_munge_works, 10, 'munged to answer')
    with open(osp.join(MUNGE_SOCKET_DIR, 'munged.pid')) as f:
        return int(f.read().strip())


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f'waited {timeout} s for {what}')
        time.sleep(0.2)


def _node_line() -> str:
    """This machine as ``slurmd -C`` sees it, without UpTime."""
    out = subprocess.run(['slurmd', '-C'],
                         capture_output=True,
                         text=True,
                         timeout=30,
                         check=True).stdout
    line = next(line for line in out.splitlines()
                if line.startswith('NodeName='))
    return ' '.join(f for f in line.split() if not f.startswith('UpTime='))


def write_conf(folder: str) -> str:
    """A minimal slurm.conf for this node in ``folder``; its path."""
    host = subprocess.run(['hostname', '-s'],
                          capture_output=True,
                          text=True,
                          timeout=10,
                          check=True).stdout.strip()
    conf = osp.join(folder, 'slurm.conf')
    lines = [
        'ClusterName=mmsynctest', f'SlurmctldHost={host}',
        f'SlurmctldPort={free_port()}', f'SlurmdPort={free_port()}',
        'SlurmUser=root', 'SlurmdUser=root', 'AuthType=auth/munge',
        f'StateSaveLocation={folder}/state', f'SlurmdSpoolDir={folder}/spool',
        f'SlurmctldPidFile={folder}/slurmctld.pid',
        f'SlurmdPidFile={folder}/slurmd.pid',
        f'SlurmctldLogFile={folder}/slurmctld.log',
        f'SlurmdLogFile={folder}/slurmd.log', 'MailProg=/bin/true',
        'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none',
        'JobAcctGatherType=jobacct_gather/none',
        'AccountingStorageType=accounting_storage/none', 'MpiDefault=none',
        'SelectType=select/cons_tres', 'SelectTypeParameters=CR_Core',
        'ReturnToService=2', f'{_node_line()} State=UNKNOWN',
        'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP'
    ]
    os.makedirs(osp.join(folder, 'state'))
    os.makedirs(osp.join(folder, 'spool'))
    with open(conf, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return conf


def _stop(proc_or_pid, timeout: float = 10) -> None:
    """SIGTERM one process by pid, SIGKILL it if it lingers."""
    if isinstance(proc_or_pid, subprocess.Popen):
        proc_or_pid.terminate()
        try:
            proc_or_pid.wait(timeout)
        except subprocess.TimeoutExpired:
            proc_or_pid.kill()
            proc_or_pid.wait(timeout)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc_or_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(proc_or_pid, 0)
            time.sleep(0.1)
        os.kill(proc_or_pid, signal.SIGKILL)


@contextlib.contextmanager
def slurm_cluster(folder: str) -> Iterator[Dict[str, str]]:
    """Run slurmctld and slurmd (and munged if needed) until exit.

    Args:
        folder (str): An empty folder for the config, state and logs.

    Yields:
        dict: Environment entries (SLURM_CONF) for srun, sinfo, scontrol.
    """
    munged = _start_munged()
    daemons: List[subprocess.Popen] = []
    try:
        conf = write_conf(folder)
        env = dict(os.environ, SLURM_CONF=conf)
        for daemon in ('slurmctld', 'slurmd'):
            log = open(osp.join(folder, f'{daemon}.out'), 'w')
            daemons.append(
                subprocess.Popen([daemon, '-D', '-f', conf],
                                 env=env,
                                 stdout=log,
                                 stderr=subprocess.STDOUT))
            log.close()

        def idle() -> bool:
            for proc in daemons:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f'{proc.args[0]} exited with {proc.returncode}; '
                        f'see {folder}')
            out = subprocess.run(['sinfo', '-h', '-o', '%T'],
                                 env=env,
                                 capture_output=True,
                                 text=True,
                                 timeout=10).stdout
            return out.strip() == 'idle'

        _wait(idle, 30, 'the Slurm node to be idle')
        yield {'SLURM_CONF': conf}
    finally:
        if daemons:
            subprocess.run(['scancel', '--full', '--partition=debug'],
                           env=dict(os.environ, SLURM_CONF=conf),
                           capture_output=True,
                           timeout=30)
        for proc in reversed(daemons):  # slurmd first, then slurmctld
            _stop(proc)
        if munged is not None:
            _stop(munged)
