"""'MMSyncBN' by its bare name where OpenMMLab codebases look it up.

mmcv's builders and the registries of mmpretrain, mmdet and mmseg (children
of mmengine's root ``MODELS``) resolve a bare ``type`` through the root, so
``import mmsync`` (or ``custom_imports``) must put the layer there. Uses the
real mmcv (mmcv's full build in the main environment, mmcv-lite in the
second); mmpretrain where it is installed (the CUDA-torch CI environment);
mmdet's and mmseg's own registries where they import (beside mmcv's full
build). mmdet 3.3 and mmseg 1.2 pin mmcv < 2.2 and do not import beside
mmcv-lite 2.2: there their scopes are made here with the line their
``registry.py`` has (a child of the root ``MODELS`` named by the scope).
tests/test_ecosystem/test_mmcv_full.py checks the import orders with mmcv's
own 'MMSyncBN'.
"""
import importlib.util
import os.path as osp
import subprocess
import sys
from unittest import mock

import pytest
import torch.nn as nn
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope, Registry

from mmsync.cnn import build_norm_layer, infer_abbr, is_norm
from mmsync.cnn.bricks import norm as norm_module
from mmsync.ops import SyncBatchNorm

mmcv_cnn = pytest.importorskip('mmcv.cnn', reason='needs mmcv')

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
for _scope in ('mmdet', 'mmseg'):
    try:
        importlib.import_module(f'{_scope}.registry')
    except Exception:  # not installed, or refuses mmcv-lite
        if _scope not in ROOT_MODELS.children:
            Registry('model', parent=ROOT_MODELS, scope=_scope)
HAS_MMPRETRAIN = importlib.util.find_spec('mmpretrain') is not None
SCOPES = (None, 'mmengine', 'mmsync', 'mmdet', 'mmseg',
          pytest.param(
              'mmpretrain',
              marks=pytest.mark.skipif(
                  not HAS_MMPRETRAIN, reason='mmpretrain is not installed')))


@pytest.mark.parametrize('scope', SCOPES)
class TestBareNameUnderEveryScope:

    def test_mmcv_build_norm_layer(self, scope):
        with DefaultScope.overwrite_default_scope(scope):
            name, layer = mmcv_cnn.build_norm_layer(dict(type='MMSyncBN'), 8)
            _, scoped = mmcv_cnn.build_norm_layer(
                dict(type='mmsync.MMSyncBN', stats_mode='N'), 8, 2)
        assert name == 'bn' and type(layer) is SyncBatchNorm
        assert type(scoped) is SyncBatchNorm and scoped.stats_mode == 'N'

    def test_mmcv_conv_module(self, scope):
        with DefaultScope.overwrite_default_scope(scope):
            conv = mmcv_cnn.ConvModule(
                3, 8, 3, norm_cfg=dict(type='MMSyncBN', act='relu'))
        assert type(conv.norm) is SyncBatchNorm and conv.norm.act == 'relu'

    def test_mmsync_build_norm_layer(self, scope):
        with DefaultScope.overwrite_default_scope(scope):
            _, layer = build_norm_layer(dict(type='MMSyncBN'), 8)
        assert type(layer) is SyncBatchNorm


