"""What mmsync adds to mmengine's training, as components a config names.

``runner_type='MMSyncRunner'``: the pre-flight, safe checkpoint loading,
auto-resume inside the work dir, atomic checkpoints, the CPU start and the
failure log, for any launcher that builds ``RUNNERS.build(cfg)``.
``strategy=dict(type='MMSyncDDPStrategy' or 'MMSyncFSDPStrategy')``: the same
``sync_bn='mmsync'`` and CPU start under mmengine's ``FlexibleRunner``.
``custom_hooks=[dict(type='PreciseBNHook')]``: exact population statistics.
"""
from .checkpoint import (ATOMIC_BACKEND, AtomicLocalBackend, CheckpointError,
                         checkpoint_loading, checkpoint_safe_globals,
                         find_resume_checkpoint, load_checkpoint_file,
                         resume_candidates)
from .fsdp import fully_shard_norms, norm_wrap_policy
from .hooks import NonFiniteBatchesHook, PreciseBNHook, update_bn_stats
from .preflight import LAUNCHERS, Plan, PreflightError, launch_env, preflight
from .runner import MMSyncRunner, init_dist_from_env, sync_bn_options
from .strategies import MMSyncDDPStrategy, MMSyncFSDPStrategy
from .summary import RunSummaryHook

__all__ = [
    'ATOMIC_BACKEND', 'AtomicLocalBackend', 'CheckpointError', 'LAUNCHERS',
    'MMSyncDDPStrategy', 'MMSyncFSDPStrategy', 'MMSyncRunner',
    'NonFiniteBatchesHook', 'Plan', 'PreciseBNHook', 'PreflightError',
    'RunSummaryHook', 'checkpoint_loading', 'checkpoint_safe_globals',
    'find_resume_checkpoint', 'fully_shard_norms', 'init_dist_from_env',
    'launch_env', 'load_checkpoint_file', 'norm_wrap_policy', 'preflight',
    'resume_candidates', 'sync_bn_options', 'update_bn_stats'
]
