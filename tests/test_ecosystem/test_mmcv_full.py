"""mmsync beside mmcv's full build, which registers its own 'MMSyncBN'.

With the real mmcv 2.1.0 full build (``mmcv.ops``, ``mmcv._ext``; see
tools/setup/setup_downstream.sh), mmseg 1.2.2 and mmdet 3.3.0: in every order a
user's program or launcher can import them (mmsync first, ``mmcv.ops``
first, a config's ``custom_imports`` before or after ``register_all_modules``
of mmseg and mmdet), a bare ``'MMSyncBN'`` ends as mmsync's layer, mmcv's
replaced class is named in one warning, ``'mmsync.MMSyncBN'`` stays explicit,
and mmcv's class itself stays importable. A checkpoint of a model built with
mmcv's layer loads into the same model built with mmsync's. Each order runs
in a fresh interpreter.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip(
    'mmcv.ops',
    reason="needs mmcv's full build (tools/setup/setup_downstream.sh)")

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
WARNING = ("'MMSyncBN' in mmengine's root MODELS registry was "
           'mmcv.ops.sync_bn.SyncBatchNorm')
CUSTOM_IMPORTS = ('from mmengine.config import Config\n'
                  "Config.fromfile({config!r})\n")
ORDERS = {
    'mmsync, then mmcv.ops':
    'import mmsync\nimport mmcv.ops\n',
    'mmcv.ops, then mmsync':
    'import mmcv.ops\nimport mmsync\n',
    'custom_imports, then mmseg register_all_modules':
    CUSTOM_IMPORTS + 'from mmseg.utils import register_all_modules\n'
    'register_all_modules()\n',
    'mmseg register_all_modules, then custom_imports':
    'from mmseg.utils import register_all_modules\n'
    'register_all_modules()\n' + CUSTOM_IMPORTS,
    'custom_imports, then mmdet register_all_modules':
    CUSTOM_IMPORTS + 'from mmdet.utils import register_all_modules\n'
    'register_all_modules()\n',
    'mmdet register_all_modules, then custom_imports':
    'from mmdet.utils import register_all_modules\n'
    'register_all_modules()\n' + CUSTOM_IMPORTS,
}
# What each order reports: the classes every lookup gives, by their module.
REPORT = r'''
import json
import mmcv.ops
import mmsync
from mmcv.cnn import build_norm_layer
from mmengine.registry import MODELS, DefaultScope
from mmseg.models.backbones import ResNetV1c
from mmseg.registry import MODELS as MMSEG_MODELS
from mmdet.registry import MODELS as MMDET_MODELS
def name(obj):
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__module__ + '.' + cls.__qualname__
out = dict(root=name(MODELS.get('MMSyncBN')),
           mmcv_ops=name(mmcv.ops.SyncBatchNorm),
           scope=DefaultScope.get_current_instance().scope_name
           if DefaultScope.get_current_instance() else None)
for scope, registry in (('mmseg', MMSEG_MODELS), ('mmdet', MMDET_MODELS)):
    with DefaultScope.overwrite_default_scope(scope):
        out[scope] = name(registry.build(dict(type='MMSyncBN',
                                              num_features=4)))
        out[scope + '_explicit'] = name(registry.build(
            dict(type='mmsync.MMSyncBN', num_features=4, stats_mode='N')))
        out[scope + '_mmcv_builder'] = name(
            build_norm_layer(dict(type='MMSyncBN'), 4)[1])
backbone = ResNetV1c(depth=18, norm_cfg=dict(type='MMSyncBN'))
out['resnet_norms'] = sorted({name(m) for m in backbone.modules()
                              if 'Norm' in type(m).__name__})
print('REPORT ' + json.dumps(out))
'''
MMSYNC = 'mmsync.ops.sync_bn.SyncBatchNorm'


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, '-c', code],
                          capture_output=True,
                          text=True,
                          timeout=300,
                          cwd=str(tmp_path),
                          env=env)


@pytest.mark.parametrize('order', list(ORDERS))
def test_every_import_order_ends_with_mmsyncs_layer(order, tmp_path):
    config = tmp_path / 'cfg.py'
    config.write_text("custom_imports = dict(imports=['mmsync'], "
                      'allow_failed_imports=False)\n')
    code = ('import sys\n'
            "assert 'mmsync' not in sys.modules\n" +
            ORDERS[order].format(config=str(config)) + REPORT)
    run = run_python(code, tmp_path)
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-4000:]
    (line, ) = [x for x in run.stdout.splitlines() if x.startswith('REPORT ')]
    report = json.loads(line[len('REPORT '):])
    for key in ('root', 'mmseg', 'mmdet', 'mmseg_explicit', 'mmdet_explicit',
                'mmseg_mmcv_builder', 'mmdet_mmcv_builder'):
        assert report[key] == MMSYNC, (key, report)
    assert report['resnet_norms'] == [MMSYNC]
    # mmcv's class is still there for who imports it by class.
    assert report['mmcv_ops'] == 'mmcv.ops.sync_bn.SyncBatchNorm'
    assert said.count(WARNING) == 1, said[-4000:]
    if 'register_all_modules' in order:  # it sets the default scope
        assert report['scope'] == ('mmseg' if 'mmseg' in order else 'mmdet')


# Builds mmseg's ResNetV1c-18 with mmcv's own MMSyncBN (mmsync not imported;
# mmcv's layer asks for a process group when built: a gloo group of one),
# gives its norm layers the state of a trained model, saves the checkpoint
# as mmengine does and the eval-mode output on a fixed input.
MMCV_CHECKPOINT = r'''
import sys
import torch
import torch.distributed as dist
from mmengine.runner import save_checkpoint
from mmseg.models.backbones import ResNetV1c
assert 'mmsync' not in sys.modules
dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}',
                        rank=0, world_size=1)
torch.manual_seed(0)
model = ResNetV1c(depth=18, norm_cfg=dict(type='MMSyncBN'))
norms = [m for m in model.modules() if type(m).__name__ == 'SyncBatchNorm']
assert norms and all(type(m).__module__ == 'mmcv.ops.sync_bn' for m in norms)
with torch.no_grad():
    for m in norms:
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(7)
model.eval()
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    outs = model(x)
save_checkpoint(dict(state_dict=model.state_dict()), {ckpt!r})
torch.save(dict(x=x, outs=list(outs)), {expected!r})
dist.destroy_process_group()
'''


def test_mmcv_checkpoint_loads_into_mmsyncs_layer(tmp_path):
    from dist_utils import free_port
    from mmengine.runner import load_checkpoint
    from mmseg.models.backbones import ResNetV1c

    from mmsync.engine import load_checkpoint_file
    from mmsync.ops import SyncBatchNorm
    ckpt = str(tmp_path / 'mmcv_syncbn.pth')
    expected = str(tmp_path / 'expected.pth')
    run = run_python(
        MMCV_CHECKPOINT.format(port=free_port(), ckpt=ckpt, expected=expected),
        tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    model = ResNetV1c(depth=18, norm_cfg=dict(type='MMSyncBN'))
    norms = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    # The deep stem's 3, 2 in each of the 8 blocks, 3 downsample shortcuts.
    assert len(norms) == 22
    saved = load_checkpoint_file(ckpt)['state_dict']
    assert sorted(saved) == sorted(model.state_dict())
    load_checkpoint(model, ckpt, strict=True)
    assert all(int(m.num_batches_tracked) == 7 for m in norms)
    model.eval()
    data = torch.load(expected)
    with torch.no_grad():
        outs = model(data['x'])
    for out, ref in zip(outs, data['outs']):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
