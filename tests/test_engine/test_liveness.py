"""Liveness: a silent peer or an unheard store is reported within the
bound, a finished peer is not (in one process, on a local TCPStore)."""
import datetime
import queue
import time

import torch.distributed as dist
from dist_utils import free_port

from mmsync.engine.hooks import Liveness

BOUND = 2.0


def store_and_port():
    port = free_port()
    server = dist.TCPStore(
        '127.0.0.1',
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=30))
    return server, port


def ranks(port: int, lines: queue.Queue, prefix: str):
    return [
        Liveness(
            '127.0.0.1',
            port,
            rank,
            2,
            BOUND,
            prefix=prefix,
            on_lost=lambda line, rank=rank: lines.put((rank, line)))
        for rank in range(2)
    ]


def test_silent_peer_is_named_within_the_bound():
    server, port = store_and_port()
    lines = queue.Queue()
    alive, silent = ranks(port, lines, 'silent')
    alive.start()
    silent.start()
    time.sleep(3 * alive.interval)
    silent._stop.set()  # stops beating without saying it finished
    start = time.monotonic()
    rank, line = lines.get(timeout=BOUND + 5)
    assert time.monotonic() - start <= BOUND
    assert rank == 0
    assert line.startswith('rank 0 of node ') and 'rank 1 of node ' in line
    assert line.endswith(': lost')
    alive.stop()
    silent.stop()
    del server


def test_finished_peer_is_no_loss():
    server, port = store_and_port()
    lines = queue.Queue()
    first, second = ranks(port, lines, 'finished')
    first.start()
    second.start()
    time.sleep(3 * first.interval)
    second.stop()
    time.sleep(2 * BOUND)
    first.stop()
    assert lines.empty(), lines.get()
    del server


def test_unheard_store_is_reported_within_the_bound():
    lines = queue.Queue()
    lone = ranks(free_port(), lines, 'nostore')[0]
    start = time.monotonic()
    lone.start()
    rank, line = lines.get(timeout=BOUND + 5)
    assert time.monotonic() - start <= BOUND
    assert 'the store of the process group at 127.0.0.1:' in line
    assert 'has not answered for' in line
    lone.stop()
