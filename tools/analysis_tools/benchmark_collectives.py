"""SyncBN communication at scale: a latency-bandwidth model of one training
step from 8 to 4096 GPUs, and its validation against gloo measured here.

What each implementation sends per BatchNorm call and step (C channels):

================  ==========================================  =============
implementation    forward                                     backward
================  ==========================================  =============
torch SyncBN      all_gather of 2C+1 float32 (mean, invstd,   all_reduce 2C
                  count)                                      float32
mmcv MMSyncBN     all_reduce C+1 float32 (mean, flag), then   2 all_reduce
                  all_reduce C float32 (var)                  of C float32
mmsync (before)   all_gather of 3C+2 float64 at any size      all_gather 2C
                                                              f64 (<= 8),
                                                              all_reduce
mmsync            <= 8 ranks: all_gather of 3C+2 float64;     as before
                  beyond: all_reduce of 3C+2 float64
================  ==========================================  =============

The model is NCCL's own (src/graph/tuning.cc of NVIDIA/nccl, the tuner
that picks an algorithm and protocol per call): time = latency + bytes /
bandwidth, with a ring latency of base + (steps - inter-node steps) *
intra-node hop + inter-node steps * network hop, and a tree (all_reduce
only) of base + 2 * ((GPUs per node - 1) * intra hop + log2(nodes) *
network hop); NCCL takes the fastest of ring/tree x LL/Simple. Its
constants (microseconds) are NCCL's tables; bandwidths are per GPU: NVLink
4 (H100: 900 GB/s both ways, 450 each; NCCL's all_reduce bus bandwidth on
a DGX H100 is about 360 GB/s) and one 200 Gb/s InfiniBand port per GPU (25
GB/s; NDR 400 Gb/s doubles it: ``--ib-gbps``), 8 GPUs per node.

``--measure`` times gloo's all_reduce and all_gather of the sizes above at
several world sizes on this machine (processes on 127.0.0.1, one thread
each), fits the same form (a base, a hop latency, a per-byte time; gloo's
ring algorithms) and prints the model's ratio to every measurement.

Examples:
    python tools/analysis_tools/benchmark_collectives.py                  # the model
    python tools/analysis_tools/benchmark_collectives.py --measure --worlds 2 4 8 12 16
    python tools/analysis_tools/benchmark_collectives.py --plot docs/scaling.png
"""
import argparse
import datetime
import json
import math
import os
import statistics
import time

# NCCL's tuning constants (src/graph/tuning.cc, NVIDIA/nccl): base latency
# per algorithm and protocol, and the latency of one hop over NVLink and
# over the network, in microseconds.
BASE_LAT = {
    ('tree', 'LL'): 4.4,
    ('tree', 'Simple'): 0.0,
    ('ring', 'LL'): 3.6,
    ('ring', 'Simple'): 8.4
}
HW_LAT = {
    'nvlink': {
        ('tree', 'LL'): 0.52,
        ('tree', 'Simple'): 28.0,
        ('ring', 'LL'): 0.47,
        ('ring', 'Simple'): 3.4
    },
    'net': {
        ('tree', 'LL'): 5.0,
        ('tree', 'Simple'): 50.0,
        ('ring', 'LL'): 2.7,
        ('ring', 'Simple'): 9.6
    },
}
# LL moves 8 bytes of data with 8 of flags and polls: NCCL's tuner gives it
# a quarter of the link's bandwidth for all_reduce (a third for gathers).
LL_BW = {'all_reduce': 0.25, 'all_gather': 1 / 3}
GPUS_PER_NODE = 8
NVLINK_GBPS = 360.0
WORLDS = (8, 64, 512, 4096)
NODE_GROUP = "mmsync group_size='node'"
IMPLEMENTATIONS = ('torch SyncBN', 'mmcv MMSyncBN', 'mmsync before', 'mmsync',
                   NODE_GROUP)


def resnet50_channels():
    """The channels of ResNet-50's 53 BatchNorms (26,560 in all)."""
    channels = [64]
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        channels += [planes, planes, 4 * planes] * blocks + [4 * planes]
    return channels


