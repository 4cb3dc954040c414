"""mmsync's PreciseBNHook: population statistics exact over the global
batches at world 2 (gloo), for MMSyncBN and plain BN alike.

The ranks hold 3 and 5 samples of each of 3 global batches. The oracle runs
the plain-BN model in this process on each global batch (the two slices
concatenated) in float64, and takes the mean and unbiased variance of every
input each norm saw over all batches. Routes, in one spawn: the model with
MMSyncBN (``convert_sync_batchnorm``) and with plain BN, each wrapped in
DDP, through ``update_bn_stats``; ``num_samples`` that the two ranks would
turn into different numbers of batches; and the hook named in
``custom_hooks`` of an ``MMSyncRunner`` (``sync_bn='mmsync'``) after one
epoch at learning rate 0.
"""
import pytest
import torch
from dist_utils import run_distributed
from engine_test_utils import ToyNet, rank_loader, toy_batch
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import HOOKS

from mmsync.cnn import convert_sync_batchnorm
from mmsync.engine import MMSyncRunner, PreciseBNHook, update_bn_stats
from mmsync.engine.hooks import merge_moments

SIZES = (3, 5)
WORLD_SIZE = len(SIZES)
ITERS = 3
NUM = sum(SIZES) * ITERS
NORMS = ('bn1', 'bn2')


def norm_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _precise_bn_worker(rank: int, world_size: int, init: dict,
                       work_dir: str) -> dict:
    batch = toy_batch(NUM)
    results = {}
    for route in ('mmsync', 'bn', 'limited'):
        model = ToyNet().double()
        model.load_state_dict(init)
        if route != 'bn':
            model = convert_sync_batchnorm(model)
        wrapped = MMDistributedDataParallel(module=model, device_ids=None)
        # 16 samples: rank 0 alone would run 16 // (3 * 2) = 2 batches,
        # rank 1 16 // (5 * 2) = 1; both must run 1.
        num_samples = 16 if route == 'limited' else 10**6
        batches = update_bn_stats(wrapped,
                                  rank_loader(batch, SIZES, ITERS, rank),
                                  num_samples)
        results[route] = dict(
            state=norm_state(model),
            batches=batches,
            types=[type(m).__name__ for m in model.norms])

    model = ToyNet().double()
    model.load_state_dict(init)
    runner = MMSyncRunner(
        model=model,
        work_dir=work_dir,
        launcher='pytorch',
        train_dataloader=rank_loader(batch, SIZES, ITERS, rank),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.0)),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=None),
        custom_hooks=[dict(type='PreciseBNHook', num_samples=10**6)],
        log_level='WARNING',
        cfg=Config(dict(sync_bn='mmsync', preflight=False)))
    runner.train()
    module = runner.model.module
    results['hook'] = dict(
        state=norm_state(module),
        batches=ITERS,
        types=[type(m).__name__ for m in module.norms])
    return results


def population(init: dict, batches: int) -> dict:
    """The oracle: BN on each global batch in one process; the mean and
    unbiased variance of every input of each norm over ``batches``."""
    model = ToyNet().double()
    model.load_state_dict(init)
    inputs = {name: [] for name in NORMS}
    for name in NORMS:
        getattr(model, name).register_forward_pre_hook(
            lambda layer, args, name=name: inputs[name].append(args[0]))
    batch = toy_batch(NUM)['inputs']
    size = sum(SIZES)
    with torch.no_grad():
        for i in range(batches):
            model(batch[i * size:(i + 1) * size])
    stats = {}
    for name in NORMS:
        x = torch.cat(inputs[name]).transpose(0, 1).flatten(1)
        stats[f'{name}.running_mean'] = x.mean(1)
        stats[f'{name}.running_var'] = x.var(1)
    return stats


@pytest.fixture(scope='module')
def precise_run(tmp_path_factory):
    torch.manual_seed(0)
    init = norm_state(ToyNet().double())
    outputs = run_distributed(
        _precise_bn_worker,
        WORLD_SIZE,
        init,
        str(tmp_path_factory.mktemp('precise_bn')),
        timeout=240,
        pg_timeout=60)
    return dict(
        outputs=outputs,
        init=init,
        population={
            ITERS: population(init, ITERS),
            1: population(init, 1)
        })


@pytest.mark.parametrize('route', ['mmsync', 'bn', 'limited', 'hook'])
def test_population_statistics_exact_and_identical(precise_run, route):
    results = [output[route] for output in precise_run['outputs']]
    batches = results[0]['batches']
    assert batches == (1 if route == 'limited' else ITERS)
    expected = precise_run['population'][batches]
    for rank, result in enumerate(results):
        assert result['batches'] == batches
        assert result['types'] == (['BatchNorm2d'] *
                                   2 if route == 'bn' else ['SyncBatchNorm'] *
                                   2)
        for key, value in expected.items():
            torch.testing.assert_close(
                result['state'][key],
                value,
                rtol=1e-12,
                atol=1e-12,
                msg=f'{route} {key}, rank {rank}')
            # The same bits on every rank.
            assert torch.equal(result['state'][key],
                               results[0]['state'][key]), key


@pytest.mark.parametrize('route', ['mmsync', 'bn', 'limited', 'hook'])
def test_weights_and_batch_count_unchanged(precise_run, route):
    """The pass moves nothing but the running statistics (the hook route
    trained one epoch at learning rate 0, which counted its batches)."""
    init = precise_run['init']
    state = precise_run['outputs'][0][route]['state']
    for key, value in init.items():
        if 'running' in key:
            assert not torch.equal(state[key], value), key
        elif key.endswith('num_batches_tracked'):
            assert int(state[key]) == (ITERS if route == 'hook' else 0), key
        else:
            assert torch.equal(state[key], value), key


def test_hook_registered_at_the_root_and_in_mmsync():
    assert HOOKS.get('PreciseBNHook') is PreciseBNHook
    assert HOOKS.get('mmsync.PreciseBNHook') is PreciseBNHook
    with pytest.raises(ValueError, match='num_samples > 0'):
        PreciseBNHook(num_samples=0)


@pytest.mark.parametrize('sizes', [(7, 0, 5, 1), (0, 4), (1, 1, 1)])
def test_merge_moments_is_the_moments_of_the_union(sizes):
    gen = torch.Generator().manual_seed(len(sizes))
    parts = [
        torch.randn(n, 3, generator=gen, dtype=torch.float64) * 3 + 1e4
        for n in sizes
    ]
    moments = (0, torch.zeros(3, dtype=torch.float64),
               torch.zeros(3, dtype=torch.float64))
    for part in parts:
        mean = part.mean(0) if len(part) else torch.zeros(3).double()
        moments = merge_moments(moments, (len(part), mean,
                                          (part - mean).square().sum(0)))
    union = torch.cat(parts)
    assert moments[0] == len(union)
    torch.testing.assert_close(moments[1], union.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        moments[2] / (len(union) - 1), union.var(0), rtol=1e-10, atol=0)
