"""Soak run: many DDP training steps with MMSyncBN, watching memory and
reproducibility.

A small CNN with two MMSyncBN layers (``stats_mode='N'``, one with the fused
ReLU) trains for ``--steps`` SGD steps on synthetic data drawn from the seed
and the rank, with a different batch size on every rank. Each rank records
its resident memory (current RSS, after ``gc.collect()``) every
``--trace-every`` steps, the global loss of every step, and a sha256 of the
final weights and buffers, and writes them to ``OUT/rank<r>.json``. Two runs
with the same seed must give the same hash and losses bit for bit; memory
that keeps growing after the warm-up means a leak. Exits with status 1 if a
loss is not finite or RSS grew by ``--max-rss-growth`` or more on any rank.

Example:
    torchrun --nproc-per-node 2 tools/analysis_tools/soak.py --steps 1000 --seed 0 \\
        --out work_dirs/soak
"""
import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import os.path as osp
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mmsync.ops import SyncBatchNorm

CLASSES = 10


def parse_args():
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Soak run of MMSyncBN under DDP (launch with torchrun).')
    parser.add_argument('--steps', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', required=True, help='folder for rank*.json')
    parser.add_argument(
        '--batch-sizes',
        type=int,
        nargs='+',
        default=[6, 10],
        help='samples per step of each rank, cycled over the ranks '
        '(default: %(default)s)')
    parser.add_argument(
        '--image-size',
        type=int,
        nargs=3,
        default=[16, 8, 8],
        metavar=('C', 'H', 'W'),
        help='input shape of one sample (default: %(default)s)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=100,
        help='step whose RSS is the baseline of the growth check '
        '(default: %(default)s)')
    parser.add_argument(
        '--trace-every',
        type=int,
        default=100,
        help='RSS sampling interval in steps (default: %(default)s)')
    parser.add_argument(
        '--max-rss-growth',
        type=float,
        default=0.05,
        help='fail if RSS at the end exceeds RSS at the warm-up step by this '
        'fraction or more (default: %(default)s)')
    parser.add_argument(
        '--pg-timeout',
        type=float,
        default=60,
        help='seconds a collective may wait before the run fails '
        '(default: %(default)s)')
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error(f'--warmup must be in [1, --steps), got {args.warmup} '
                     f'with --steps {args.steps}')
    return args


class SoakNet(nn.Module):
    """Conv - MMSyncBN - ReLU - Conv - MMSyncBN(relu) - pool - Linear."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = SyncBatchNorm(width, stats_mode='N')
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = SyncBatchNorm(width, stats_mode='N', act='relu')
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    gc.collect()
    with open('/proc/self/statm', encoding='ascii') as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE')


def state_sha256(module: nn.Module) -> str:
    """sha256 over the names and raw bytes of the state_dict, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(
            torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_batch(generator: torch.Generator, teacher: torch.Tensor,
               batch_size: int, image_size: List[int]):
    """Random images and the labels a fixed linear teacher gives them."""
    images = torch.randn(batch_size, *image_size, generator=generator)
    labels = (images.mean((2, 3)) @ teacher).argmax(1)
    return images, labels


def train(args, rank: int, world_size: int) -> Dict:
    """Run the soak on this rank; returns its record."""
    batch_size = args.batch_sizes[rank % len(args.batch_sizes)]
    global_batch = sum(args.batch_sizes[r % len(args.batch_sizes)]
                       for r in range(world_size))
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = SoakNet(args.image_size[0])
    teacher = torch.randn(args.image_size[0], CLASSES)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(
        ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)

    losses, trace = [], []
    rss_warmup = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = make_batch(generator, teacher, batch_size,
                                    args.image_size)
        # The sum over this rank times world / global batch: after DDP's
        # average, the gradient of the global batch mean.
        loss_sum = F.cross_entropy(ddp(images), labels, reduction='sum')
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (world_size / global_batch)).backward()
        optimizer.step()

        total = loss_sum.detach().reshape(1)
        dist.all_reduce(total)
        loss = total.item() / global_batch
        if not math.isfinite(loss):
            raise FloatingPointError(f'loss is {loss} at step {step}')
        losses.append(loss)
        if step == args.warmup:
            rss_warmup = current_rss()
        if step % args.trace_every == 0 or step in (1, args.steps):
            trace.append([step, current_rss()])
    wall = time.perf_counter() - start
    rss_end = trace[-1][1]
    return dict(
        rank=rank,
        world_size=world_size,
        seed=args.seed,
        steps=args.steps,
        batch_size=batch_size,
        image_size=args.image_size,
        wall_s=wall,
        rss_trace=trace,
        rss_warmup_step=args.warmup,
        rss_warmup=rss_warmup,
        rss_end=rss_end,
        rss_growth=rss_end / rss_warmup - 1,
        losses=[x.hex() for x in losses],
        state_sha256=state_sha256(model),
        torch=torch.__version__)


def main():
    args = parse_args()
    if 'RANK' not in os.environ:
        sys.exit('soak.py: error: start it with torchrun, e.g. torchrun '
                 '--nproc-per-node 2 tools/analysis_tools/soak.py --out DIR')
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group(
        'gloo', timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        record = train(args, rank, world_size)
        os.makedirs(args.out, exist_ok=True)
        with open(
                osp.join(args.out, f'rank{rank}.json'), 'w',
                encoding='utf-8') as f:
            json.dump(record, f, indent=1)
        growth = torch.tensor([record['rss_growth']], dtype=torch.float64)
        growths = [torch.zeros_like(growth) for _ in range(world_size)]
        dist.all_gather(growths, growth)
    finally:
        dist.destroy_process_group()
    growths = [g.item() for g in growths]
    if rank == 0:
        print(f'soak: {args.steps} steps at world {world_size} in '
              f'{record["wall_s"]:.1f} s (rank 0), final loss '
              f'{float.fromhex(record["losses"][-1]):.4f}, state sha256 '
              f'{record["state_sha256"][:16]}')
        print('soak: RSS growth from step '
              f'{args.warmup} to {args.steps} by rank: ' +
              ', '.join(f'{g:+.2%}' for g in growths))
    if record['rss_growth'] >= args.max_rss_growth:
        print(
            f'soak.py: error: RSS grew by {record["rss_growth"]:.2%} on '
            f'rank {rank} from step {args.warmup} to {args.steps} (limit '
            f'{args.max_rss_growth:.0%}; trace {record["rss_trace"]})',
            file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
