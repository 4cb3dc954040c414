"""tools/dist_train.sh on a real mmpretrain config with MMSyncBN, on CPU.

configs/mmpretrain/resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py is used
unchanged but for the data folder and a shorter schedule: mmpretrain's
ResNet-18, runtime (default scope 'mmpretrain', NCCL in its dist_cfg) and
CustomDataset on PNG class folders written by tools/misc/digits_to_images.py,
two processes joined by gloo. Needs mmpretrain (the CUDA-torch CI
environment).
"""
import os.path as osp
import re
import sys

import pytest

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'test_tools'))
from tools_launch import REPO, base_env, finish, free_port, start  # noqa: E402

CONFIG = osp.join('configs', 'mmpretrain',
                  'resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py')


def test_dist_train_trains_mmpretrain_config_on_cpu(tmp_path):
    pytest.importorskip('mmpretrain.models', reason='needs mmpretrain')
    data = str(tmp_path / 'digits_png')
    made = finish(
        start([sys.executable, 'tools/misc/digits_to_images.py', data]), 300)
    assert made.returncode == 0, made.stderr
    work_dir = str(tmp_path / 'work')
    cmd = [
        'bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir', work_dir,
        '--cfg-options', f'train_dataloader.dataset.data_root={data}',
        f'val_dataloader.dataset.data_root={data}',
        f'test_dataloader.dataset.data_root={data}', 'train_cfg.max_epochs=2',
        'param_scheduler.T_max=2'
    ]
    env = base_env(PORT=str(free_port()), CUDA_VISIBLE_DEVICES='')
    run = finish(start(cmd, env), 1200)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert 'process group: gloo, 2 ranks' in output
    accuracies = [
        float(a) for a in re.findall(r'accuracy/top1: ([0-9.]+)', output)
    ]
    assert len(accuracies) == 2, output[-4000:]
    # 16x16 digits after two epochs of ResNet-18 (measured 9x %).
    assert accuracies[-1] >= 80.0, accuracies
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
