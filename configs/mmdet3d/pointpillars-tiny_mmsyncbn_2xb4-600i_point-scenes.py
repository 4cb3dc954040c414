# An mmdet3d config trained with MMSyncBN: mmdet3d's PointPillars (its base
# model: PillarFeatureNet, SECOND, SECONDFPN, Anchor3DHead; narrowed, on a
# 30 m grid, one class) and runtime, its KittiDataset on the KITTI-style
# scenes tools/misc/point_cloud_scenes.py writes (box-shaped cars, bushes
# and poles on a flat ground). Per-rank pillar counts differ at every step:
# stats_mode='N' gives the statistics of the whole batch, where mmdet3d's
# naiveSyncBN1d/2d average per-rank means. Evaluated by mmdet3d's
# IndoorMetric (3-D IoU AP at 0.25 and 0.5 on LiDAR boxes, mmcv's CPU ops):
# KittiMetric's BEV and 3-D AP run numba.cuda kernels, which need a GPU. The
# three mmsync lines are custom_imports, runner_type and norm_cfg. It trains
# with mmdet3d's own tools/train.py under torchrun (2 processes, on CPU too):
#   python tools/misc/point_cloud_scenes.py data/point_scenes
#   MMDET3D=$(python -c 'import mmdet3d, os; print(os.path.dirname(mmdet3d.__file__))')  # noqa: E501
#   torchrun --nproc_per_node 2 $MMDET3D/.mim/tools/train.py configs/mmdet3d/pointpillars-tiny_mmsyncbn_2xb4-600i_point-scenes.py --launcher pytorch  # noqa: E501
# Needs mmcv's full build (voxelization, rotated IoU), mmdet3d 1.4
# (tools/setup/setup_downstream.sh).
_base_ = [
    'mmdet3d::_base_/models/pointpillars_hv_secfpn_kitti.py',
    'mmdet3d::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
runner_type = 'MMSyncRunner'

# mmdet3d's eps and momentum for PointPillars' norm layers.
norm_cfg = dict(type='MMSyncBN', stats_mode='N', eps=1e-3, momentum=0.01)
classes = ['Car']
point_cloud_range = [0, -15.36, -3, 30.72, 15.36, 1]
voxel_size = [0.32, 0.32, 4]
model = dict(
    data_preprocessor=dict(
        voxel_layer=dict(
            max_num_points=16,
            point_cloud_range=point_cloud_range,
            voxel_size=voxel_size,
            max_voxels=(8000, 8000))),
    voxel_encoder=dict(
        feat_channels=[32],
        voxel_size=voxel_size,
        point_cloud_range=point_cloud_range,
        norm_cfg=norm_cfg),
    middle_encoder=dict(in_channels=32, output_shape=[96, 96]),
    backbone=dict(
        in_channels=32,
        layer_nums=[1, 2, 2],
        out_channels=[32, 64, 64],
        norm_cfg=norm_cfg),
    neck=dict(
        in_channels=[32, 64, 64], out_channels=[32, 32, 32],
        norm_cfg=norm_cfg),
    bbox_head=dict(
        num_classes=len(classes),
        in_channels=96,
        feat_channels=96,
        anchor_generator=dict(
            _delete_=True,
            type='AlignedAnchor3DRangeGenerator',
            ranges=[[0, -15.36, -1.73, 30.72, 15.36, -1.73]],
            sizes=[[3.9, 1.6, 1.56]],
            rotations=[0, 1.57],
            reshape_out=True)),
    train_cfg=dict(
        _delete_=True,
        assigner=dict(
            type='Max3DIoUAssigner',
            iou_calculator=dict(type='mmdet3d.BboxOverlapsNearest3D'),
            pos_iou_thr=0.6,
            neg_iou_thr=0.45,
            min_pos_iou=0.45,
            ignore_iof_thr=-1),
        allowed_border=0,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(score_thr=0.05, nms_pre=200, max_num=20))

data_root = 'data/point_scenes/'
metainfo = dict(classes=classes, box_type_3d='LiDAR')
train_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=4, use_dim=4),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True),
    dict(type='RandomFlip3D', sync_2d=False, flip_ratio_bev_horizontal=0.5),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='PointShuffle'),
    dict(
        type='Pack3DDetInputs',
        keys=['points', 'gt_bboxes_3d', 'gt_labels_3d'])
]
test_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=4, use_dim=4),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['points'])
]
dataset = dict(
    type='KittiDataset',
    data_root=data_root,
    data_prefix=dict(pts='training/velodyne'),
    modality=dict(use_lidar=True, use_camera=False),
    box_type_3d='LiDAR',
    metainfo=metainfo,
    pcd_limit_range=point_cloud_range)
# num_workers=0: a scene loads in well under a millisecond.
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        dataset, ann_file='kitti_infos_train.pkl', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        dataset,
        ann_file='kitti_infos_val.pkl',
        pipeline=test_pipeline,
        test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(type='IndoorMetric', iou_thr=[0.25, 0.5])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.003, weight_decay=0.01),
    clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(
        type='CosineAnnealingLR', T_max=600, by_epoch=False, begin=0, end=600)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=600, val_interval=300)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=300))
log_processor = dict(by_epoch=False)
