"""tools/analysis_tools/soak.py through torchrun: 1,000 steps at world 2 with unequal
per-rank batches, memory stable and the result reproducible bit for bit.

Each soak takes about 15 s on two CPU cores; the module runs three.
"""
import json
import os.path as osp
from typing import Dict, List

import pytest
from tools_launch import TOOLS, base_env, free_port, run

STEPS = 1000
MAX_RSS_GROWTH = 0.05


def torchrun_soak(out: str, *args: str) -> List[str]:
    """The torchrun command of a 2-process soak writing to ``out``."""
    return [
        'torchrun', '--nproc-per-node', '2', '--master-addr', '127.0.0.1',
        '--master-port',
        str(free_port()),
        osp.join(TOOLS, 'analysis_tools', 'soak.py'), '--out', out, *args
    ]


def soak(out: str, seed: int) -> List[Dict]:
    """Run a full soak with ``seed``; the record of each rank."""
    run(torchrun_soak(out, '--steps', str(STEPS), '--seed', str(seed),
                      '--max-rss-growth', str(MAX_RSS_GROWTH)),
        timeout=180,
        env=base_env(CUDA_VISIBLE_DEVICES=''))
    records = []
    for rank in range(2):
        with open(osp.join(out, f'rank{rank}.json'), encoding='utf-8') as f:
            records.append(json.load(f))
    return records


@pytest.fixture(scope='module')
def seed0_runs(tmp_path_factory) -> List[List[Dict]]:
    """Two soaks with seed 0, one after the other."""
    root = tmp_path_factory.mktemp('soak')
    return [soak(str(root / f'run{i}'), seed=0) for i in range(2)]


def test_memory_is_stable(seed0_runs):
    for records in seed0_runs:
        for record in records:
            assert record['steps'] == STEPS
            assert len(record['rss_trace']) >= STEPS // 100
            assert record['rss_growth'] < MAX_RSS_GROWTH, record['rss_trace']


def test_same_seed_is_bit_identical(seed0_runs):
    first, second = seed0_runs
    assert [r['batch_size'] for r in first] == [6, 10]
    for a, b in zip(first, second):
        assert len(a['losses']) == STEPS
        assert a['losses'] == b['losses']
        assert a['state_sha256'] == b['state_sha256']
    # DDP and the synchronized statistics keep the ranks' states equal.
    assert first[0]['state_sha256'] == first[1]['state_sha256']
    assert first[0]['losses'] == first[1]['losses']


def test_other_seed_differs(seed0_runs, tmp_path):
    """Guards the comparison above against a hash that ignores training."""
    other = soak(str(tmp_path / 'seed1'), seed=1)
    for a, b in zip(seed0_runs[0], other):
        assert a['state_sha256'] != b['state_sha256']
        assert a['losses'] != b['losses']


def test_rss_growth_over_limit_fails(tmp_path):
    """A limit below any growth makes every rank exit non-zero and say so."""
    result = run(
        torchrun_soak(
            str(tmp_path), '--steps', '20', '--warmup', '10', '--trace-every',
            '10', '--max-rss-growth', '-1'),
        timeout=120,
        env=base_env(CUDA_VISIBLE_DEVICES=''),
        check=False)
    assert result.returncode != 0
    for rank in range(2):
        assert ('soak.py: error: RSS grew by' in result.stderr
                and f'on rank {rank} from step 10 to 20' in result.stderr), (
                    result.stderr[-3000:])
