"""MMSyncBN with real mmengine objects in one process: configs, optimizer
constructors, norm_eval, and MMSyncRunner."""
import pytest
import torch
from cnn_test_utils import CnnTestToyNet, toy_batch
from mmengine.config import Config
from mmengine.optim import DefaultOptimWrapperConstructor, build_optim_wrapper
from mmengine.registry import MODELS, RUNNERS
from mmengine.runner import Runner

from mmsync.cnn import is_norm
from mmsync.engine import MMSyncRunner, sync_bn_options
from mmsync.ops import SyncBatchNorm

MODEL_CONFIG = """
model = dict(
    type='mmsync.CnnTestToyNet',
    norm_cfg=dict(type='{norm}', requires_grad=True),
    channels=4)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.5))
"""


def build_from_config_file(tmp_path, norm: str):
    path = tmp_path / f'toy_{norm}.py'
    path.write_text(MODEL_CONFIG.format(norm=norm))
    cfg = Config.fromfile(str(path))
    torch.manual_seed(0)
    return cfg, MODELS.build(cfg.model).double()


class TestConfigFile:

    def test_norm_cfg_mmsyncbn_from_file_builds_and_trains(self, tmp_path):
        cfg, model = build_from_config_file(tmp_path, 'MMSyncBN')
        _, reference = build_from_config_file(tmp_path, 'BN')
        assert [type(m) for m in model.norms] == [SyncBatchNorm] * 2
        assert (model.norm1_name, model.norm2_name) == ('bn1', 'bn2')
        # A world of one: MMSyncBN trains like BN through mmengine's step.
        data = toy_batch(6)
        losses = [
            m.train_step(data, build_optim_wrapper(m,
                                                   cfg.optim_wrapper))['loss']
            for m in (model, reference)
        ]
        torch.testing.assert_close(losses[0], losses[1])
        reference_state = reference.state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, reference_state[key], msg=key)
        assert int(model.bn1.num_batches_tracked) == 1


class TestOptimizerConstructor:

    @pytest.mark.parametrize('norm', ['MMSyncBN', 'BN'])
    def test_norm_decay_mult_applies_to_norm_params(self, norm):
        model = CnnTestToyNet(norm_cfg=dict(type=norm))
        constructor = DefaultOptimWrapperConstructor(
            dict(
                type='OptimWrapper',
                optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-2)),
            paramwise_cfg=dict(norm_decay_mult=0.))
        optim_wrapper = constructor(model)
        decay = {}
        for group in optim_wrapper.optimizer.param_groups:
            for param in group['params']:
                decay[id(param)] = group['weight_decay']
        for name, param in model.named_parameters():
            expected = 0. if name.startswith(('bn1.', 'bn2.')) else 1e-2
            assert decay[id(param)] == expected, name
        assert len(decay) == len(list(model.parameters()))


class TestNormEval:

    def test_norm_eval_freezes_mmsyncbn(self):
        model = CnnTestToyNet(norm_cfg=dict(type='MMSyncBN'), norm_eval=True)
        model.double().train()
        assert model.training
        assert all(is_norm(m) and not m.training for m in model.norms)
        stats = [(m.running_mean.clone(), m.running_var.clone())
                 for m in model.norms]
        model(toy_batch(4)['inputs']).sum().backward()
        for m, (mean, var) in zip(model.norms, stats):
            assert torch.equal(m.running_mean, mean)
            assert torch.equal(m.running_var, var)
            assert int(m.num_batches_tracked) == 0
            assert m.weight.grad is not None  # frozen stats, trained affine

    def test_without_norm_eval_stats_move(self):
        model = CnnTestToyNet(norm_cfg=dict(type='MMSyncBN')).double()
        model.train()
        assert all(m.training for m in model.norms)
        model(toy_batch(4)['inputs'])
        assert all(int(m.num_batches_tracked) == 1 for m in model.norms)


def runner_cfg(tmp_path, norm: str, sync_bn) -> dict:
    return dict(
        runner_type='MMSyncRunner',
        model=dict(type='mmsync.CnnTestToyNet', norm_cfg=dict(type=norm)),
        work_dir=str(tmp_path),
        train_dataloader=dict(
            dataset=dict(type='mmsync.CnnTestToyDataset', num=4),
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate'),
            batch_size=4,
            num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=1),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        sync_bn=sync_bn,
        launcher='none',
        log_level='WARNING',
        # Runners built in the same second would share the timestamp name.
        experiment_name=f'cnn_test_{tmp_path.name}',
        default_hooks=dict(checkpoint=None, logger=None),
    )


class TestMMSyncRunner:

    def test_sync_bn_options(self):
        assert sync_bn_options(None) is None
        assert sync_bn_options('torch') is None
        assert sync_bn_options('mmcv') is None
        assert sync_bn_options('mmsync') == {}
        assert sync_bn_options(dict(type='mmsync', stats_mode='N')) == {
            'stats_mode': 'N'
        }
        assert sync_bn_options(dict(type='mmsync', group_size=2)) == {
            'group_size': 2
        }

    @pytest.mark.parametrize('value, error, match', [
        (1, TypeError, 'cfg.sync_bn'),
        (dict(type='torch'), ValueError, "type='mmsync'"),
        (dict(stats_mode='N'), ValueError, "type='mmsync'"),
        (dict(type='mmsync', group=None), ValueError, "'group'"),
    ])
    def test_sync_bn_option_errors(self, value, error, match):
        with pytest.raises(error, match=match):
            sync_bn_options(value)

    def test_built_from_config_trains_mmsyncbn_without_distribution(
            self, tmp_path):
        runner = RUNNERS.build(runner_cfg(tmp_path, 'MMSyncBN', 'mmsync'))
        assert type(runner) is MMSyncRunner
        assert not runner.distributed
        # Not wrapped, not reverted: MMSyncBN runs in a world of one.
        assert [type(m) for m in runner.model.norms] == [SyncBatchNorm] * 2
        runner.train()
        assert [int(m.num_batches_tracked)
                for m in runner.model.norms] == [1, 1]
        assert runner.cfg.sync_bn == 'mmsync'

    def test_bn_model_left_as_is_without_distribution(self, tmp_path):
        # As mmengine's sync_bn='torch': conversion only when distributed.
        runner = RUNNERS.build(runner_cfg(tmp_path, 'BN', 'mmsync'))
        assert [type(m)
                for m in runner.model.norms] == [torch.nn.BatchNorm2d] * 2

    def test_invalid_sync_bn_fails_at_construction(self, tmp_path):
        cfg = runner_cfg(tmp_path, 'BN', dict(type='mmsync', bogus=1))
        with pytest.raises(ValueError, match='bogus'):
            RUNNERS.build(cfg)

    def test_is_a_runner_and_leaves_other_values_to_it(self, tmp_path):
        assert issubclass(MMSyncRunner, Runner)
        runner = MMSyncRunner.from_cfg(
            Config(runner_cfg(tmp_path, 'BN', 'torch')))
        assert runner.cfg.sync_bn == 'torch'
        assert type(runner.model.bn1) is torch.nn.BatchNorm2d
