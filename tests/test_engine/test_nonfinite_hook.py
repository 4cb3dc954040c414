"""NonFiniteBatchesHook: the train log says, once per interval, how many
batches MMSyncBN's running statistics skipped for non-finite statistics."""
import os.path as osp
import types

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import LoggerHook
from mmengine.logging import MessageHub

from mmsync.engine.hooks.nonfinite import NonFiniteBatchesHook
from mmsync.ops import SyncBatchNorm
from mmsync.registry import HOOKS

CONFIG = osp.join(
    osp.dirname(__file__), '..', '..', 'configs', '_base_',
    'default_runtime.py')


def _runner(model, warned):
    return types.SimpleNamespace(
        model=model,
        iter=0,
        hooks=[LoggerHook(interval=2)],
        train_dataloader=list(range(100)),
        message_hub=MessageHub.get_instance('nonfinite_hook_test'),
        logger=types.SimpleNamespace(warning=warned.append))


def test_reports_skipped_batches_once_per_interval():
    model = nn.Sequential(SyncBatchNorm(3), nn.ReLU(), SyncBatchNorm(3))
    hook = HOOKS.build(dict(type='NonFiniteBatchesHook'))
    assert isinstance(hook, NonFiniteBatchesHook)
    warned = []
    runner = _runner(model, warned)
    good = torch.randn(4, 3, 2)
    bad = good.clone()
    bad[0, 1, 0] = float('nan')
    reports = []
    for step, x in enumerate([good, bad, good, good, bad, bad]):
        model(x)
        runner.iter = step
        hook.after_train_iter(runner, step)
        if (step + 1) % 2 == 0:
            reports.append(
                runner.message_hub.get_scalar(
                    'train/nonfinite_batches').current())
    # A NaN reaches both layers: each batch counts once, not per layer.
    assert reports == [1, 1, 3]
    assert int(model[0].num_batches_tracked) == 3
    # One warning per interval that skipped any.
    assert len(warned) == 2
    assert warned[0].startswith('1 training batch(es) since the last report')
    assert warned[1].startswith('2 training batch(es)')
    assert '(3 in all)' in warned[1]


def test_the_default_runtime_config_adds_it():
    cfg = Config.fromfile(CONFIG)
    assert dict(type='NonFiniteBatchesHook') in cfg.custom_hooks
