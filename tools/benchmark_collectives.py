"""Times MMSyncBN's forward collective against the all_reduce it replaced.

The forward all_gathers every rank's (3C+2) float64 statistics row and
merges the rows in rank order (exact at any offset); a sum of moments would
need one all_reduce of 2C+2 values but cancels when mean >> std. For each
world size (gloo processes on 127.0.0.1) and channel count, both collectives
run interleaved after a barrier; rank 0 prints their medians.

Example:
    python tools/benchmark_collectives.py --worlds 2 4 8 16
"""
import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, channels, reps, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300))
    row = torch.randn(3 * channels + 2, dtype=torch.float64)
    buffer = torch.randn(2 * channels + 2, dtype=torch.float64)
    gathered = torch.empty(world, row.numel(), dtype=torch.float64)
    gather = getattr(dist, 'all_gather_single',
                     getattr(dist, 'all_gather_into_tensor', None))
    calls = {
        'all_gather': lambda: gather(gathered.view(-1), row),
        'all_reduce': lambda: dist.all_reduce(buffer),
    }
    times = {k: [] for k in calls}
    for i in range(reps):
        for name in sorted(calls, reverse=bool(i % 2)):
            dist.barrier()
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        skip = reps // 5  # warm-up
        results.put({k: statistics.median(v[skip:]) for k, v in times.items()})
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worlds', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--channels', type=int, nargs='+', default=[256, 2048])
    parser.add_argument('--reps', type=int, default=60)
    parser.add_argument('--port', type=int, default=29611)
    args = parser.parse_args()
    ctx = mp.get_context('spawn')
    print(f"{'world':>5} {'C':>6} {'all_gather (3C+2)':>18} "
          f"{'all_reduce (2C+2)':>18}")
    port = args.port
    for world in args.worlds:
        for channels in args.channels:
            results = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_worker,
                    args=(r, world, port, channels, args.reps, results))
                for r in range(world)
            ]
            for p in procs:
                p.start()
            medians = results.get(timeout=600)
            for p in procs:
                p.join()
            port += 1
            print(f"{world:5d} {channels:6d} "
                  f"{medians['all_gather'] * 1e3:15.3f} ms "
                  f"{medians['all_reduce'] * 1e3:15.3f} ms")


if __name__ == '__main__':
    main()
