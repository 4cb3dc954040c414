"""NORM_LAYERS, build_norm_layer, infer_abbr and is_norm (mmcv's contract)."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from cnn_test_utils import CnnTestToyNet
from mmengine.config import ConfigDict
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import DefaultScope, Registry
from mmengine.utils.dl_utils.parrots_wrapper import \
    SyncBatchNorm as MMEngineSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm

import mmsync
from mmsync.cnn import (NORM_LAYER_NAMES, NORM_LAYERS, build_norm_layer,
                        infer_abbr, is_norm, registered_norm_layers)
from mmsync.ops import SyncBatchNorm

EXPECTED = {
    'BN': (nn.BatchNorm2d, 'bn'),
    'BN1d': (nn.BatchNorm1d, 'bn'),
    'BN2d': (nn.BatchNorm2d, 'bn'),
    'BN3d': (nn.BatchNorm3d, 'bn'),
    # mmcv's 'SyncBN': mmengine's subclass of torch's SyncBatchNorm.
    'SyncBN': (MMEngineSyncBatchNorm, 'bn'),
    'MMSyncBN': (SyncBatchNorm, 'bn'),
    'GN': (nn.GroupNorm, 'gn'),
    'LN': (nn.LayerNorm, 'ln'),
    'IN': (nn.InstanceNorm2d, 'in'),
    'IN1d': (nn.InstanceNorm1d, 'in'),
    'IN2d': (nn.InstanceNorm2d, 'in'),
    'IN3d': (nn.InstanceNorm3d, 'in'),
}


def _cfg(type_name: str, **kwargs) -> dict:
    cfg = dict(type=type_name, **kwargs)
    if type_name == 'GN':
        cfg.setdefault('num_groups', 2)
    return cfg


class TestNormRegistry:

    def test_every_name_registered_to_its_class(self):
        assert set(NORM_LAYER_NAMES) == set(EXPECTED)
        for name, (cls, _) in EXPECTED.items():
            assert NORM_LAYERS.get(name) is cls, name
        assert set(EXPECTED) <= set(registered_norm_layers())

    def test_norm_layers_is_mmsync_scope_of_mmengine_models(self):
        assert isinstance(NORM_LAYERS, Registry)
        assert mmsync.NORM_LAYERS is NORM_LAYERS
        assert NORM_LAYERS.scope == 'mmsync'
        assert NORM_LAYERS.parent is MMENGINE_MODELS

    @pytest.mark.parametrize('name, kwargs', [
        ('MMSyncBN', dict(num_features=4)),
        ('BN', dict(num_features=4)),
        ('GN', dict(num_channels=4, num_groups=2)),
    ])
    def test_build_through_mmengine_models_with_scope(self, name, kwargs):
        layer = MMENGINE_MODELS.build(dict(type=f'mmsync.{name}', **kwargs))
        assert type(layer) is EXPECTED[name][0]

    def test_importing_mmsync_alone_registers_mmsyncbn(self):
        code = ('import mmsync\n'
                'from mmengine.registry import MODELS\n'
                'from mmsync.registry import NORM_LAYERS\n'
                "layer = MODELS.build(dict(type='mmsync.MMSyncBN', "
                'num_features=3))\n'
                "name, layer2 = mmsync.build_norm_layer(dict(type='MMSyncBN'),"
                ' 3)\n'
                "assert type(layer).__name__ == 'SyncBatchNorm'\n"
                'assert type(layer2) is type(layer), type(layer2)\n'
                "assert NORM_LAYERS.get('MMSyncBN') is type(layer)\n"
                "print(name)\n")
        out = subprocess.run([sys.executable, '-c', code],
                             capture_output=True,
                             text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == 'bn'


class TestBuildNormLayer:

    @pytest.mark.parametrize('type_name', sorted(EXPECTED))
    @pytest.mark.parametrize('postfix', ['', 1, '_test'])
    def test_name_and_class(self, type_name, postfix):
        cls, abbr = EXPECTED[type_name]
        name, layer = build_norm_layer(_cfg(type_name), 4, postfix=postfix)
        assert name == abbr + str(postfix)
        assert type(layer) is cls
        assert layer.eps == 1e-5
        if type_name == 'GN':
            assert (layer.num_channels, layer.num_groups) == (4, 2)
        elif type_name == 'LN':
            assert layer.normalized_shape == (4, )
        else:
            assert layer.num_features == 4

    def test_names_follow_mmcv(self):
        assert build_norm_layer(dict(type='BN'), 3)[0] == 'bn'
        assert build_norm_layer(dict(type='BN'), 3, 1)[0] == 'bn1'
        assert build_norm_layer(_cfg('GN'), 4)[0] == 'gn'
        assert build_norm_layer(dict(type='LN'), 3, '_test')[0] == 'ln_test'
        assert build_norm_layer(dict(type='IN'), 3, 1)[0] == 'in1'

    @pytest.mark.parametrize('type_name', sorted(EXPECTED))
    def test_requires_grad_applied_to_every_parameter(self, type_name):
        # InstanceNorm has no parameters unless affine.
        extra = dict(affine=True) if type_name.startswith('IN') else {}
        _, frozen = build_norm_layer(
            _cfg(type_name, requires_grad=False, **extra), 4)
        _, trained = build_norm_layer(_cfg(type_name, **extra), 4)
        assert len(list(frozen.parameters())) == 2
        assert not any(p.requires_grad for p in frozen.parameters())
        assert all(p.requires_grad for p in trained.parameters())

    def test_cfg_arguments_reach_the_layer_and_cfg_is_untouched(self):
        cfg = dict(
            type='MMSyncBN',
            eps=1e-3,
            momentum=0.2,
            stats_mode='N',
            requires_grad=False)
        snapshot = dict(cfg)
        name, layer = build_norm_layer(cfg, 6, 2)
        assert cfg == snapshot
        assert name == 'bn2'
        assert (layer.eps, layer.momentum) == (1e-3, 0.2)
        assert layer.stats_mode == 'N'
        assert layer.group is None and layer.group_size == 1

    def test_config_dict_and_scoped_type(self):
        name, layer = build_norm_layer(
            ConfigDict(type='mmsync.MMSyncBN', act='relu'), 3, 1)
        assert name == 'bn1'
        assert isinstance(layer, SyncBatchNorm) and layer.act == 'relu'

    def test_type_may_be_a_class(self):
        name, layer = build_norm_layer(dict(type=SyncBatchNorm), 5)
        assert name == 'bn' and isinstance(layer, SyncBatchNorm)
        name, layer = build_norm_layer(
            dict(type=nn.GroupNorm, num_groups=1), 5, 3)
        assert name == 'gn3'
        assert (layer.num_channels, layer.num_groups) == (5, 1)

        class Custom(nn.Module):
            _abbr_ = 'custom'

            def __init__(self, num_features, eps):
                super().__init__()
                self.scale = nn.Parameter(torch.ones(num_features))
                self.eps = eps

        name, layer = build_norm_layer(
            dict(type=Custom, requires_grad=False), 2, 'x')
        assert name == 'customx'
        assert layer.eps == 1e-5 and not layer.scale.requires_grad

    def test_built_mmsyncbn_runs_like_batchnorm(self):
        _, layer = build_norm_layer(dict(type='MMSyncBN'), 3)
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        layer.double()
        expected = torch.nn.functional.batch_norm(
            x, None, None, training=True, eps=1e-5)
        torch.testing.assert_close(layer(x), expected)

    def test_finds_layers_of_the_default_scope_by_bare_name(self):
        registry = Registry(
            'model', parent=MMENGINE_MODELS, scope='cnn_test_scope')

        class FancyNorm(nn.BatchNorm2d):
            pass

        registry.register_module(module=FancyNorm)
        with pytest.raises(KeyError, match='FancyNorm'):
            build_norm_layer(dict(type='FancyNorm'), 3)
        with DefaultScope.overwrite_default_scope('cnn_test_scope'):
            name, layer = build_norm_layer(dict(type='FancyNorm'), 3, 1)
        assert name == 'bn1' and type(layer) is FancyNorm
        # mmsync's own names win over the default scope's registry.
        with DefaultScope.overwrite_default_scope('cnn_test_scope'):
            assert type(build_norm_layer(dict(type='MMSyncBN'),
                                         3)[1]) is SyncBatchNorm


class TestBuildNormLayerErrors:

    @pytest.mark.parametrize('cfg', ['BN', None, [('type', 'BN')]])
    def test_cfg_not_a_dict(self, cfg):
        with pytest.raises(TypeError, match='cfg must be a dict'):
            build_norm_layer(cfg, 3)

    def test_missing_type(self):
        with pytest.raises(KeyError, match='"type"'):
            build_norm_layer(dict(eps=1e-3), 3)

    def test_unknown_type_names_it_and_lists_norm_layers(self):
        with pytest.raises(KeyError) as info:
            build_norm_layer(dict(type='FancyNorm'), 3)
        message = str(info.value)
        assert "'FancyNorm'" in message
        for name in NORM_LAYER_NAMES:
            assert name in message
        # Norm layers only, not every model in the registry.
        assert NORM_LAYERS.get('CnnTestToyNet') is CnnTestToyNet
        assert 'CnnTestToyNet' not in message

    def test_type_neither_str_nor_class(self):
        with pytest.raises(TypeError, match='"type"'):
            build_norm_layer(dict(type=3), 3)

    @pytest.mark.parametrize('postfix', [[1, 2], None, 1.5, True])
    def test_postfix_not_int_or_str(self, postfix):
        # TypeError, and the AssertionError mmcv's own tests expect.
        for error in (TypeError, AssertionError):
            with pytest.raises(error, match='postfix'):
                build_norm_layer(dict(type='BN'), 3, postfix=postfix)

    def test_gn_needs_num_groups(self):
        for error in (KeyError, AssertionError):
            with pytest.raises(error, match='num_groups'):
                build_norm_layer(dict(type='GN'), 4)

    def test_bad_layer_argument_names_it(self):
        with pytest.raises(ValueError, match='stats_mode'):
            build_norm_layer(dict(type='MMSyncBN', stats_mode='sum'), 3)
        with pytest.raises(TypeError, match='bogus'):
            build_norm_layer(dict(type='BN', bogus=1), 3)


class TestInferAbbr:

    def test_not_a_class(self):
        with pytest.raises(TypeError, match='class_type'):
            infer_abbr(nn.BatchNorm2d(3))

    def test_rules_in_order(self):

        class WithAbbr(nn.BatchNorm2d):
            _abbr_ = 'mine'

        class FancyBatchNorm:
            pass

        class FancyGroupNorm:
            pass

        class FancyLayerNorm:
            pass

        class FancyInstanceNorm:
            pass

        class FancyNorm:
            pass

        assert infer_abbr(WithAbbr) == 'mine'
        assert infer_abbr(SyncBatchNorm) == 'bn'
        assert infer_abbr(nn.SyncBatchNorm) == 'bn'
        assert infer_abbr(nn.InstanceNorm3d) == 'in'
        assert infer_abbr(nn.GroupNorm) == 'gn'
        assert infer_abbr(nn.LayerNorm) == 'ln'
        assert infer_abbr(FancyBatchNorm) == 'bn'
        assert infer_abbr(FancyGroupNorm) == 'gn'
        assert infer_abbr(FancyLayerNorm) == 'ln'
        assert infer_abbr(FancyInstanceNorm) == 'in'
        assert infer_abbr(FancyNorm) == 'norm_layer'


class TestIsNorm:

    @pytest.mark.parametrize('type_name', sorted(EXPECTED))
    def test_every_registered_norm_is_a_norm(self, type_name):
        _, layer = build_norm_layer(_cfg(type_name), 4)
        assert is_norm(layer)
        assert not is_norm(layer, exclude=type(layer))
        assert not is_norm(layer, exclude=(nn.Conv2d, type(layer)))

    def test_mmsyncbn_is_a_norm_and_a_batchnorm(self):
        layer = SyncBatchNorm(3)
        assert is_norm(layer)
        assert not is_norm(layer, exclude=_BatchNorm)
        assert is_norm(layer, exclude=nn.GroupNorm)

    def test_not_norms(self):
        assert not is_norm(nn.Conv2d(3, 3, 1))
        assert not is_norm(nn.Sequential(nn.BatchNorm2d(3)))

    @pytest.mark.parametrize('exclude', ['BN', ('BN', ), (nn.Conv2d, 'BN')])
    def test_exclude_must_be_types(self, exclude):
        with pytest.raises(TypeError, match='exclude'):
            is_norm(nn.BatchNorm1d(3), exclude=exclude)
