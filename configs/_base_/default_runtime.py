# Runtime shared by every config: hooks, logging, distribution.
default_scope = 'mmsync'
# mmsync's runner (mmsync.engine): pre-flight, safe resume, atomic
# checkpoints, CPU start; what any launcher builds from this config.
runner_type = 'MMSyncRunner'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    # Prints loss, lr, time per step and the ETA every `interval` steps.
    logger=dict(type='LoggerHook', interval=10),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', interval=5, max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)

# The train log line shows how many batches MMSyncBN's running statistics
# skipped for non-finite statistics (an fp16 overflow, a bad sample), with a
# warning in an interval that skipped any (mmsync.engine).
custom_hooks = [dict(type='NonFiniteBatchesHook')]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # backend=None: tools/train.py picks 'nccl' where CUDA is available and
    # 'gloo' otherwise. timeout: seconds a collective may wait.
    dist_cfg=dict(backend=None, timeout=1800),
)

# device_ids=None: DDP works for CPU and single-GPU modules alike (mmengine's
# default passes LOCAL_RANK, which DDP rejects for a CPU model). DDP's
# default broadcast of rank 0's buffers keeps plain BN's running statistics
# the same on every rank; MMSyncBN's are the same anyway.
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(window_size=10, by_epoch=True)
log_level = 'INFO'

load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
