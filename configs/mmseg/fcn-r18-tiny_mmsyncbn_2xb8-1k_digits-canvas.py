# An mmseg config trained with MMSyncBN: mmseg's EncoderDecoder (a narrow
# ResNetV1c-18 at output stride 8, FCNHead and an auxiliary FCNHead) and
# runtime, its BaseSegDataset on the folder layout that
# tools/misc/digits_on_canvas.py writes (digits on 64x64 canvases, a class
# per digit on its stroke pixels), every norm layer an MMSyncBN. The three
# mmsync lines are custom_imports, runner_type and norm_cfg. It trains with
# mmseg's own tools/train.py under torchrun (2 processes, on CPU too):
#   python tools/misc/digits_on_canvas.py data/digits_canvas
#   MMSEG=$(python -c 'import mmseg, os; print(os.path.dirname(mmseg.__file__))')  # noqa: E501
#   torchrun --nproc_per_node 2 $MMSEG/.mim/tools/train.py configs/mmseg/fcn-r18-tiny_mmsyncbn_2xb8-1k_digits-canvas.py --launcher pytorch  # noqa: E501
# Needs mmcv's full build, mmseg 1.2 (tools/setup/setup_downstream.sh).
_base_ = ['mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
runner_type = 'MMSyncRunner'

# stats_mode='N': the exact statistics of the global batch.
norm_cfg = dict(type='MMSyncBN', stats_mode='N')
classes = ('background', ) + tuple(str(d) for d in range(10))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[127.5] * 3,
        std=[127.5] * 3,
        bgr_to_rgb=False,
        pad_val=0,
        seg_pad_val=255,
        size=(64, 64)),
    backbone=dict(
        type='ResNetV1c',
        depth=18,
        stem_channels=16,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True),
    decode_head=dict(
        type='FCNHead',
        in_channels=128,
        in_index=3,
        channels=64,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=64,
        in_index=2,
        channels=32,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

data_root = 'data/digits_canvas/seg'
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=dict(classes=classes),
    img_suffix='.png',
    seg_map_suffix='.png',
    reduce_zero_label=False)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
test_pipeline = train_pipeline
# num_workers=0: the images are tiny, loading in the process is fastest.
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        dataset,
        data_prefix=dict(
            img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        dataset,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.004, weight_decay=1e-4))
param_scheduler = [
    dict(
        type='PolyLR', eta_min=0, power=0.9, begin=0, end=1000, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=1000, val_interval=500)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500))
