"""One training step at world 2 (gloo) equals BN on the concatenated batch.

Two routes from an mmengine config file: a model whose norm_cfg is
'MMSyncBN' wrapped in mmengine's MMDistributedDataParallel, and a BN model
converted by ``MMSyncRunner`` from ``sync_bn = 'mmsync'``. Both run in the
same two spawned processes; the reference is the BN model trained in this
process on the whole batch, in float64.
"""
import io

import pytest
import torch
from cnn_test_utils import toy_batch
from dist_utils import run_distributed
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS

from mmsync.engine import MMSyncRunner
from mmsync.ops import SyncBatchNorm

WORLD_SIZE = 2
PER_RANK = 4

CONFIG = """
model = dict(
    type='mmsync.CnnTestToyNet', norm_cfg=dict(type='{norm}'), channels=4)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.5, momentum=0.0))
sync_bn = {sync_bn!r}
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
"""


def write_config(path: str, norm: str, sync_bn=None) -> str:
    with open(path, 'w') as f:
        f.write(CONFIG.format(norm=norm, sync_bn=sync_bn))
    return path


def _load(payload: bytes):
    return torch.load(io.BytesIO(payload), weights_only=False)


def _scalar(value) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_worker(rank: int, world_size: int, mmsync_cfg_path: str,
                  bn_cfg_path: str, work_dir: str, init_state: bytes) -> dict:
    batch = toy_batch(world_size * PER_RANK)
    data = {
        k: v[rank * PER_RANK:(rank + 1) * PER_RANK]
        for k, v in batch.items()
    }
    init = _load(init_state)

    # Route 1: norm_cfg=dict(type='MMSyncBN') in the config file.
    cfg = Config.fromfile(mmsync_cfg_path)
    model = MODELS.build(cfg.model).double()
    model.load_state_dict(init, strict=True)
    norm_types = [type(m).__name__ for m in model.norms]
    ddp = MMDistributedDataParallel(module=model, device_ids=None)
    optim_wrapper = build_optim_wrapper(ddp, cfg.optim_wrapper)
    log_vars = ddp.train_step(data, optim_wrapper)
    from_config = dict(
        state=_state(model), loss=_scalar(log_vars['loss']), norms=norm_types)

    # Route 2: a BN model and cfg.sync_bn='mmsync' given to MMSyncRunner;
    # the Runner reads model_wrapper_cfg (CPU DDP: device_ids=None) from cfg.
    cfg = Config.fromfile(bn_cfg_path)
    model = MODELS.build(cfg.model).double()
    model.load_state_dict(init, strict=True)
    runner = MMSyncRunner(
        model=model,
        work_dir=work_dir,
        launcher='pytorch',
        env_cfg=cfg.env_cfg,
        log_level='WARNING',
        cfg=cfg)
    converted = runner.model.module
    norms = converted.norms
    optim_wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
    log_vars = runner.model.train_step(data, optim_wrapper)
    from_runner = dict(
        state=_state(converted),
        loss=_scalar(log_vars['loss']),
        norms=[type(m).__name__ for m in norms],
        is_mmsync=[isinstance(m, SyncBatchNorm) for m in norms],
        group_size=[getattr(m, 'group_size', None) for m in norms],
        wrapper=type(runner.model).__name__)
    return dict(from_config=from_config, from_runner=from_runner)


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    """Run both routes once at world 2 and the BN reference in process."""
    tmp = tmp_path_factory.mktemp('dist_config_train')
    mmsync_cfg = write_config(str(tmp / 'mmsyncbn.py'), 'MMSyncBN')
    bn_cfg = write_config(str(tmp / 'bn_sync_mmsync.py'), 'BN', 'mmsync')

    cfg = Config.fromfile(bn_cfg)
    torch.manual_seed(0)
    reference = MODELS.build(cfg.model).double()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    init_state = buffer.getvalue()
    optim_wrapper = build_optim_wrapper(reference, cfg.optim_wrapper)
    log_vars = reference.train_step(
        toy_batch(WORLD_SIZE * PER_RANK), optim_wrapper)

    outputs = run_distributed(
        _train_worker,
        WORLD_SIZE,
        mmsync_cfg,
        bn_cfg,
        str(tmp / 'work_dir'),
        init_state,
        timeout=150,
        pg_timeout=60)
    return dict(
        outputs=outputs,
        reference_state=_state(reference),
        reference_loss=_scalar(log_vars['loss']),
        init_state=_load(init_state))


def _assert_state_equal(state: dict, reference: dict) -> None:
    assert set(state) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(
            state[key], value, rtol=1e-10, atol=1e-12, msg=key)


class TestDistConfigTrain:

    @pytest.mark.parametrize('route', ['from_config', 'from_runner'])
    def test_step_matches_bn_on_concatenated_batch(self, dist_run, route):
        for output in dist_run['outputs']:
            _assert_state_equal(output[route]['state'],
                                dist_run['reference_state'])
        # Each rank's loss is the mean over its slice; equal slices average
        # to the loss of the whole batch.
        losses = [output[route]['loss'] for output in dist_run['outputs']]
        assert losses[0] != losses[1]
        assert sum(losses) / len(losses) == pytest.approx(
            dist_run['reference_loss'], rel=1e-12)

    @pytest.mark.parametrize('route', ['from_config', 'from_runner'])
    def test_step_changed_every_tensor(self, dist_run, route):
        # The comparison above means something only if the step moved the
        # weights and the running statistics.
        state = dist_run['outputs'][0][route]['state']
        for key, value in dist_run['init_state'].items():
            if key.endswith('num_batches_tracked'):
                assert int(state[key]) == int(value) + 1, key
            else:
                assert not torch.equal(state[key], value), key

    def test_config_norm_cfg_builds_mmsyncbn(self, dist_run):
        for output in dist_run['outputs']:
            assert output['from_config']['norms'] == ['SyncBatchNorm'] * 2

    def test_runner_converted_bn_before_wrapping(self, dist_run):
        for output in dist_run['outputs']:
            result = output['from_runner']
            assert result['is_mmsync'] == [True, True]
            assert result['group_size'] == [WORLD_SIZE, WORLD_SIZE]
            assert result['wrapper'] == 'MMDistributedDataParallel'
