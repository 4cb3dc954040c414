"""mmdet3d's own packaged tools/train.py on mmsync's PointPillars config,
under torchrun at world 2 on CPU.

configs/mmdet3d/pointpillars-tiny_mmsyncbn_2xb4-600i_point-scenes.py is used
as it is but for the data folder (written by tools/misc/point_cloud_scenes.py
in KITTI's layout) and a shorter schedule: mmdet3d's runtime, KittiDataset,
its point-cloud transforms, mmcv's CPU voxelization, Anchor3DHead's losses
and rotated NMS, and IndoorMetric's 3-D IoU AP, with mmsync reached by the
config's three lines alone; the two ranks' pillar counts differ at every
step. The AP after the short run must pass a floor that only learning
reaches (the untrained model scores 0). Needs mmcv's full build and mmdet3d
(the main CI environment, tools/setup/setup_downstream.sh).
"""
import os.path as osp
import sys

import pytest
from test_train_mmseg_mmdet import train

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'test_tools'))
from tools_launch import REPO, python, run  # noqa: E402

CONFIG = osp.join(REPO, 'configs', 'mmdet3d',
                  'pointpillars-tiny_mmsyncbn_2xb4-600i_point-scenes.py')
ITERS = 250
FLOOR = 0.3


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    """The KITTI-style scenes of tools/misc/point_cloud_scenes.py."""
    pytest.importorskip(
        'mmdet3d.models',
        reason="needs mmcv's full build and mmdet3d "
        '(tools/setup/setup_downstream.sh)')
    out = str(tmp_path_factory.mktemp('point_scenes'))
    run(python('misc/point_cloud_scenes.py', out))
    return out + '/'


def test_mmdet3d_train_py_learns_pointpillars(scenes, tmp_path):
    iters = ITERS
    # The config's 600-step schedule, stopped early: a cosine decayed over
    # 250 steps leaves the scores under the config's threshold (measured
    # mAP_0.25 0.009 after 200 such steps).
    records = train('mmdet3d', CONFIG, tmp_path / 'work', scenes, iters)
    aps = [r['mAP_0.25'] for r in records if 'mAP_0.25' in r]
    assert len(aps) == 1, records[-3:]
    # Measured 0.746 (mAP_0.50 0.502) after these 250 steps, 1.0 after 300
    # (docs/training.md); 0 after 60: the untrained scores stay under the
    # config's threshold.
    assert aps[-1] >= FLOOR, aps
    assert osp.isfile(tmp_path / 'work' / f'iter_{iters}.pth')
