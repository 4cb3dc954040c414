"""Lost peers found in bounded time, without shortening the collective timeout.

A node lost without a reset (power, kernel, cable) leaves its peers waiting
in a collective for the whole ``dist_cfg.timeout`` (30 min by default), and
that timeout cannot be shortened: the other ranks wait as long while rank 0
evaluates. So every rank proves it is alive apart from the collectives: a
thread adds 1 to a counter of its own in the store of the default process
group (a TCPStore served by rank 0, reached through a connection of its own
at MASTER_ADDR:MASTER_PORT) and reads every rank's counter, several times
per ``timeout``. A rank ends, with one line naming the silent ranks and
their node, when a peer's counter stands still or the store does not answer
for long enough that the process is gone within ``timeout`` seconds of the
loss; torchrun (``MAX_RESTARTS``) or Slurm can then restart the run. A rank
busy in Python (rank 0 evaluating) still beats: the thread needs only the
GIL, which torch's ops and collectives release.
"""
import datetime
import os
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS as ROOT_HOOKS

from ...registry import HOOKS
from ...utils.net import NetError, route_to

# The counter of a rank that finished: its silence is no loss.
DONE = 1 << 40
EXIT_STATUS = 1


def node_of_this_process() -> str:
    """``node N (HOST, ADDR)``: the node rank given by torchrun or Slurm,
    the host name and the address that reaches the master."""
    rank = os.environ.get('GROUP_RANK', os.environ.get('SLURM_NODEID', '?'))
    try:
        addr = route_to(os.environ['MASTER_ADDR'], multi_node=False)
        where = f'{socket.gethostname()}, {addr.local_addr}'
    except (KeyError, NetError):
        where = socket.gethostname()
    return f'node {rank} ({where})'


def ranks_text(ranks: Sequence[int], nodes: Dict[int, str]) -> str:
    """``ranks 2, 3 of node 1 (...)``, grouped by node."""
    by_node: Dict[str, List[int]] = {}
    for rank in ranks:
        by_node.setdefault(nodes.get(rank, 'an unknown node'), []).append(rank)
    return '; '.join(f'rank{"s" if len(group) > 1 else ""} '
                     f'{", ".join(map(str, group))} of {node}'
                     for node, group in by_node.items())


