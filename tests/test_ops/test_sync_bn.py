"""MMSyncBN against F.batch_norm over the concatenated global batch."""
import pytest
from dist_utils import run_distributed
from sync_bn_cases import check_case, run_cases, standard_cases


@pytest.mark.parametrize(
    'case', standard_cases([[6]]), ids=lambda c: c.describe())
def test_world_one(case):
    """Without any process group the layer is a world of one."""
    assert check_case(case, 0, 1) == []


@pytest.mark.parametrize('world_size, splits_list', [
    (2, [[4, 4], [3, 5], [0, 6]]),
    (3, [[2, 3, 1], [0, 4, 0], [1, 0, 2]]),
])
def test_distributed(world_size, splits_list):
    """Equal, unequal and empty splits at world 2 and 3, over the grid."""
    cases = standard_cases(splits_list)
    results = run_distributed(run_cases, world_size, cases, timeout=900)
    failures = [f for rank_failures in results for f in rank_failures]
    assert failures == [], '\n'.join(failures[:20])