def resnet50_fpn_channels():
    """ResNet-50 and an FPN neck of 4 levels with a BatchNorm after each of
    its 8 convolutions (mmdet's FPN with ``norm_cfg``), 256 channels."""
    return resnet50_channels() + [256] * 8


MODELS = {
    'ResNet-50': resnet50_channels,
    'ResNet-50 + FPN': resnet50_fpn_channels
}


def calls(implementation, channels, world):
    """The collectives of one BatchNorm call's forward and backward:
    (kind, bytes each rank contributes)."""
    C = channels
    if implementation == 'torch SyncBN':
        return [('all_gather', 4 * (2 * C + 1)), ('all_reduce', 4 * 2 * C)]
    if implementation == 'mmcv MMSyncBN':
        return [('all_reduce', 4 * (C + 1)), ('all_reduce', 4 * C),
                ('all_reduce', 4 * C), ('all_reduce', 4 * C)]
    gathered = world <= GPUS_PER_NODE
    backward = ('all_gather' if gathered else 'all_reduce', 8 * 2 * C)
    if implementation == 'mmsync before' or gathered:
        return [('all_gather', 8 * (3 * C + 2)), backward]
    return [('all_reduce', 8 * (3 * C + 2)), backward]


class NcclModel:
    """NCCL's latency-bandwidth model of one collective on ``world`` GPUs,
    ``GPUS_PER_NODE`` to a node (fewer: one node)."""

    def __init__(self, ib_gbps=25.0, nvlink_gbps=NVLINK_GBPS):
        self.ib_gbps = ib_gbps
        self.nvlink_gbps = nvlink_gbps

    def time_us(self, kind, nbytes, world):
        """(time in us, algorithm, sequential hops, bytes a rank receives)
        of the fastest choice NCCL's tuner has for this call."""
        if world == 1:
            return 0.0, '-', 0, 0
        per_node = min(world, GPUS_PER_NODE)
        nodes = math.ceil(world / per_node)
        link = self.nvlink_gbps if nodes == 1 else self.ib_gbps
        best = None
        for algo in (('ring', 'tree') if kind == 'all_reduce' else ('ring', )):
            if algo == 'tree' and nodes == 1:
                continue
            for proto in ('LL', 'Simple'):
                intra = HW_LAT['nvlink'][algo, proto]
                if nodes > 1 and proto == 'LL':
                    intra *= 1.8
                inter = HW_LAT['net'][algo, proto]
                if algo == 'ring':
                    steps = (2 *
                             (world - 1) if kind == 'all_reduce' else world -
                             1)
                    inter_steps = (2 * (nodes - 1)
                                   if kind == 'all_reduce' else nodes - 1)
                    hops = steps
                    lat = (
                        BASE_LAT[algo, proto] + (steps - inter_steps) * intra +
                        inter_steps * inter)
                    moved = (2 * (world - 1) / world *
                             nbytes if kind == 'all_reduce' else
                             (world - 1) * nbytes)
                else:
                    hops = 2 * ((per_node - 1) + math.ceil(math.log2(nodes)))
                    lat = BASE_LAT[algo, proto] + 2 * (
                        (per_node - 1) * intra +
                        math.ceil(math.log2(nodes)) * inter)
                    moved = 2 * nbytes
                bw = link * (LL_BW[kind] if proto == 'LL' else 1.0)
                t = lat + moved / (bw * 1e3)  # GB/s = 1e3 bytes per us
                if best is None or t < best[0]:
                    best = (t, f'{algo}/{proto}', hops, moved)
        return best


def step_cost(model, implementation, layer_channels, world):
    """(bytes a rank receives, sequential hops, modeled ms) of the SyncBN
    collectives of one training step (every layer once, each way)."""
    if implementation == NODE_GROUP:
        # The nodes' groups run apart: each costs what one node's does.
        implementation, world = 'mmsync', min(world, GPUS_PER_NODE)
    nbytes = hops = 0
    us = 0.0
    for C in layer_channels:
        for kind, size in calls(implementation, C, world):
            t, _, h, moved = model.time_us(kind, size, world)
            us += t
            hops += h
            nbytes += moved
    return nbytes, hops, us / 1e3


