"""One rank of MMSyncBN across simulated hosts (tests/test_tools/
test_multinode.py starts it under torchrun on every host).

Every rank builds the same global batch, takes its slice (sizes
``SPLITS``, one empty), runs MMSyncBN forward and backward in float64 and
sends its output, input gradient and the layer's gradients and running
statistics to rank 0, which compares them with ``F.batch_norm`` over the
whole batch in one process (the layer's gradients summed over the ranks,
as DDP sums them) and prints ``MATCH`` or raises.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmsync.ops import SyncBatchNorm

SPLITS = (3, 0, 5, 2)
CHANNELS = 4


def main() -> None:
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(SPLITS), f'run with {len(SPLITS)} ranks, not {world}'
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(
        sum(SPLITS), CHANNELS, 3, 3, generator=gen,
        dtype=torch.float64) * 5 + 3
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    start = sum(SPLITS[:rank])
    piece = x[start:start + SPLITS[rank]].clone().requires_grad_()
    layer = SyncBatchNorm(CHANNELS, stats_mode='N').double()
    y = layer(piece)
    y.backward(dy[start:start + SPLITS[rank]])
    mine = dict(
        y=y.detach(),
        dx=piece.grad,
        dw=layer.weight.grad,
        db=layer.bias.grad,
        mean=layer.running_mean,
        var=layer.running_var)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        whole = x.clone().requires_grad_()
        weight = torch.ones(CHANNELS, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(CHANNELS, dtype=torch.float64, requires_grad=True)
        mean = torch.zeros(CHANNELS, dtype=torch.float64)
        var = torch.ones(CHANNELS, dtype=torch.float64)
        ref = F.batch_norm(whole, mean, var, weight, bias, training=True)
        ref.backward(dy)
        got = {
            key: torch.cat([g[key] for g in gathered])
            for key in ('y', 'dx')
        }
        torch.testing.assert_close(got['y'], ref.detach())
        torch.testing.assert_close(got['dx'], whole.grad)
        # Each rank holds the gradient of its slice; DDP would sum them.
        torch.testing.assert_close(sum(g['dw'] for g in gathered), weight.grad)
        torch.testing.assert_close(sum(g['db'] for g in gathered), bias.grad)
        for g in gathered:
            torch.testing.assert_close(g['mean'], mean)
            torch.testing.assert_close(g['var'], var)
        print(
            f'MATCH over {world} ranks on '
            f'{os.environ.get("GROUP_WORLD_SIZE", "?")} nodes',
            flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
