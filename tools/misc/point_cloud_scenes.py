"""Write lidar scenes with box-shaped cars as a KITTI-style mmdet3d data set.

Each scene is a point cloud (x, y, z, intensity; float32, KITTI's velodyne
``.bin`` layout) of a flat ground 1.73 m below the sensor, a few cars (boxes
about 3.9 x 1.6 x 1.56 m at any heading, points on the faces the sensor sees,
fewer with distance) and as many distractors (bushes: round clusters; poles:
tall and thin) that are not cars. mmdet3d's own structures turn the LiDAR
boxes into KITTI's camera frame, so the files are what mmdet3d's KITTI
converter writes (info version 1.1)::

    OUT/training/velodyne/000000.bin ...
    OUT/kitti_infos_train.pkl, OUT/kitti_infos_val.pkl

with ``images.CAM2`` (``cam2img``, ``lidar2cam``, ``lidar2img``, KITTI's
camera) and ``instances`` (``bbox_3d`` in camera coordinates, ``bbox`` the
projected 2-D box, ``alpha``, ``truncated``, ``occluded``, ``difficulty``) for
mmdet3d's ``KittiDataset``::

    python tools/misc/point_cloud_scenes.py data/point_scenes
"""
import argparse
import os
import os.path as osp

import numpy as np

# KITTI's categories, as mmdet3d's converter numbers them; all cars here.
CATEGORIES = ('Pedestrian', 'Cyclist', 'Car', 'Van', 'Truck', 'Person_sitting',
              'Tram', 'Misc')
CAR_LABEL = CATEGORIES.index('Car')
# x forward, y left, z up (KITTI's velodyne frame); the sensor at the origin.
RANGE = (0.0, -15.36, -3.0, 30.72, 15.36, 1.0)
GROUND = -1.73
CAR = (3.9, 1.6, 1.56)  # length, width, height
IMAGE = (375, 1242)  # height, width of KITTI's camera 2
# KITTI's camera 2 intrinsics, and the rotation from the velodyne frame to a
# camera looking along x (camera x = -y, y = -z, z = x), 0.27 m behind it.
CAM2IMG = np.array([[721.54, 0.0, 609.56, 44.86], [0.0, 721.54, 172.85, 0.22],
                    [0.0, 0.0, 1.0, 0.003], [0.0, 0.0, 0.0, 1.0]])
LIDAR2CAM = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.08],
                      [1.0, 0.0, 0.0, -0.27], [0.0, 0.0, 0.0, 1.0]])


def box_surface(rng, centre, size, yaw, count):
    """``count`` points on the top and the sensor-facing sides of a box
    (bottom centre ``centre``, ``size`` = length, width, height)."""
    length, width, height = size
    local = rng.uniform(-0.5, 0.5, size=(count, 3)) * [length, width, height]
    local[:, 2] += height / 2
    face = rng.integers(0, 3, size=count)
    # 0: top; 1: a long side; 2: a short side, each the one nearer the
    # sensor (at the origin; in the box's frame at -R^T centre).
    c, s = np.cos(yaw), np.sin(yaw)
    toward = -np.array([[c, s], [-s, c]]) @ centre[:2]
    # (2 cm inside the faces, so that the box holds its points)
    local[face == 0, 2] = height - 0.02
    local[face == 1, 1] = np.sign(toward[1] or 1.0) * (width / 2 - 0.02)
    local[face == 2, 0] = np.sign(toward[0] or 1.0) * (length / 2 - 0.02)
    xy = local[:, :2] @ np.array([[c, s], [-s, c]])
    return np.column_stack([xy + centre[:2], local[:, 2] + centre[2]])


