"""Exact statistics far from zero: float64 inputs whose mean is up to 1e8
standard deviations away from zero, at world 1 and across real processes
whose local means differ.

The reference is ``F.batch_norm`` over the concatenated batch shifted by the
offset K: every value lies in [K/2, 2K], so x - K is exact in float64, and
batch normalization does not depend on the shift. ``F.batch_norm`` of the
unshifted batch is held to the same reference; MMSyncBN must stay within 10
times that error (a sum of E[x^2] - mean^2 across ranks loses about
(mean / std)^2 units of rounding: ~1e3 at 1e8).
"""
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from mmsync.ops import SyncBatchNorm

RATIOS = (1e4, 1e6, 1e7, 1e8)
# (stats_mode, per-rank batch sizes): every case's rank weights agree with
# the concatenated batch's, including an empty rank.
SPLITS = (('N', (3, 5)), ('N', (0, 6)), ('default', (4, 4)), ('default', (0,
                                                                          6)))
MOMENTUM = 0.1


def _batch(ratio, sizes):
    """Per-rank (n, 3, 5) float64 batches with std ~1 around ``ratio``,
    rank r's local mean shifted by 3 * r."""
    gen = torch.Generator().manual_seed(int(ratio) % 1000 + len(sizes))
    parts = []
    for r, n in enumerate(sizes):
        noise = torch.randn(n, 3, 5, generator=gen, dtype=torch.float64)
        parts.append((noise * (1 + r) + 3.0 * r) + ratio)
    return parts


def _bn(x, shift):
    """F.batch_norm (training) of ``x - shift``: output and running_var."""
    rm = torch.zeros(x.size(1), dtype=torch.float64)
    rv = torch.ones(x.size(1), dtype=torch.float64)
    y = F.batch_norm(x - shift, rm, rv, None, None, True, MOMENTUM, 1e-5)
    return y, rv


def _errors(ratio, sizes, rank, stats_mode):
    """MMSyncBN's error on this rank's slice and F.batch_norm's own error,
    for the output and the running variance."""
    parts = _batch(ratio, sizes)
    x = torch.cat(parts)
    ref_y, ref_rv = _bn(x, ratio)
    own_y, own_rv = _bn(x, 0.0)
    layer = SyncBatchNorm(
        3, momentum=MOMENTUM, affine=False, stats_mode=stats_mode).double()
    lo = sum(sizes[:rank])
    y = layer(parts[rank])
    mine = slice(lo, lo + sizes[rank])
    return dict(
        y=(y - ref_y[mine]).abs().max().item() if sizes[rank] else 0.0,
        own_y=(own_y - ref_y).abs().max().item(),
        rv=(layer.running_var - ref_rv).abs().max().item(),
        own_rv=(own_rv - ref_rv).abs().max().item(),
        rv_scale=ref_rv.abs().max().item())


def _check(errors):
    # Ten times F.batch_norm's own error, and never below a few units of
    # float64 rounding (its own error can happen to be 0).
    eps = 2.0**-52
    y_tol = 10 * max(errors['own_y'], 4 * eps)
    rv_tol = 10 * max(errors['own_rv'], 4 * eps * errors['rv_scale'])
    assert errors['y'] <= y_tol, errors
    assert errors['rv'] <= rv_tol, errors


@pytest.mark.parametrize('ratio', RATIOS, ids=lambda r: f'{r:g}')
def test_world_one(ratio):
    for stats_mode in ('N', 'default'):
        _check(_errors(ratio, (7, ), 0, stats_mode))


def _world_two(rank, world_size):
    return [
        _errors(ratio, sizes, rank, stats_mode) for ratio in RATIOS
        for stats_mode, sizes in SPLITS
    ]


def test_world_two():
    """Two ranks with different local means, equal, unequal and empty."""
    results = run_distributed(_world_two, 2)
    for rank_errors in results:
        for errors in rank_errors:
            _check(errors)
