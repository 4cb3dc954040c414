"""The run's start and summary lines (RunSummaryHook) name the schedule's
unit: epochs for an epoch-based loop, iterations for an iteration-based one
(whose mmengine loop also has a ``max_epochs``, of 1)."""
import glob
import os.path as osp
import re

import pytest
import torch
from engine_test_utils import Samples, ToyNet, toy_batch
from mmengine.evaluator import BaseMetric

from mmsync.engine import MMSyncRunner


class MeanLogit(BaseMetric):
    """A metric that changes as the model learns: the mean top logit."""

    def process(self, data_batch, data_samples) -> None:
        self.results.append(float(torch.stack(data_samples).max(1)[0].mean()))

    def compute_metrics(self, results) -> dict:
        return dict(score=sum(results) / len(results))


def run(tmp_path, train_cfg):
    batch = toy_batch(8, dtype=torch.float32)
    loader = dict(
        dataset=Samples(batch, range(8)),
        sampler=dict(type='DefaultSampler', shuffle=False),
        batch_size=4,
        collate_fn=dict(type='default_collate'))
    runner = MMSyncRunner(
        model=ToyNet(),
        work_dir=str(tmp_path),
        train_dataloader=loader,
        val_dataloader=loader,
        val_evaluator=[MeanLogit()],
        val_cfg=dict(),
        train_cfg=train_cfg,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook')),
        # Unique: mmengine keys its logger and message hub by this name
        # (and a second), which two quick runs would otherwise share.
        experiment_name=f'summary_{tmp_path.name}')
    runner.train()
    (log, ) = glob.glob(osp.join(str(tmp_path), '*', '*.log'))
    lines = open(log).read().splitlines()
    start = [line for line in lines if ' - start: ' in line]
    summary = [line for line in lines if ' - summary: ' in line]
    assert len(start) == 1 and len(summary) == 1, lines[-5:]
    return start[0], summary[0]


@pytest.mark.parametrize('by_epoch', [True, False])
def test_start_and_summary_name_the_unit(tmp_path, by_epoch):
    if by_epoch:
        cfg = dict(by_epoch=True, max_epochs=3, val_interval=1)
    else:
        cfg = dict(by_epoch=False, max_iters=6, val_interval=3)
    start, summary = run(tmp_path, cfg)
    best_last = re.search(
        r'best score \S+ \((\w+) (\d+)\), last \S+ '
        r'\((\w+) (\d+)\)', summary)
    assert best_last, summary
    if by_epoch:
        assert '3 epochs of 2 iterations;' in start, start
        assert best_last.group(3, 4) == ('epoch', '3'), summary
    else:
        assert '6 iterations;' in start and 'epoch' not in start, start
        assert best_last.group(3, 4) == ('iter', '6'), summary
        assert best_last.group(1) == 'iter', summary
