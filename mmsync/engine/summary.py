"""What a person watching a run sees: a start line, progress, a summary.

mmengine prints the whole environment, the config and the hook table (some
225 lines for the main job) before the first loss line. ``MMSyncRunner``
keeps them in the log file and off the console (:class:`FileOnly`), and
:class:`RunSummaryHook` says at the start what runs where, and at the end
the best and last value of the validation metric, the checkpoint to use,
and where the log and the curves are; a resume with nothing left to train
says so instead of ending in silence.
"""
import logging
import os.path as osp
from typing import Dict, List, Optional

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner import IterBasedTrainLoop

from ..registry import HOOKS
from ..utils.curves import plot_curves

# Messages that mmengine's Runner logs for the record, not for the person at
# the console: the environment, the config, the hook table, and the
# deprecation notices of mmengine's own CheckpointHook (nothing a user can
# act on).
FILE_ONLY_PREFIXES = ('\n----', 'Config:\n',
                      'Hooks will be executed in the following order',
                      '"FileClient" will be deprecated',
                      '"HardDiskBackend" is the alias of')
# Where the validation history lives in the message hub (and so in every
# checkpoint, and back after a resume).
HISTORY_KEY = 'mmsync_val_history'


class FileOnly(logging.Filter):
    """Keeps the environment, config and hook dumps off a console handler
    (they still reach the log file, which has no such filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(FILE_ONLY_PREFIXES)


def log_file_of(runner) -> str:
    """The run's log file."""
    return osp.join(runner.log_dir, f'{runner.timestamp}.log')


def device_of(world_size: int) -> str:
    """'CPU' or the GPU's name, with the number of processes."""
    where = (f'GPU ({torch.cuda.get_device_name()})'
             if torch.cuda.is_available() else 'CPU')
    return f'{world_size} process{"es" if world_size > 1 else ""} on {where}'


@HOOKS.register_module()
def by_epoch(loop) -> bool:
    """Whether ``loop`` counts its schedule in epochs (mmengine's
    iteration-based loop has a ``max_epochs`` too, of 1)."""
    return (hasattr(loop, 'max_epochs')
            and not isinstance(loop, IterBasedTrainLoop))


class RunSummaryHook(Hook):
    """Logs a start line, and a summary line after training.

    Start: processes and device, the schedule, the work dir and the log
    file holding the environment and config. Summary: best and last value
    of the validation metric (``metric``, else the checkpoint hook's
    ``save_best`` key, else the first one the evaluator reports), the
    checkpoint to use (the best one where the checkpoint hook keeps it,
    else the last one), the log and the curves (drawn on rank 0 from
    ``vis_data/scalars.json`` where a LocalVisBackend writes it).

    Args:
        metric (str, optional): The metric to summarize. Default: None.
        draw_curves (bool): Draw loss and accuracy curves after training.
            Default: True.
    """

    priority = 'VERY_LOW'

    def __init__(self,
                 metric: Optional[str] = None,
                 draw_curves: bool = True) -> None:
        self.metric = metric
        self.draw_curves = draw_curves
        self.start_iter = 0

    def before_train(self, runner) -> None:
        self.start_iter = runner.iter
        loop = runner.train_loop
        if by_epoch(loop):
            schedule = (f'{loop.max_epochs} epochs of {len(loop.dataloader)} '
                        'iterations')
        else:
            schedule = f'{loop.max_iters} iterations'
        resumed = (f', resumed at epoch {runner.epoch}, iteration '
                   f'{runner.iter}' if runner.iter else '')
        runner.logger.info(f'start: {device_of(runner.world_size)}, '
                           f'{schedule}{resumed}; work dir {runner.work_dir}'
                           f'; environment and config in '
                           f'{log_file_of(runner)}')

    def after_val_epoch(self,
                        runner,
                        metrics: Optional[Dict[str, float]] = None) -> None:
        key = self._metric(runner, metrics or {})
        loop = getattr(runner, '_train_loop', None)
        if key is None or loop is None or isinstance(loop, dict):
            return  # a validation outside training
        value = metrics[key]
        if not isinstance(value, (int, float)):
            return
        history: List = list(runner.message_hub.get_info(HISTORY_KEY, []))
        history.append([key, runner.epoch, runner.iter, float(value)])
        runner.message_hub.update_info(HISTORY_KEY, history)

    def after_train(self, runner) -> None:
        if runner.iter == self.start_iter and self.start_iter > 0:
            loop = runner.train_loop
            end = (f'max_epochs={loop.max_epochs}'
                   if by_epoch(loop) else f'max_iters={loop.max_iters}')
            runner.logger.info(
                f'nothing to train: the run resumed at epoch {runner.epoch}, '
                f'iteration {runner.iter}, already the end of its schedule '
                f'({end}); raise train_cfg.{end.split("=")[0]} to train '
                'longer')
        if not is_main_process():
            return
        parts = [self._metric_summary(runner)]
        checkpoint = self._checkpoint(runner)
        if checkpoint:
            parts.append(f'checkpoint to use: {checkpoint}')
        parts.append(f'log: {log_file_of(runner)}')
        curves = self._curves(runner)
        if curves:
            parts.append(f'curves: {curves}')
        runner.logger.info('summary: ' + '; '.join(p for p in parts if p))

    def _metric(self, runner, metrics: Dict) -> Optional[str]:
        """The key of the metric to follow."""
        if self.metric:
            return self.metric if self.metric in metrics else None
        for hook in runner.hooks:
            keys = getattr(hook, 'key_indicators', None)
            if isinstance(hook,
                          CheckpointHook) and keys and keys[0] in (metrics):
                return keys[0]
        return next(iter(metrics), None)

    @staticmethod
    def _metric_summary(runner) -> str:
        """'best K V (epoch E), last V (epoch E)' over the run so far."""
        history = runner.message_hub.get_info(HISTORY_KEY, [])
        if not history:
            return 'no validation metric'
        key = history[-1][0]
        values = [h for h in history if h[0] == key]
        less = 'loss' in key
        best = (min if less else max)(values, key=lambda h: h[3])
        unit = 'epoch' if by_epoch(runner.train_loop) else 'iter'
        at = (lambda h: h[1] if unit == 'epoch' else h[2])
        last = values[-1]
        return (f'best {key} {best[3]:.4g} ({unit} {at(best)}), last '
                f'{last[3]:.4g} ({unit} {at(last)})')

    @staticmethod
    def _checkpoint(runner) -> Optional[str]:
        """The best checkpoint where one is kept, else the last one."""
        for hook in runner.hooks:
            best = getattr(hook, 'best_ckpt_path', None)
            if isinstance(hook, CheckpointHook) and best:
                return str(best)
        last = runner.message_hub.get_info('last_ckpt', None)
        return str(last) if last else None

    def _curves(self, runner) -> Optional[str]:
        """Draw the curves next to the log; their file, or None."""
        scalars = osp.join(runner.log_dir, 'vis_data', 'scalars.json')
        if not self.draw_curves or not osp.isfile(scalars):
            return None
        out = osp.join(runner.log_dir, 'curves.png')
        plot_curves(scalars, out, title=runner.experiment_name)
        return out