def _fmt_bytes(n):
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
        if n >= scale:
            return f'{n / scale:.1f} {unit}'
    return f'{n:.0f} B'


def print_model(model, worlds):
    for name, layers in MODELS.items():
        channels = layers()
        print(f'\n{name}: {len(channels)} BatchNorms, {sum(channels)} '
              f'channels; {model.ib_gbps:g} GB/s InfiniBand per GPU\n')
        print('| implementation | ' + ' | '.join(f'W = {w}'
                                                 for w in worlds) + ' |')
        print('| --- |' + ' --- |' * len(worlds))
        for impl in IMPLEMENTATIONS:
            cells = []
            for w in worlds:
                nbytes, hops, ms = step_cost(model, impl, channels, w)
                cells.append(f'{ms:.1f} ms, {_fmt_bytes(nbytes)}, {hops} hops')
            print(f'| {impl} | ' + ' | '.join(cells) + ' |')


def plot(model, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    worlds = [2**k for k in range(3, 13)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (name, layers) in zip(axes, MODELS.items()):
        for impl in IMPLEMENTATIONS:
            ax.plot(
                worlds,
                [step_cost(model, impl, layers(), w)[2] for w in worlds],
                marker='o',
                label=impl)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('GPUs (8 per node)')
        ax.set_title(name)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].set_ylabel('SyncBN communication per step (ms, modeled)')
    axes[0].legend()
    fig.suptitle('NCCL latency-bandwidth model: NVLink in a node, '
                 f'{model.ib_gbps:g} GB/s InfiniBand per GPU across nodes')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'wrote {path}')


# ---------------------------------------------------------------- gloo


def _worker(rank, world, port, sizes, reps, results):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300))
    gather = getattr(dist, 'all_gather_single',
                     getattr(dist, 'all_gather_into_tensor', None))
    ops = {}
    for n in sizes:
        src = torch.randn(n, dtype=torch.float64)
        out = torch.empty(world * n, dtype=torch.float64)
        ops['all_gather', n] = lambda s=src, o=out: gather(o, s)
        ops['all_reduce', n] = lambda s=src: dist.all_reduce(s)
    times = {k: [] for k in ops}
    for i in range(reps):
        for key in sorted(ops, reverse=bool(i % 2)):
            dist.barrier()
            start = time.perf_counter()
            ops[key]()
            times[key].append(time.perf_counter() - start)
    if rank == 0:
        skip = reps // 5  # warm-up
        results.put({k: statistics.median(v[skip:]) for k, v in times.items()})
    dist.destroy_process_group()


def measure(worlds, sizes, reps, port):
    """Median seconds of each (kind, values) at each world size."""
    import torch.multiprocessing as mp
    ctx = mp.get_context('spawn')
    out = {}
    for world in worlds:
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_worker, args=(r, world, port, sizes, reps, results))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        medians = results.get(timeout=1800)
        for p in procs:
            p.join()
        port += 1
        for (kind, n), t in medians.items():
            out[world, kind, n] = t
    return out


def gloo_terms(kind, nbytes, world):
    """(hops, bytes a rank sends) of gloo's ring all_reduce (reduce-scatter
    and all-gather of W chunks) and ring all_gather."""
    if kind == 'all_reduce':
        return 2 * (world - 1), 2 * (world - 1) / world * nbytes
    return world - 1, (world - 1) * nbytes


