"""Simulated hosts: Linux network namespaces joined by one bridge.

Each host is a namespace with ``lo`` and an ``eth0`` holding an address of
198.18.0.0/15 (the range set aside for benchmarks, RFC 2544), linked by a
veth pair to a bridge in a hub namespace of its own: nothing is added to the
machine's own network, and traffic goes only between the namespaces.
Everything made is deleted on leaving, also on failure. Needs root and
``ip netns``; ``unavailable()`` says why not where they are missing.
"""
import contextlib
import os
import shutil
import subprocess
from typing import Iterator, List, Optional

SUBNET = '198.18.0.0/24'


def address(index: int) -> str:
    """The address of host ``index`` (0-based)."""
    return f'198.18.0.{index + 1}'


def unavailable() -> Optional[str]:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return 'simulated hosts need root (ip netns add)'
    if shutil.which('ip') is None:
        return 'simulated hosts need iproute2 (ip netns)'
    probe = f'mmsprobe{os.getpid()}'
    made = subprocess.run(['ip', 'netns', 'add', probe],
                          capture_output=True,
                          text=True)
    if made.returncode:
        return f'ip netns add fails here: {made.stderr.strip()}'
    subprocess.run(['ip', 'netns', 'delete', probe], check=False)
    return None


def ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure raises with ip's message."""
    subprocess.run(['ip', *args],
                   check=True,
                   capture_output=True,
                   text=True,
                   timeout=30)


class Hosts:
    """The namespaces of ``simulated_hosts``: ``names[i]`` at
    ``address(i)``."""

    def __init__(self, tag: str, count: int):
        self.tag = tag
        self.hub = f'{tag}h'
        self.names: List[str] = [f'{tag}n{i}' for i in range(count)]

    def prefix(self, index: int) -> List[str]:
        """The command prefix that runs a program on host ``index``."""
        return ['ip', 'netns', 'exec', self.names[index]]

    def pids(self, index: int) -> List[int]:
        """The processes running on host ``index``."""
        out = subprocess.run(['ip', 'netns', 'pids', self.names[index]],
                             capture_output=True,
                             text=True,
                             timeout=30).stdout
        return [int(pid) for pid in out.split()]

    def cut_off(self, index: int) -> None:
        """Set host ``index``'s link down: its processes live on, unheard."""
        ip('-n', self.names[index], 'link', 'set', 'eth0', 'down')


@contextlib.contextmanager
def simulated_hosts(count: int) -> Iterator[Hosts]:
    """``count`` hosts on one bridge, deleted on leaving."""
    hosts = Hosts(f'mms{os.getpid() % 100000}', count)
    made: List[str] = []
    try:
        ip('netns', 'add', hosts.hub)
        made.append(hosts.hub)
        ip('-n', hosts.hub, 'link', 'add', 'br0', 'type', 'bridge')
        ip('-n', hosts.hub, 'link', 'set', 'br0', 'up')
        for i, name in enumerate(hosts.names):
            ip('netns', 'add', name)
            made.append(name)
            # Both ends are made inside the namespaces: no link of the
            # machine's own network namespace ever exists.
            ip('-n', name, 'link', 'add', 'eth0', 'type', 'veth', 'peer',
               'name', f'p{i}', 'netns', hosts.hub)
            ip('-n', name, 'addr', 'add', f'{address(i)}/24', 'dev', 'eth0')
            ip('-n', name, 'link', 'set', 'eth0', 'up')
            ip('-n', name, 'link', 'set', 'lo', 'up')
            ip('-n', hosts.hub, 'link', 'set', f'p{i}', 'master', 'br0')
            ip('-n', hosts.hub, 'link', 'set', f'p{i}', 'up')
        yield hosts
    finally:
        # Deleting a namespace deletes its links (and the veth peers).
        for name in reversed(made):
            subprocess.run(['ip', 'netns', 'delete', name], check=False)
