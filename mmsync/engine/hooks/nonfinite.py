"""Logs the training batches that MMSyncBN's running statistics skipped.

A batch whose global statistics are not finite (an fp16 overflow, a bad
sample) leaves the running statistics of every MMSyncBN layer as they were
and counts in the layer's ``nonfinite_batches`` buffer instead of
``num_batches_tracked`` (see ``mmsync.ops.sync_bn``). This hook reads the
counters once per logging interval: the total goes into the train log line
as ``nonfinite_batches``, and an interval that skipped any adds a warning.
"""
from typing import Optional

import torch
import torch.nn as nn
from mmengine.hooks import Hook, LoggerHook
from mmengine.registry import HOOKS as ROOT_HOOKS

from ...ops.sync_bn import NONFINITE
from ...registry import HOOKS


def skipped_batches(model: nn.Module) -> int:
    """The batches skipped so far: the most any one MMSyncBN layer skipped
    (a NaN in the input reaches every later layer, each counts it once).
    Reads the device once."""
    counts = [
        m._buffers[NONFINITE] for m in model.modules()
        if m._buffers.get(NONFINITE) is not None
    ]
    if not counts:
        return 0
    device = counts[0].device
    return int(torch.stack([c.to(device) for c in counts]).max())


class NonFiniteBatchesHook(Hook):
    """Logs how many training batches had non-finite statistics.

    Args:
        interval (int, optional): Iterations between two reports; None
            follows the LoggerHook's interval (10 without one).
            Default: None.
    """

    # Before the LoggerHook (BELOW_NORMAL) prints the iteration's line.
    priority = 'NORMAL'

    def __init__(self, interval: Optional[int] = None):
        self.interval = interval
        self.reported = 0

    def _interval(self, runner) -> int:
        if self.interval is not None:
            return self.interval
        loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
        return loggers[0].interval if loggers else 10

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs=None) -> None:
        interval = self._interval(runner)
        if not (self.every_n_train_iters(runner, interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)):
            return
        total = skipped_batches(runner.model)
        runner.message_hub.update_scalar('train/nonfinite_batches', total)
        if total > self.reported:
            runner.logger.warning(
                f'{total - self.reported} training batch(es) since the last '
                f'report had non-finite batch statistics ({total} in all): '
                "MMSyncBN's running statistics skipped them and kept their "
                'last finite values; the outputs of those steps are NaN or '
                'Inf where the inputs were (an fp16 overflow, a bad sample)')
        self.reported = total


HOOKS.register_module(module=NonFiniteBatchesHook)
# Downstream configs (default scope mmdet, mmseg, ...) name it bare.
ROOT_HOOKS.register_module(module=NonFiniteBatchesHook, force=True)
