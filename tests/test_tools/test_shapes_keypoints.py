"""tools/misc/shapes_keypoints.py writes mmpose's COCO keypoint layout, with
every corner in the quadrant of the box its name says (what makes the
keypoints learnable), from the command line as a user runs it."""
import json
import os.path as osp
import sys

import numpy as np
from tools_launch import REPO, run

TOOL = osp.join(REPO, 'tools', 'misc', 'shapes_keypoints.py')


def test_writes_coco_keypoints_named_by_quadrant(tmp_path):
    result = run([
        sys.executable, TOOL,
        str(tmp_path), '--num-train', '30', '--num-val', '10'
    ])
    assert 'train: 30 images' in result.stdout, result.stdout
    from PIL import Image
    for split, num in (('train', 30), ('val', 10)):
        with open(tmp_path / 'annotations' / f'{split}.json') as f:
            coco = json.load(f)
        (category, ) = coco['categories']
        assert category['keypoints'] == [
            'top_left', 'top_right', 'bottom_right', 'bottom_left'
        ]
        assert len(coco['images']) == num
        for image in coco['images']:
            with Image.open(tmp_path / 'images' / split /
                            image['file_name']) as im:
                assert im.size == (image['width'], image['height']) == (96, 96)
        shapes = coco['annotations']
        assert num <= len(shapes) <= 2 * num
        triangles = 0
        for ann in shapes:
            points = np.array(ann['keypoints']).reshape(4, 3)
            seen = points[:, 2] > 0
            assert set(points[:, 2]) <= {0, 2} and seen.sum() >= 3
            assert ann['num_keypoints'] == seen.sum()
            triangles += seen.sum() == 3
            x, y, w, h = ann['bbox']
            assert w > 0 and h > 0 and ann['iscrowd'] == 0
            center = np.array([x + w / 2, y + h / 2])
            # (the box and the points are each rounded to 0.01)
            for (px, py, v), left, top in zip(points, (1, 0, 0, 1),
                                              (1, 1, 0, 0)):
                if not v:
                    continue
                assert x - 0.02 <= px <= x + w + 0.02
                assert y - 0.02 <= py <= y + h + 0.02
                assert (px < center[0]) == left and (py < center[1]) == top
        assert 0 < triangles < len(shapes)
