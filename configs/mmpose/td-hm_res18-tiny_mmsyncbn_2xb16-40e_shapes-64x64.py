# An mmpose config trained with MMSyncBN: mmpose's top-down heatmap model
# (TopdownPoseEstimator, a narrow ResNet-18 and HeatmapHead) and runtime,
# its CocoDataset on the COCO keypoint layout that
# tools/misc/shapes_keypoints.py writes (shapes on 96x96 images, their four
# corners the keypoints), evaluated by CocoMetric (OKS AP) and PCKAccuracy.
# The mmsync lines are custom_imports, runner_type, norm_cfg, and sync_bn
# for the BatchNorm2d that HeatmapHead builds without a norm_cfg. Trained
# under torchrun (2 processes, on CPU too) by mmsync's tools/train.py, which
# builds the config's runner_type (mmpose 1.3.2's own tools/train.py builds
# mmengine's Runner whatever the config says, which on CPU stops in
# torch.cuda.set_device):
#   python tools/misc/shapes_keypoints.py data/shapes_keypoints
#   bash tools/dist_train.sh configs/mmpose/td-hm_res18-tiny_mmsyncbn_2xb16-40e_shapes-64x64.py 2  # noqa: E501
# Needs mmcv's full build, mmpose 1.3.2, mmdet 3.3 and torchvision
# (.ci/mmpose_env.sh).
_base_ = ['mmpose::_base_/default_runtime.py']
custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
runner_type = 'MMSyncRunner'

# stats_mode='N': the exact statistics of the global batch.
norm_cfg = dict(type='MMSyncBN', stats_mode='N')
sync_bn = dict(type='mmsync', stats_mode='N')

codec = dict(
    type='MSRAHeatmap', input_size=(64, 64), heatmap_size=(16, 16), sigma=1)
model = dict(
    type='TopdownPoseEstimator',
    data_preprocessor=dict(
        type='PoseDataPreprocessor',
        mean=[127.5] * 3,
        std=[127.5] * 3,
        bgr_to_rgb=True),
    backbone=dict(
        type='ResNet',
        depth=18,
        stem_channels=16,
        base_channels=16,
        out_indices=(3, ),
        norm_cfg=norm_cfg,
        norm_eval=False),
    head=dict(
        type='HeatmapHead',
        in_channels=128,
        out_channels=4,
        deconv_out_channels=(32, 32, 32),
        deconv_kernel_sizes=(4, 4, 4),
        loss=dict(type='KeypointMSELoss', use_target_weight=True),
        decoder=codec),
    test_cfg=dict(flip_test=True, flip_mode='heatmap', shift_heatmap=True))

# The corners, named by the quadrant of the shape's box they lie in, in
# tools/misc/shapes_keypoints.py's order; a horizontal flip swaps left and
# right; the edges join each corner to the next.
corners = ('top_left', 'top_right', 'bottom_right', 'bottom_left')
metainfo = dict(
    dataset_name='shapes_keypoints',
    keypoint_info={
        0:
        dict(
            name='top_left',
            id=0,
            color=[255, 0, 0],
            type='upper',
            swap='top_right'),
        1:
        dict(
            name='top_right',
            id=1,
            color=[0, 255, 0],
            type='upper',
            swap='top_left'),
        2:
        dict(
            name='bottom_right',
            id=2,
            color=[0, 0, 255],
            type='lower',
            swap='bottom_left'),
        3:
        dict(
            name='bottom_left',
            id=3,
            color=[255, 255, 0],
            type='lower',
            swap='bottom_right')
    },
    skeleton_info={
        i: dict(link=(corners[i], corners[i - 3]), id=i, color=[255] * 3)
        for i in range(4)
    },
    joint_weights=[1.0] * 4,
    sigmas=[0.05] * 4)

data_root = 'data/shapes_keypoints/'
dataset = dict(
    type='CocoDataset',
    data_root=data_root,
    data_mode='topdown',
    metainfo=metainfo)
train_pipeline = [
    dict(type='LoadImage'),
    dict(type='GetBBoxCenterScale'),
    dict(type='RandomFlip', direction='horizontal'),
    # Small rotations: a corner keeps the quadrant that names it.
    dict(type='RandomBBoxTransform', rotate_factor=15.0),
    dict(type='TopdownAffine', input_size=codec['input_size']),
    dict(type='GenerateTarget', encoder=codec),
    dict(type='PackPoseInputs')
]
val_pipeline = [
    dict(type='LoadImage'),
    dict(type='GetBBoxCenterScale'),
    dict(type='TopdownAffine', input_size=codec['input_size']),
    dict(type='PackPoseInputs')
]
# num_workers=0: the images are tiny, loading in the process is fastest.
train_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        dataset,
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False, round_up=False),
    dataset=dict(
        dataset,
        ann_file='annotations/val.json',
        data_prefix=dict(img='images/val/'),
        test_mode=True,
        pipeline=val_pipeline))
test_dataloader = val_dataloader
# CocoMetric without ann_file evaluates against the data set's own boxes
# and keypoints (converted to COCO's json), so only data_root names files.
val_evaluator = [dict(type='CocoMetric'), dict(type='PCKAccuracy')]
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='Adam', lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', begin=0, end=100, start_factor=0.01, by_epoch=False),
    dict(type='CosineAnnealingLR', begin=0, end=40, T_max=40, by_epoch=True)
]
train_cfg = dict(by_epoch=True, max_epochs=40, val_interval=10)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', interval=10))