class Liveness:
    """The heartbeat thread of one rank (see the module).

    Args:
        host (str): The store's address (MASTER_ADDR).
        port (int): The store's port (MASTER_PORT).
        rank (int): This rank.
        world_size (int): The number of ranks.
        timeout (float): Seconds within which this process ends once a peer
            or the store is lost.
        prefix (str): Keys of this run's attempt in the store.
        on_lost (callable, optional): Called with the line instead of ending
            the process (tests). Default: print it and ``os._exit(1)``.
    """

    def __init__(self,
                 host: str,
                 port: int,
                 rank: int,
                 world_size: int,
                 timeout: float = 60,
                 prefix: str = 'mmsync/liveness',
                 on_lost=None):
        if timeout <= 0:
            raise ValueError(f'liveness timeout must be > 0, got {timeout}')
        self.host, self.port = host, port
        self.rank, self.world_size = rank, world_size
        self.timeout = timeout
        # Observed up to an interval late, found silent at the next check,
        # each store call bounded by an interval: silent for timeout - 3
        # intervals, the process is gone within timeout of the loss.
        self.interval = timeout / 10
        self.silence = timeout - 3 * self.interval
        self.keys = [f'{prefix}/beat/{r}' for r in range(world_size)]
        self.node_keys = [f'{prefix}/node/{r}' for r in range(world_size)]
        self.node = node_of_this_process()
        self.nodes: Dict[int, str] = {}
        self.on_lost = on_lost or self._exit
        self._store: Optional[dist.TCPStore] = None
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._error = 'no answer'
        self._threads = [
            threading.Thread(target=target, name=name, daemon=True)
            for target, name in ((self._run, 'mmsync-liveness'),
                                 (self._watch, 'mmsync-liveness-watch'))
        ]

    def start(self) -> None:
        """Start beating and watching."""
        self._last_ok = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Mark this rank finished (its silence is then no loss) and stop."""
        self._stop.set()
        self._threads[1].join()
        # A store call ends within its timeout, unless a link is down.
        self._threads[0].join(self.timeout)
        if self._threads[0].is_alive():
            return  # the peers cannot hear this rank anyway
        try:
            self._connect().add(self.keys[self.rank], DONE)
        except Exception:  # noqa: B902 (the run is over; peers finish too)
            pass

    def _connect(self) -> dist.TCPStore:
        if self._store is None:
            self._store = dist.TCPStore(
                self.host,
                self.port,
                is_master=False,
                timeout=datetime.timedelta(seconds=self.interval),
                wait_for_workers=False)
        return self._store

    def _beat(self) -> List[int]:
        """Beat once; every rank's counter. A failed call drops the
        connection: a late answer must not be read as the next one's."""
        try:
            store = self._connect()
            store.add(self.keys[self.rank], 1)
            counts = [int(v) for v in store.multi_get(self.keys)]
            if len(self.nodes) < self.world_size and all(counts):
                self.nodes = {
                    r: v.decode()
                    for r, v in enumerate(store.multi_get(self.node_keys))
                }
            return counts
        except Exception:  # noqa: B902 (any failure: the store is unheard)
            self._store = None
            raise

    def _run(self) -> None:
        """Beat and look for silent peers; a store call that hangs (a link
        down can hold one past its timeout) is caught by ``_watch``."""
        seen = [self._last_ok] * self.world_size
        counts = [0] * self.world_size
        try:
            store = self._connect()
            store.set(self.node_keys[self.rank], self.node)
            for key in self.keys:  # every key exists: multi_get never waits
                store.add(key, 0)
        except Exception:  # noqa: B902 (_watch reports a store unheard)
            self._store = None
        while not self._stop.wait(self.interval):
            try:
                new = self._beat()
            except Exception as e:  # noqa: B902
                self._error = type(e).__name__
                continue
            now = self._last_ok = time.monotonic()
            for r, count in enumerate(new):
                if count != counts[r]:
                    seen[r] = now
            counts = new
            silent = [
                r for r in range(self.world_size)
                if r != self.rank and counts[r] < DONE and now -
                seen[r] > self.silence
            ]
            if silent:
                return self.on_lost(
                    f'rank {self.rank} of {self.node}: '
                    f'{ranks_text(silent, self.nodes)} silent for '
                    f'{now - min(seen[r] for r in silent):.0f} s: lost')

    def _watch(self) -> None:
        """End the process when the store has not answered for too long."""
        while not self._stop.wait(self.interval):
            unheard = time.monotonic() - self._last_ok
            if unheard > self.silence:
                return self.on_lost(
                    f'rank {self.rank} of {self.node}: the store of the '
                    f'process group at {self.host}:{self.port} (served by '
                    f'rank 0{self._node_text(0)}) has not answered for '
                    f'{unheard:.0f} s ({self._error}): this node is cut off '
                    'or rank 0 is lost')

    def _node_text(self, rank: int) -> str:
        return f', {self.nodes[rank]}' if rank in self.nodes else ''

    def _exit(self, line: str) -> None:
        print(
            f'mmsync: error: {line}; ending this process within the '
            f'liveness timeout of {self.timeout:g} s, so that torchrun or '
            'Slurm can restart the run',
            file=sys.stderr,
            flush=True)
        sys.stdout.flush()
        os._exit(EXIT_STATUS)


class LivenessHook(Hook):
    """Ends a rank whose peers fall silent, within ``timeout`` seconds.

    :class:`~mmsync.engine.MMSyncRunner` registers it in every distributed
    run; ``liveness=dict(timeout=60)`` in the config sets the bound and
    ``liveness=None`` turns it off. See :mod:`mmsync.engine.hooks.liveness`.

    Args:
        timeout (float): Seconds within which every process ends once a peer
            or the store is lost. Default: 60.
    """

    priority = 'VERY_HIGH'

    def __init__(self, timeout: float = 60):
        self.timeout = timeout
        self._liveness: Optional[Liveness] = None

    def before_run(self, runner) -> None:
        if not dist.is_initialized() or dist.get_world_size() < 2:
            return
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
        self._liveness = Liveness(
            os.environ['MASTER_ADDR'],
            int(os.environ['MASTER_PORT']),
            dist.get_rank(),
            dist.get_world_size(),
            self.timeout,
            prefix=f'mmsync/liveness/{runner.timestamp}/{attempt}')
        self._liveness.start()
        runner.logger.info(f'liveness: a lost peer ends every rank within '
                           f'{self.timeout:g} s (liveness.timeout)')

    def after_run(self, runner) -> None:
        if self._liveness is not None:
            self._liveness.stop()
            self._liveness = None


HOOKS.register_module(module=LivenessHook)
ROOT_HOOKS.register_module(module=LivenessHook, force=True)
