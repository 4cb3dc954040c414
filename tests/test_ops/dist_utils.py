"""Runs a function on real processes joined by gloo on 127.0.0.1.

Every wait is bounded: the process group times out, and the parent kills the
workers once its own deadline passes, so a bug fails a test instead of
hanging it.
"""
import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results, pg_timeout):
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            'gloo',
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout))
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn,
                    world_size: int,
                    *args,
                    timeout: float = 180,
                    pg_timeout: float = 30):
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` processes.

    Args:
        fn: A module-level function (spawned processes import it).
        world_size (int): Number of processes.
        timeout (float): Seconds after which all workers are killed.
        pg_timeout (float): Timeout of the gloo process group.

    Returns:
        list: ``fn``'s return value of each rank, by rank.

    Raises:
        AssertionError: A worker raised (its traceback is shown) or the
            workers did not finish within ``timeout``.
    """
    ctx = mp.get_context('spawn')
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, results, pg_timeout),
            daemon=True) for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    outputs, errors = {}, {}
    try:
        while len(outputs) + len(errors) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = results.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(
                    f'distributed run of {fn.__name__} timed out after '
                    f'{timeout}s; finished ranks: '
                    f'{sorted(outputs) + sorted(errors)}') from None
            (outputs if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError('\n'.join(f'rank {r} raised:\n{tb}'
                                       for r, tb in sorted(errors.items())))
    return [outputs[r] for r in range(world_size)]
