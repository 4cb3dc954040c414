# An mmdet config trained with MMSyncBN: mmdet's RetinaNet (a narrow
# ResNet-18 and FPN, both with MMSyncBN, anchors scaled to the digits) and
# runtime, its CocoDataset on the COCO-style boxes that
# tools/misc/digits_on_canvas.py writes (digits on 64x64 canvases, a class
# per digit), evaluated by CocoMetric (bbox mAP). The three mmsync lines are
# custom_imports, runner_type and norm_cfg. It trains with mmdet's own
# tools/train.py under torchrun (2 processes, on CPU too):
#   python tools/misc/digits_on_canvas.py data/digits_canvas
#   MMDET=$(python -c 'import mmdet, os; print(os.path.dirname(mmdet.__file__))')  # noqa: E501
#   torchrun --nproc_per_node 2 $MMDET/.mim/tools/train.py configs/mmdet/retinanet-r18-tiny_mmsyncbn_2xb8-2k_digits-canvas.py --launcher pytorch  # noqa: E501
# Needs mmcv's full build (its nms), mmdet 3.3 (tools/setup/setup_downstream.sh).
_base_ = ['mmdet::_base_/default_runtime.py']
custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
runner_type = 'MMSyncRunner'

# stats_mode='N': the exact statistics of the global batch.
norm_cfg = dict(type='MMSyncBN', stats_mode='N')
classes = tuple(str(d) for d in range(10))
model = dict(
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[127.5] * 3,
        std=[127.5] * 3,
        bgr_to_rgb=False,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        depth=18,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch'),
    neck=dict(
        type='FPN',
        in_channels=[16, 32, 64, 128],
        out_channels=32,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=3,
        norm_cfg=norm_cfg),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=len(classes),
        in_channels=32,
        stacked_convs=2,
        feat_channels=32,
        norm_cfg=norm_cfg,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=2,
            scales_per_octave=3,
            ratios=[0.75, 1.0, 1.5],
            strides=[8, 16, 32]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[.0, .0, .0, .0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.5),
        max_per_img=20))

data_root = 'data/digits_canvas/det/'
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs')
]
dataset = dict(
    type='CocoDataset',
    data_root=data_root,
    metainfo=dict(classes=classes),
    pipeline=pipeline)
# num_workers=0: the images are tiny, loading in the process is fastest.
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        dataset,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4)))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        dataset,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/val.json',
    metric='bbox',
    format_only=False)
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.002, weight_decay=1e-4),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(
        type='CosineAnnealingLR',
        T_max=2000,
        by_epoch=False,
        begin=0,
        end=2000)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2000, val_interval=1000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000))
log_processor = dict(by_epoch=False)
