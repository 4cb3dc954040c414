"""Resume at another world size, and say what changed.

A run restarted on fewer or more nodes (torchrun's ``NNODES=MIN:MAX``, a
Slurm job resubmitted elsewhere) resumes from the newest checkpoint; the
sampler splits the data over the new world and the per-process batch stays,
so the total batch changes with the world. mmengine scales the learning
rate to the total batch when the optimizer is built (``auto_scale_lr``),
but the resumed optimizer and schedulers bring the old world's rate back:
this hook scales them by the ratio of the worlds. The checkpoint records
its world size; the log says what changed.
"""
from typing import Dict, Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS as ROOT_HOOKS

from ...registry import HOOKS


def scale_lr_state(checkpoint: Dict, factor: float) -> None:
    """Multiply the learning rates of a checkpoint's optimizer and LR
    schedulers by ``factor`` in place."""
    for group in checkpoint.get('optimizer', {}).get('param_groups', []):
        for key in ('lr', 'initial_lr'):
            if key in group:
                group[key] *= factor
    schedulers = checkpoint.get('param_schedulers', [])
    if isinstance(schedulers, dict):
        schedulers = [s for group in schedulers.values() for s in group]
    for state in schedulers:
        if state.get('param_name', 'lr') != 'lr':
            continue
        for key in ('base_values', '_last_value'):
            if key in state:
                state[key] = [value * factor for value in state[key]]


class WorldSizeHook(Hook):
    """Records the world size in each checkpoint; on resuming at another
    one, logs the change and scales the learning rate where the config's
    ``auto_scale_lr`` is enabled. :class:`~mmsync.engine.MMSyncRunner`
    registers it."""

    priority = 'VERY_HIGH'

    def before_save_checkpoint(self, runner, checkpoint: Dict) -> None:
        checkpoint.setdefault('meta', {})['world_size'] = runner.world_size

    def after_load_checkpoint(self, runner, checkpoint: Dict) -> None:
        before: Optional[int] = checkpoint.get('meta', {}).get('world_size')
        now = runner.world_size
        if before is None or before == now or 'optimizer' not in checkpoint:
            return
        batch = runner.cfg.get('train_dataloader', {}).get('batch_size')
        change = (f'world size {before} -> {now} since the checkpoint: the '
                  f'train set splits over {now} processes')
        if batch:
            change += (f', {batch} samples each: total batch '
                       f'{before * batch} -> {now * batch}')
        auto_scale_lr = runner.cfg.get('auto_scale_lr') or {}
        if auto_scale_lr.get('enable', False):
            scale_lr_state(checkpoint, now / before)
            change += f'; learning rate x{now / before:g} (auto_scale_lr)'
        else:
            change += ('; learning rate kept (enable auto_scale_lr to scale '
                       'it with the total batch)')
        runner.logger.warning(change)


HOOKS.register_module(module=WorldSizeHook)
ROOT_HOOKS.register_module(module=WorldSizeHook, force=True)