def fit(measured, cores):
    """Fits t = base + hops * hop + bytes * per_byte to the measurements,
    with one hop latency while the ranks fit on the cores and another
    beyond (a hop then waits for the receiving process to be scheduled):
    the intra- and inter-node hops of the NCCL model. Minimizes the largest
    relative error (Lawson's reweighted least squares). Returns the
    parameters."""
    import numpy as np
    rows, target = [], []
    for (world, kind, n), t in measured.items():
        hops, moved = gloo_terms(kind, 8 * n, world)
        rows.append([
            1.0, hops if world <= cores else 0, hops if world > cores else 0,
            moved
        ])
        target.append(t)
    a = np.array(rows) / np.array(target)[:, None]  # relative residuals
    ones = np.ones(len(target))
    weights = ones / len(target)
    for _ in range(200):
        root = np.sqrt(weights)
        params, *_ = np.linalg.lstsq(
            a * root[:, None], ones * root, rcond=None)
        params = np.maximum(params, 0.0)
        error = np.abs(a @ params - ones)
        weights = weights * error + 1e-12
        weights /= weights.sum()
    return dict(
        zip(('base_s', 'hop_s', 'oversubscribed_hop_s', 'byte_s'),
            params.tolist()))


def predict(params, world, kind, n, cores):
    hops, moved = gloo_terms(kind, 8 * n, world)
    hop = params['hop_s'] if world <= cores else params['oversubscribed_hop_s']
    return params['base_s'] + hops * hop + moved * params['byte_s']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worlds', type=int, nargs='+', default=None)
    parser.add_argument(
        '--ib-gbps',
        type=float,
        default=25.0,
        help='InfiniBand bandwidth per GPU in GB/s (25: 200 Gb/s)')
    parser.add_argument('--plot', help='write the modeled curves here (PNG)')
    parser.add_argument(
        '--measure', action='store_true', help='time gloo here and fit')
    parser.add_argument(
        '--channels',
        type=int,
        nargs='+',
        default=[64, 2048],
        help='(--measure) layer widths: rows of 3C+2 and sums of 2C values')
    parser.add_argument('--reps', type=int, default=40)
    parser.add_argument('--port', type=int, default=29611)
    parser.add_argument('--json', help='(--measure) write the numbers here')
    parser.add_argument(
        '--refit',
        metavar='JSON',
        help='fit and print the measurements of an earlier --json')
    args = parser.parse_args()
    model = NcclModel(ib_gbps=args.ib_gbps)
    if not (args.measure or args.refit):
        print_model(model, args.worlds or WORLDS)
        if args.plot:
            plot(model, args.plot)
        return
    if args.refit:
        with open(args.refit) as f:
            saved = json.load(f)
        cores = saved['cores']
        measured = {
            (r['world'], r['kind'], r['values']): r['measured_s']
            for r in saved['rows']
        }
    else:
        worlds = args.worlds or [2, 4, 8, 12, 16]
        sizes = sorted({n for C in args.channels for n in (3 * C + 2, 2 * C)})
        cores = len(os.sched_getaffinity(0))
        measured = measure(worlds, sizes, args.reps, args.port)
    params = fit(measured, cores)
    print(f'gloo on {cores} cores, fitted: base {params["base_s"]*1e3:.3f} '
          f'ms, hop {params["hop_s"]*1e3:.3f} ms (ranks <= cores), '
          f'{params["oversubscribed_hop_s"]*1e3:.3f} ms (more ranks than '
          'cores), ' +
          (f'{1e-9 / params["byte_s"]:.2f} GB/s' if params['byte_s'] >
           0 else 'no bandwidth term'))
    print('| W | collective | values | measured | model | model / measured |')
    print('| --- | --- | --- | --- | --- | --- |')
    worst = 1.0
    rows = []
    for (world, kind, n), t in sorted(measured.items()):
        m = predict(params, world, kind, n, cores)
        ratio = m / t
        worst = max(worst, ratio, 1 / ratio)
        rows.append(
            dict(world=world, kind=kind, values=n, measured_s=t, model_s=m))
        print(f'| {world} | {kind} | {n} | {t * 1e3:.3f} ms | '
              f'{m * 1e3:.3f} ms | {ratio:.2f} |')
    print(f'worst model/measured factor: {worst:.2f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                dict(
                    params=params, cores=cores, rows=rows, worst_factor=worst),
                f,
                indent=1)


if __name__ == '__main__':
    main()