def test_mmpretrain_resnet_with_bare_name():
    pytest.importorskip('mmpretrain.models', reason='needs mmpretrain')
    from mmpretrain.models import ResNet
    from mmpretrain.registry import MODELS
    direct = ResNet(depth=18, norm_cfg=dict(type='MMSyncBN'))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        built = MODELS.build(
            dict(type='ResNet', depth=18, norm_cfg=dict(type='MMSyncBN')))
    for model in (direct, built):
        norms = [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        assert len(norms) == 20
        assert all(type(m) is SyncBatchNorm for m in norms)


def test_custom_imports_in_a_config_registers_it(tmp_path):
    # A fresh interpreter: nothing of mmsync is imported before the config.
    config = tmp_path / 'cfg.py'
    config.write_text("custom_imports = dict(imports=['mmsync'], "
                      'allow_failed_imports=False)\n'
                      "norm_cfg = dict(type='MMSyncBN', stats_mode='N')\n")
    code = ('import sys; from mmengine.config import Config; '
            "assert 'mmsync' not in sys.modules; "
            f'cfg = Config.fromfile({str(config)!r}); '
            'from mmcv.cnn import build_norm_layer; '
            'layer = build_norm_layer(cfg.norm_cfg, 4)[1]; '
            'print(type(layer).__module__, layer.stats_mode)')
    out = subprocess.run([sys.executable, '-c', code],
                         capture_output=True,
                         text=True,
                         timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ['mmsync.ops.sync_bn', 'N']


class TestTakeOver:
    """Another class under the name at the root (mmcv's full build
    registers its own 'MMSyncBN') is replaced, and said so once."""

    def test_takes_the_name_over_and_says_so_once(self):

        class OtherMMSyncBN(nn.BatchNorm2d):
            """A class registered under the name before mmsync."""

        try:
            ROOT_MODELS.register_module(
                name='MMSyncBN', module=OtherMMSyncBN, force=True)
            with mock.patch.object(norm_module, '_say') as log:
                norm_module.register_root_name()
                norm_module.register_root_name()
            assert ROOT_MODELS.get('MMSyncBN') is SyncBatchNorm
            assert log.call_count == 1
            message = log.call_args[0][0]
            assert 'OtherMMSyncBN' in message and 'SyncBatchNorm' in message
        finally:
            norm_module.register_root_name()
        assert type(mmcv_cnn.build_norm_layer(dict(type='MMSyncBN'),
                                              3)[1]) is SyncBatchNorm


class TestMMCVContract:
    """The checks of mmcv's own tests of build_norm_layer, infer_abbr and
    is_norm (tests/test_cnn/test_build_layers.py), on mmsync's functions."""

    ABBR = {
        'BN': 'bn',
        'BN1d': 'bn',
        'BN2d': 'bn',
        'BN3d': 'bn',
        'SyncBN': 'bn',
        'GN': 'gn',
        'LN': 'ln',
        'IN': 'in',
        'IN1d': 'in',
        'IN2d': 'in',
        'IN3d': 'in'
    }

    def test_build_norm_layer_errors(self):
        with pytest.raises(TypeError):
            build_norm_layer('BN', 3)
        with pytest.raises(KeyError):
            build_norm_layer(dict(), 3)
        with pytest.raises(KeyError):
            build_norm_layer(dict(type='FancyNorm'), 3)
        with pytest.raises(AssertionError):
            build_norm_layer(dict(type='BN'), 3, postfix=[1, 2])
        with pytest.raises(AssertionError):
            build_norm_layer(dict(type='GN'), 3)

    def test_every_root_name_builds_like_mmcv(self):
        names = [name for name in ROOT_MODELS.module_dict if name in self.ABBR]
        assert sorted(names) == sorted(self.ABBR)  # registered by mmcv.cnn
        for type_name in names:
            module = ROOT_MODELS.module_dict[type_name]
            for postfix in ('_test', 1):
                cfg = dict(type=type_name)
                if type_name == 'GN':
                    cfg['num_groups'] = 3
                name, layer = build_norm_layer(cfg, 3, postfix=postfix)
                assert name == self.ABBR[type_name] + str(postfix)
                assert isinstance(layer, module)
                if type_name == 'GN':
                    assert (layer.num_channels, layer.num_groups) == (3, 3)
                elif type_name != 'LN':
                    assert layer.num_features == 3

    def test_infer_abbr(self):
        with pytest.raises(TypeError):
            infer_abbr(0)
        for class_name, abbr in (('FancyBatchNorm',
                                  'bn'), ('FancyInstanceNorm',
                                          'in'), ('FancyLayerNorm', 'ln'),
                                 ('FancyGroupNorm', 'gn'), ('FancyNorm',
                                                            'norm_layer')):
            assert infer_abbr(type(class_name, (), {})) == abbr
        assert infer_abbr(type('MyNorm', (), {'_abbr_': 'mn'})) == 'mn'

    def test_is_norm(self):
        for norm_type in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                          nn.InstanceNorm1d, nn.InstanceNorm2d,
                          nn.InstanceNorm3d, nn.LayerNorm):
            layer = norm_type(3)
            assert is_norm(layer)
            assert not is_norm(layer, exclude=(norm_type, ))
        layer = nn.GroupNorm(3, 6)
        assert is_norm(layer) and not is_norm(layer, exclude=(nn.GroupNorm, ))
        subclass = type('MyNorm', (nn.BatchNorm2d, ), {})(3)
        batchnorm = nn.modules.batchnorm._BatchNorm
        assert is_norm(subclass)
        assert not is_norm(subclass, exclude=batchnorm)
        assert not is_norm(subclass, exclude=(batchnorm, ))
        assert not is_norm(nn.Conv2d(3, 8, 1))
        with pytest.raises(TypeError):
            is_norm(nn.BatchNorm1d(3), exclude='BN')
        with pytest.raises(TypeError):
            is_norm(nn.BatchNorm1d(3), exclude=('BN', ))
