"""mmengine's FlexibleRunner with mmsync's strategies trains at world 2
(gloo, CPU) exactly as one process with BN on the concatenated batches.

In one spawn, each rank leaves the test's process group so that the first
runner joins its own from torchrun's variables (mmengine's ``init_dist``
would call CUDA), with ``backend='nccl'`` as OpenMMLab's runtimes write it.
Then three ``FlexibleRunner`` runs of two iterations on a BN model with
``sync_bn='mmsync'``: ``MMSyncDDPStrategy``, ``MMSyncFSDPStrategy`` (float64,
both compared with the reference) and ``MMSyncFSDPStrategy`` under a bf16
mixed precision policy without an ``auto_wrap_policy`` (the norms in their
own float32 units).
"""
import os
import os.path as osp

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port, run_distributed
from engine_test_utils import ToyNet, rank_loader, toy_batch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import STRATEGIES
from mmengine.runner import FlexibleRunner
from torch.distributed.fsdp import FullyShardedDataParallel

from mmsync.engine import MMSyncDDPStrategy, MMSyncFSDPStrategy

WORLD_SIZE = 2
PER_RANK = 4
ITERS = 2
OPTIMIZER = dict(type='SGD', lr=0.5, momentum=0.9)


def unwrapped_state(model: torch.nn.Module) -> dict:
    """Parameters and buffers by their names in the unwrapped model, whole
    (FSDP's gathered)."""
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model):
            return unwrapped_state(model.module)
    module = getattr(model, 'module', model)
    state = dict(module.named_parameters())
    # Persistent buffers (MMSyncBN's count of skipped batches is no state).
    for prefix, sub in module.named_modules():
        state.update(
            (f'{prefix}.{name}' if prefix else name, buf)
            for name, buf in sub._buffers.items()
            if buf is not None and name not in sub._non_persistent_buffers_set)
    return {
        name.replace('_fsdp_wrapped_module.', ''): value.detach().clone()
        for name, value in state.items()
    }


def train(rank: int,
          work_dir: str,
          strategy: dict,
          dtype=torch.float64,
          init=None):
    torch.manual_seed(0)
    model = ToyNet().to(dtype)
    if init is not None:
        model.load_state_dict(init)
    norm_dtypes = []
    for module in model.norms:
        module.register_forward_pre_hook(
            lambda layer, args: norm_dtypes.append(layer.weight.dtype))
    runner = FlexibleRunner(
        model=model,
        work_dir=work_dir,
        strategy=strategy,
        launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60)),
        train_dataloader=rank_loader(
            toy_batch(WORLD_SIZE * PER_RANK * ITERS, dtype=dtype),
            [PER_RANK] * WORLD_SIZE, ITERS, rank),
        optim_wrapper=dict(optimizer=OPTIMIZER),
        train_cfg=dict(by_epoch=False, max_iters=ITERS),
        default_hooks=dict(checkpoint=None),
        log_level='WARNING')
    runner.train()
    wrapped = runner.model
    return dict(
        state=unwrapped_state(wrapped),
        norms=[
            type(m).__name__ for m in wrapped.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ],
        units=[
            type(m.module).__name__ for m in wrapped.modules()
            if isinstance(m, FullyShardedDataParallel)
        ],
        norm_dtypes=sorted({str(d)
                            for d in norm_dtypes}),
        wrapper=type(wrapped).__name__,
        backend=dist.get_backend())


def _flexible_worker(rank: int, world_size: int, port: int, work_dir: str,
                     init: dict) -> dict:
    dist.destroy_process_group()
    os.environ['MASTER_PORT'] = str(port)
    results = {}
    for name, strategy, dtype in (
        ('ddp', dict(type='MMSyncDDPStrategy'), torch.float64),
        ('fsdp', dict(type='MMSyncFSDPStrategy'), torch.float64),
        ('fsdp-bf16',
         dict(
             type='MMSyncFSDPStrategy',
             model_wrapper=dict(
                 mixed_precision=dict(
                     param_dtype='bfloat16', reduce_dtype='bfloat16'))),
         torch.float32),
    ):
        results[name] = train(
            rank,
            osp.join(work_dir, name),
            dict(strategy, sync_bn='mmsync'),
            dtype,
            init=init)
    return results


@pytest.fixture(scope='module')
def flexible_run(tmp_path_factory):
    torch.manual_seed(0)
    reference = ToyNet().double()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    outputs = run_distributed(
        _flexible_worker,
        WORLD_SIZE,
        free_port(),
        str(tmp_path_factory.mktemp('flexible')),
        init,
        timeout=240,
        pg_timeout=60)
    # One process, plain BN, the global batches.
    optim_wrapper = build_optim_wrapper(reference, dict(optimizer=OPTIMIZER))
    batch = toy_batch(WORLD_SIZE * PER_RANK * ITERS)
    size = WORLD_SIZE * PER_RANK
    for i in range(ITERS):
        reference.train_step(
            {
                k: v[i * size:(i + 1) * size]
                for k, v in batch.items()
            }, optim_wrapper)
    return dict(outputs=outputs, reference=unwrapped_state(reference))


def test_strategies_registered_at_the_root():
    assert STRATEGIES.get('MMSyncDDPStrategy') is MMSyncDDPStrategy
    assert STRATEGIES.get('MMSyncFSDPStrategy') is MMSyncFSDPStrategy
    assert STRATEGIES.get('mmsync.MMSyncFSDPStrategy') is MMSyncFSDPStrategy


@pytest.mark.parametrize('name,wrapper',
                         [('ddp', 'MMDistributedDataParallel'),
                          ('fsdp', 'MMFullyShardedDataParallel')])
def test_training_matches_bn_on_concatenated_batches(flexible_run, name,
                                                     wrapper):
    """Weights, running statistics and num_batches_tracked after two steps
    of SGD with momentum, on every rank."""
    reference = flexible_run['reference']
    for rank, output in enumerate(flexible_run['outputs']):
        result = output[name]
        assert result['wrapper'] == wrapper
        assert result['backend'] == 'gloo'
        assert result['norms'] == ['SyncBatchNorm'] * 2
        assert set(result['state']) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(
                result['state'][key],
                value,
                rtol=1e-10,
                atol=1e-12,
                msg=f'{name} {key}, rank {rank}')
        assert int(result['state']['bn1.num_batches_tracked']) == ITERS


def test_fsdp_bf16_policy_keeps_norms_float32(flexible_run):
    """Without an auto_wrap_policy in the config, each norm gets its own
    unit (besides the root) and runs with float32 weights."""
    for output in flexible_run['outputs']:
        result = output['fsdp-bf16']
        assert result['norms'] == ['SyncBatchNorm'] * 2
        assert result['units'] == ['ToyNet', 'SyncBatchNorm', 'SyncBatchNorm']
        assert result['norm_dtypes'] == ['torch.float32']
        # The parameters are kept (sharded) in float32; the training moved
        # the running statistics as the float64 reference's, to bf16's
        # precision of the convolutions' outputs.
        for key, value in result['state'].items():
            assert value.dtype != torch.bfloat16, key
            if 'running' in key:
                torch.testing.assert_close(
                    value.double(),
                    flexible_run['reference'][key],
                    rtol=0.05,
                    atol=0.05,
                    msg=key)
