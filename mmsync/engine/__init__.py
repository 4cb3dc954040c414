"""What mmsync adds to mmengine's training, as components a config names.

``runner_type='MMSyncRunner'``: the pre-flight, safe checkpoint loading,
auto-resume inside the work dir, atomic checkpoints, the CPU start and the
failure log, for any launcher that builds ``RUNNERS.build(cfg)``.
"""
from .checkpoint import (ATOMIC_BACKEND, AtomicLocalBackend, CheckpointError,
                         checkpoint_loading, checkpoint_safe_globals,
                         find_resume_checkpoint, load_checkpoint_file,
                         resume_candidates)
from .hooks.nonfinite import NonFiniteBatchesHook
from .preflight import LAUNCHERS, Plan, PreflightError, launch_env, preflight
from .runner import MMSyncRunner, init_dist_from_env, sync_bn_options

__all__ = [
    'ATOMIC_BACKEND', 'AtomicLocalBackend', 'CheckpointError', 'LAUNCHERS',
    'MMSyncRunner', 'NonFiniteBatchesHook', 'Plan', 'PreflightError',
    'checkpoint_loading', 'checkpoint_safe_globals', 'find_resume_checkpoint',
    'init_dist_from_env', 'launch_env', 'load_checkpoint_file', 'preflight',
    'resume_candidates', 'sync_bn_options'
]
