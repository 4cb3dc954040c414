"""One rank of MMSyncBN across simulated hosts (tests/test_tools/
test_multinode.py starts it under torchrun on every host).

Every rank builds the same global batch and takes its slice (sizes
``SPLITS``, one empty). MMSyncBN over the world, then with
``group_size='node'``, runs forward and backward in float64; every rank
sends its output, input gradient and the layer's gradients and running
statistics to rank 0, which compares them with ``F.batch_norm`` in one
process over the whole batch, then over each node's part (the layer's
gradients summed over the ranks synchronized, as DDP sums them), and
prints ``MATCH`` or raises.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmsync.ops import SyncBatchNorm

SPLITS = (3, 0, 5, 2)
CHANNELS = 4


def run_layer(x, dy, group_size):
    """This rank's results of one MMSyncBN step over its slice."""
    rank = dist.get_rank()
    start = sum(SPLITS[:rank])
    piece = x[start:start + SPLITS[rank]].clone().requires_grad_()
    layer = SyncBatchNorm(
        CHANNELS, stats_mode='N', group_size=group_size).double()
    y = layer(piece)
    y.backward(dy[start:start + SPLITS[rank]])
    return dict(
        y=y.detach(),
        dx=piece.grad,
        dw=layer.weight.grad,
        db=layer.bias.grad,
        mean=layer.running_mean,
        var=layer.running_var)


def check(x, dy, results):
    """Compare the ranks' ``results`` with BatchNorm over ``x`` in one
    process."""
    whole = x.clone().requires_grad_()
    weight = torch.ones(CHANNELS, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(CHANNELS, dtype=torch.float64, requires_grad=True)
    mean = torch.zeros(CHANNELS, dtype=torch.float64)
    var = torch.ones(CHANNELS, dtype=torch.float64)
    ref = F.batch_norm(whole, mean, var, weight, bias, training=True)
    ref.backward(dy)
    torch.testing.assert_close(
        torch.cat([r['y'] for r in results]), ref.detach())
    torch.testing.assert_close(
        torch.cat([r['dx'] for r in results]), whole.grad)
    torch.testing.assert_close(sum(r['dw'] for r in results), weight.grad)
    torch.testing.assert_close(sum(r['db'] for r in results), bias.grad)
    for r in results:
        torch.testing.assert_close(r['mean'], mean)
        torch.testing.assert_close(r['var'], var)


def main() -> None:
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(SPLITS), f'run with {len(SPLITS)} ranks, not {world}'
    per_node = int(os.environ['LOCAL_WORLD_SIZE'])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(
        sum(SPLITS), CHANNELS, 3, 3, generator=gen,
        dtype=torch.float64) * 5 + 3
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = {}
    for group_size in (None, 'node'):
        gathered = [None] * world
        dist.all_gather_object(gathered, run_layer(x, dy, group_size))
        results[group_size] = gathered
    if rank == 0:
        check(x, dy, results[None])
        for first in range(0, world, per_node):
            ranks = range(first, first + per_node)
            start = sum(SPLITS[:first])
            end = start + sum(SPLITS[r] for r in ranks)
            check(x[start:end], dy[start:end],
                  [results['node'][r] for r in ranks])
        print(
            f'MATCH over {world} ranks and per node of {per_node}', flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
