"""mmseg's and mmdet's own packaged tools/train.py on mmsync's example
configs, under torchrun at world 2 on CPU.

configs/mmseg/fcn-r18-tiny_mmsyncbn_2xb8-1k_digits-canvas.py and
configs/mmdet/retinanet-r18-tiny_mmsyncbn_2xb8-2k_digits-canvas.py are used
as they are but for the data folder (written by
tools/misc/digits_on_canvas.py) and a shorter schedule: the codebases'
runtimes (default scope, NCCL in their dist_cfg), datasets (BaseSegDataset,
CocoDataset), metrics (IoUMetric, CocoMetric) and mmcv's full build (its
nms), with mmsync reached by the config's three lines alone. The metric
after the short run must pass a floor that only learning reaches (an
all-background prediction scores mIoU 8.5, and an untrained detector a bbox
mAP near 0). Needs mmcv's full build, mmseg and mmdet (the main CI environment,
tools/setup/setup_downstream.sh).
"""
import os.path as osp
import re
import sys

import pytest

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'test_tools'))
from tools_launch import free_port  # noqa: E402
from tools_launch import REPO, base_env, finish, python, run, scalars, start

SEG_CONFIG = osp.join(REPO, 'configs', 'mmseg',
                      'fcn-r18-tiny_mmsyncbn_2xb8-1k_digits-canvas.py')
DET_CONFIG = osp.join(REPO, 'configs', 'mmdet',
                      'retinanet-r18-tiny_mmsyncbn_2xb8-2k_digits-canvas.py')


@pytest.fixture(scope='module')
def canvas(tmp_path_factory):
    """The data sets of tools/misc/digits_on_canvas.py, written once."""
    out = str(tmp_path_factory.mktemp('digits_canvas'))
    run(python('misc/digits_on_canvas.py', out))
    return out


def train(package: str, config: str, work_dir, data_root: str, iters: int,
          *options: str):
    """``torchrun --nproc_per_node 2 <package>/.mim/tools/train.py``."""
    module = pytest.importorskip(
        f'{package}.models',
        reason=f"needs mmcv's full build and {package} "
        '(tools/setup/setup_downstream.sh)')
    tools = osp.join(
        osp.dirname(osp.dirname(osp.abspath(module.__file__))), '.mim',
        'tools')
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
        '--master_port',
        str(free_port()),
        osp.join(tools,
                 'train.py'), config, '--launcher', 'pytorch', '--work-dir',
        str(work_dir), '--cfg-options',
        f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}',
        f'test_dataloader.dataset.data_root={data_root}',
        f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
        'randomness.seed=0', *options
    ]
    env = base_env(CUDA_VISIBLE_DEVICES='', MKL_NUM_THREADS='1')
    result = finish(start(cmd, env), 900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert 'process group: gloo, 2 ranks' in output, output[-4000:]
    layers = re.findall(r'batch norm layers: (\d+) of (\d+) are mmsync',
                        output)
    assert layers and layers[0][0] == layers[0][1] != '0', output[-4000:]
    return scalars(str(work_dir))


def test_mmseg_train_py_learns_segmentation(canvas, tmp_path):
    iters = 500
    records = train('mmseg', SEG_CONFIG, tmp_path / 'work',
                    osp.join(canvas, 'seg'), iters,
                    f'param_scheduler.0.end={iters}')
    miou = [r['mIoU'] for r in records if 'mIoU' in r]
    assert len(miou) == 1, records[-3:]
    # 500 steps of 2 x 8 canvases, the learning rate decayed over them:
    # measured 29.0 (the config's 1000 steps: 54.3, docs/training.md); an
    # all-background prediction: 8.5.
    assert miou[-1] >= 20.0, miou
    assert osp.isfile(tmp_path / 'work' / f'iter_{iters}.pth')


def test_mmdet_train_py_learns_detection(canvas, tmp_path):
    iters = 300
    records = train(
        'mmdet', DET_CONFIG, tmp_path / 'work',
        osp.join(canvas, 'det') + '/', iters,
        f'val_evaluator.ann_file={canvas}/det/annotations/'
        'val.json', f'param_scheduler.1.T_max={iters}',
        f'param_scheduler.1.end={iters}')
    maps = [r['coco/bbox_mAP'] for r in records if 'coco/bbox_mAP' in r]
    assert len(maps) == 1, records[-3:]
    # 300 steps of 2 x 8 canvases: measured 0.427 (the config's 2000 steps:
    # 0.528, docs/training.md); the floor leaves room for machine-to-machine
    # differences.
    assert maps[-1] >= 0.2, maps
    assert osp.isfile(tmp_path / 'work' / f'iter_{iters}.pth')
