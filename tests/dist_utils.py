"""Runs a function on real processes joined by gloo on 127.0.0.1.

Shared by every test folder (tests/conftest.py puts this folder on
sys.path). Every wait is bounded: the process group times out, and the
parent kills the workers once its own deadline passes or as soon as one
rank fails, so a bug fails a test instead of hanging it.
"""
import datetime
import io
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


def join_group(rank: int, world_size: int, port: int,
               pg_timeout: float) -> None:
    """Makes this process rank ``rank`` of a gloo group on 127.0.0.1, with
    one thread and torchrun's variables (for code, like mmengine, that reads
    them)."""
    os.environ.update(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout))


def _worker(fn, rank, world_size, port, args, results, pg_timeout):
    try:
        join_group(rank, world_size, port, pg_timeout)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # reported to the parent, which fails the test
        results.put((rank, None, traceback.format_exc()))


def run_distributed(fn,
                    world_size: int,
                    *args,
                    timeout: float = 180,
                    pg_timeout: float = 30):
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` processes.

    Args:
        fn: A module-level function (spawned processes import it); its
            return value must be loadable by ``torch.load``.
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
                rank, payload, error = results.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(
                    f'distributed run of {fn.__name__} timed out after '
                    f'{timeout}s; finished ranks: {sorted(outputs)}, failed '
                    f'ranks: {sorted(errors)}') from None
            if error is not None:
                # The others may wait in a collective until the group times
                # out: fail now, with this traceback.
                errors[rank] = error
                break
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
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


def backward_fixed_loss(model, outputs, weights):
    """Backpropagates the fixed loss ``sum(output * weight)`` through
    ``model``; returns the outputs, every parameter's gradient and every
    running statistic, as float64 copies (what the exactness tests of
    whole models compare with one process)."""
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights))
    loss.backward()
    grads = {
        n: p.grad.detach().to(torch.float64, copy=True)
        for n, p in model.named_parameters() if p.grad is not None
    }
    stats = {
        n: b.detach().to(torch.float64, copy=True)
        for n, b in model.named_buffers() if 'running' in n
    }
    return [o.detach().to(torch.float64, copy=True)
            for o in outputs], grads, stats
