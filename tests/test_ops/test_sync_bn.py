"""MMSyncBN against F.batch_norm over the concatenated global batch."""
import pytest
from dist_utils import run_distributed
from sync_bn_cases import check_case, run_cases, standard_cases

from mmsync.ops import sync_bn_comm


@pytest.mark.parametrize(
    'case', standard_cases([[6]]), ids=lambda c: c.describe())
def test_world_one(case):
    """Without any process group the layer is a world of one."""
    assert check_case(case, 0, 1) == []


def _run_cases_summing_by(rank, world_size, cases, gather_max_ranks):
    """run_cases with the forward statistics and backward sums made by
    all_gather (groups up to ``gather_max_ranks``) or by all_reduce (the
    forward's of shifted moments, as in groups beyond 8 ranks)."""
    sync_bn_comm.GATHER_MAX_RANKS = gather_max_ranks
    return run_cases(rank, world_size, cases)


@pytest.mark.parametrize(
    'gather_max_ranks', [8, 0], ids=['all_gather', 'all_reduce'])
@pytest.mark.parametrize('world_size, splits_list', [
    (2, [[4, 4], [3, 5], [0, 6]]),
    (3, [[2, 3, 1], [0, 4, 0], [1, 0, 2]]),
])
def test_distributed(world_size, splits_list, gather_max_ranks):
    """Equal, unequal and empty splits at world 2 and 3, over the grid, with
    either kind of collective."""
    cases = standard_cases(splits_list)
    results = run_distributed(
        _run_cases_summing_by,
        world_size,
        cases,
        gather_max_ranks,
        timeout=900)
    failures = [f for rank_failures in results for f in rank_failures]
    assert failures == [], '\n'.join(failures[:20])
