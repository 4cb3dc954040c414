"""Faults injected into real training runs by tests/test_tools/test_faults.py.

Imported by a config's ``custom_imports``; nothing else uses it.
"""
import errno
import time

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class FullDiskOnRankHook(Hook):
    """Raises ENOSPC on one rank before one training step, as a rank whose
    disk filled up would.

    Args:
        rank (int): The rank that fails.
        step (int): The training step (0-based ``runner.iter``) it fails at.
    """

    def __init__(self, rank: int, step: int):
        self.rank = rank
        self.step = step

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.rank == self.rank and runner.iter == self.step:
            raise OSError(errno.ENOSPC, 'No space left on device')


@HOOKS.register_module()
class SlowEvaluationHook(Hook):
    """Keeps rank 0 busy in Python after each validation for ``seconds``
    while the other ranks wait in the next collective, as a long rank-0
    evaluation (mmdet's, mmseg's) does.

    Args:
        seconds (float): How long rank 0 computes.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_val_epoch(self, runner, metrics=None):
        if runner.rank == 0:
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                sum(i * i for i in range(10000))
