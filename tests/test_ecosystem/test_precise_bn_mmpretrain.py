"""mmpretrain's PreciseBNHook with MMSyncBN at world 2 equals the same hook
in one process with BN on the concatenated batches.

mmpretrain's hook runs batches with momentum 1 and averages each batch's
running mean and unbiased variance, over batches and then over ranks with
equal weights. With MMSyncBN every rank's batch statistics are the global
batch's, so the result is the one-process hook's, the same on every rank,
also where the ranks hold 3 and 5 samples; with plain BN each rank measures
its own slice, and the variances differ (asserted, so that the comparison
is known to tell them apart). mmsync's own PreciseBNHook, which computes the
exact population statistics instead, is tested in
tests/test_engine/test_precise_bn.py.
"""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip(
    'mmpretrain.engine',
    reason='needs mmpretrain and torchvision (the second CI environment: '
    '.ci/cuda_env.sh)')

from dist_utils import run_distributed  # noqa: E402
from mmengine.model import MMDistributedDataParallel  # noqa: E402
from mmpretrain.engine.hooks.precise_bn_hook import (  # noqa: E402
    PreciseBNHook, update_bn_stats)
from test_engine import engine_test_utils as utils  # noqa: E402

from mmsync.cnn import convert_sync_batchnorm  # noqa: E402

SIZES = (3, 5)
WORLD_SIZE = len(SIZES)
ITERS = 3
NUM = sum(SIZES) * ITERS
KEYS = ('bn1.running_mean', 'bn1.running_var', 'bn2.running_mean',
        'bn2.running_var')


def running_stats(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    return {key: state[key].detach().clone() for key in KEYS}


def _mmpretrain_worker(rank: int, world_size: int, init: dict) -> dict:
    batch = utils.toy_batch(NUM)
    results = {}
    for route in ('mmsync', 'bn'):
        model = utils.ToyNet().double()
        model.load_state_dict(init)
        if route == 'mmsync':
            model = convert_sync_batchnorm(model)
        wrapped = MMDistributedDataParallel(module=model, device_ids=None)
        # What the hook does after an epoch: its num_samples, the runner's
        # model and train loader.
        runner = SimpleNamespace(
            model=wrapped,
            train_loop=SimpleNamespace(
                dataloader=utils.rank_loader(batch, SIZES, ITERS, rank)),
            logger='silent')
        PreciseBNHook(num_samples=10**6)._perform_precise_bn(runner)
        results[route] = running_stats(model)
    return results


@pytest.fixture(scope='module')
def mmpretrain_run():
    torch.manual_seed(0)
    reference = utils.ToyNet().double()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    outputs = run_distributed(
        _mmpretrain_worker, WORLD_SIZE, init, timeout=240, pg_timeout=60)
    # One process, BN, the global batches (both ranks' slices in order).
    update_bn_stats(
        reference,
        utils.rank_loader(utils.toy_batch(NUM), [sum(SIZES)], ITERS, 0),
        num_samples=10**6,
        logger='silent')
    return dict(outputs=outputs, reference=running_stats(reference))


def test_mmsyncbn_gives_the_one_process_result(mmpretrain_run):
    reference = mmpretrain_run['reference']
    results = [output['mmsync'] for output in mmpretrain_run['outputs']]
    for rank, result in enumerate(results):
        for key in KEYS:
            torch.testing.assert_close(
                result[key],
                reference[key],
                rtol=1e-12,
                atol=1e-12,
                msg=f'{key}, rank {rank}')
            assert torch.equal(result[key], results[0][key]), key


def test_plain_bn_does_not(mmpretrain_run):
    reference = mmpretrain_run['reference']
    result = mmpretrain_run['outputs'][0]['bn']
    error = max(((result[key] - reference[key]).abs() /
                 reference[key].abs()).max().item() for key in KEYS
                if key.endswith('var'))
    assert error > 1e-3
