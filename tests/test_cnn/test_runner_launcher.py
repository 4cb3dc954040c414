"""MMSyncRunner started by torchrun on CPU with an OpenMMLab-style config.

The config is what OpenMMLab codebases ship: ``launcher='pytorch'``,
``dist_cfg=dict(backend='nccl')``, no ``model_wrapper_cfg``, and BatchNorm
turned into MMSyncBN by ``sync_bn='mmsync'``. mmengine's own path would call
``torch.cuda.set_device`` and wrap the model with ``device_ids=[rank]``;
MMSyncRunner joins gloo and wraps without device ids, with no edit to the
config or to mmengine.
"""
import os
import os.path as osp
import subprocess
import sys

from dist_utils import free_port

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

SCRIPT = '''
import sys
import torch.distributed as dist
from mmsync.engine import MMSyncRunner
from mmsync.ops import SyncBatchNorm

cfg = dict(
    model=dict(type='mmsync.ResNetClassifier', num_classes=10,
               in_channels=1, widths=(8, 8), blocks=(1, 1),
               norm_cfg=dict(type='BN')),
    work_dir=sys.argv[1],
    launcher='pytorch',
    env_cfg=dict(dist_cfg=dict(backend='nccl')),
    sync_bn='mmsync',
    train_dataloader=dict(
        dataset=dict(type='mmsync.DigitsDataset', split='train', indices=64),
        sampler=dict(type='DefaultSampler', shuffle=True),
        collate_fn=dict(type='default_collate'), batch_size=8,
        num_workers=0),
    train_cfg=dict(by_epoch=True, max_epochs=1),
    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
    default_scope='mmsync',
    default_hooks=dict(checkpoint=None),
    log_level='WARNING')
runner = MMSyncRunner.from_cfg(cfg)
runner.train()
model = runner.model
norms = {type(m).__name__ for m in model.modules()
         if isinstance(m, SyncBatchNorm)}
result = (dist.get_backend(), type(model).__name__, str(model.device_ids),
          str(sorted(norms)), str(runner.train_loop.iter))
with open(f'{sys.argv[1]}/result_{dist.get_rank()}.txt', 'w') as f:
    f.write(' '.join(result))
'''


def test_torchrun_openmmlab_config_trains_on_cpu(tmp_path):
    script = tmp_path / 'train_cfg.py'
    script.write_text(SCRIPT)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
        '--master-addr', '127.0.0.1', '--master-port',
        str(free_port()),
        str(script),
        str(tmp_path / 'work')
    ]
    run = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results = [(tmp_path / 'work' / f'result_{rank}.txt').read_text().split()
               for rank in range(2)]
    # 64 samples, 2 processes x 8: 4 steps each.
    assert results == [[
        'gloo', 'MMDistributedDataParallel', 'None', "['SyncBatchNorm']", '4'
    ]] * 2, run.stdout