def scene(rng, cars: int, others: int):
    """One scene's points (N, 4) and its cars' LiDAR boxes (M, 7: bottom
    centre x, y, z, length, width, height, yaw)."""
    low, high = np.array(RANGE[:2]), np.array(RANGE[3:5])
    centres = []
    for _ in range(100 * (cars + others)):
        if len(centres) == cars + others:
            break
        xy = rng.uniform(low + [4.0, 3.0], high - 3.0)
        if all(np.hypot(*(xy - c)) > 6.0 for c in centres):
            centres.append(xy)
    clouds, boxes = [], []
    for i, xy in enumerate(centres):
        near = int(900 / (1 + np.hypot(*xy) / 6))
        if i < min(cars, len(centres)):
            size = np.array(CAR) * rng.uniform(0.9, 1.1, size=3)
            yaw = rng.uniform(-np.pi, np.pi)
            centre = np.array([*xy, GROUND])
            clouds.append(box_surface(rng, centre, size, yaw, near))
            boxes.append([*centre, *size, yaw])
        elif rng.random() < 0.5:  # a bush
            radius = rng.uniform(0.6, 1.2)
            d = rng.normal(size=(near // 2, 3))
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            d[:, 2] = np.abs(d[:, 2])
            clouds.append(np.array([*xy, GROUND]) + d * radius)
        else:  # a pole
            n = near // 4
            clouds.append(
                np.column_stack([
                    xy[0] + rng.normal(0, 0.1, n),
                    xy[1] + rng.normal(0, 0.1, n),
                    rng.uniform(GROUND, GROUND + 3.5, n)
                ]))
    ground = rng.uniform(RANGE[:2], RANGE[3:5], size=(4000, 2))
    clouds.append(np.column_stack([ground, np.full(len(ground), GROUND)]))
    xyz = np.concatenate(clouds) + rng.normal(0, 0.02, size=(1, 3))
    points = np.column_stack([xyz, rng.uniform(0, 1, len(xyz))])
    return points.astype(np.float32), np.array(boxes).reshape(-1, 7)


def instances(boxes: np.ndarray, points: np.ndarray):
    """KITTI info instances of LiDAR boxes, their camera boxes written by
    mmdet3d's own conversion."""
    import torch
    from mmcv.ops import points_in_boxes_cpu
    from mmdet3d.structures import (Box3DMode, LiDARInstance3DBoxes,
                                    points_cam2img)
    lidar = LiDARInstance3DBoxes(torch.tensor(boxes, dtype=torch.float32))
    camera = lidar.convert_to(Box3DMode.CAM, LIDAR2CAM)
    corners = points_cam2img(camera.corners,
                             torch.tensor(CAM2IMG, dtype=torch.float32))
    inside = points_in_boxes_cpu(
        torch.tensor(points[None, :, :3]),
        lidar.tensor[None]).sum(1)[0].tolist() if len(boxes) else []
    out = []
    for i, box in enumerate(camera.tensor.tolist()):
        lo, hi = corners[i].min(0)[0], corners[i].max(0)[0]
        bbox = [
            float(lo[0].clamp(0, IMAGE[1])),
            float(lo[1].clamp(0, IMAGE[0])),
            float(hi[0].clamp(0, IMAGE[1])),
            float(hi[1].clamp(0, IMAGE[0]))
        ]
        out.append(
            dict(
                bbox=bbox,
                bbox_label=CAR_LABEL,
                bbox_3d=box,
                bbox_label_3d=CAR_LABEL,
                depth=box[2],
                center_2d=[(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2],
                num_lidar_pts=int(inside[i]),
                difficulty=0,
                truncated=0.0,
                occluded=0,
                alpha=float(-np.arctan2(-box[0], box[2]) + box[6]),
                score=0.0,
                index=i,
                group_id=i))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='folder to write')
    parser.add_argument('--train', type=int, default=160, help='scenes')
    parser.add_argument('--val', type=int, default=40, help='scenes')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    import mmengine
    rng = np.random.default_rng(args.seed)
    velodyne = osp.join(args.out, 'training', 'velodyne')
    os.makedirs(velodyne, exist_ok=True)
    index = 0
    for split, count in (('train', args.train), ('val', args.val)):
        data_list = []
        for _ in range(count):
            points, boxes = scene(rng, int(rng.integers(2, 5)),
                                  int(rng.integers(1, 4)))
            name = f'{index:06d}.bin'
            points.tofile(osp.join(velodyne, name))
            data_list.append(
                dict(
                    sample_idx=index,
                    images=dict(
                        CAM2=dict(
                            img_path=f'{index:06d}.png',
                            height=IMAGE[0],
                            width=IMAGE[1],
                            cam2img=CAM2IMG.tolist(),
                            lidar2cam=LIDAR2CAM.tolist(),
                            lidar2img=(CAM2IMG @ LIDAR2CAM).tolist())),
                    lidar_points=dict(num_pts_feats=4, lidar_path=name),
                    instances=instances(boxes, points)))
            index += 1
        mmengine.dump(
            dict(
                metainfo=dict(
                    categories={
                        c: i
                        for i, c in enumerate(CATEGORIES)
                    },
                    dataset='kitti',
                    info_version='1.1'),
                data_list=data_list),
            osp.join(args.out, f'kitti_infos_{split}.pkl'))
        print(f'{split}: {count} scenes, '
              f'{sum(len(d["instances"]) for d in data_list)} cars')


if __name__ == '__main__':
    main()
