# An mmpretrain config trained with MMSyncBN: mmpretrain's ResNet-18 (CIFAR
# stem) and runtime, its CustomDataset on PNG folders, every BatchNorm of the
# backbone an MMSyncBN. Three lines make any OpenMMLab config use mmsync:
# custom_imports (registers 'MMSyncBN' and 'MMSyncRunner' where mmpretrain
# looks), runner_type (the pre-flight, safe resume, atomic checkpoints, the
# CPU start) and norm_cfg. It trains with mmpretrain's own launchers as with
# mmsync's (2 processes, on CPU too):
#   python tools/misc/digits_to_images.py data/digits_png
#   bash tools/dist_train.sh configs/mmpretrain/resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py 2  # noqa: E501
#   bash $MMPRETRAIN/.mim/tools/dist_train.sh configs/mmpretrain/resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py 2  # noqa: E501
# Needs mmpretrain (and torchvision) installed; see docs/downstream.md.
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
runner_type = 'MMSyncRunner'

# stats_mode='N': the exact statistics of the global batch of 32, also for
# the last, unevenly split batch of an epoch.
model = dict(
    backbone=dict(norm_cfg=dict(type='MMSyncBN', stats_mode='N')),
    head=dict(num_classes=10))

# 16x16 grayscale digits written as PNG class folders (1437 train, 360 val).
data_root = 'data/digits_png'
data_preprocessor = dict(
    num_classes=10, mean=[127.5] * 3, std=[127.5] * 3, to_rgb=False)
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
dataset = dict(type='CustomDataset', data_root=data_root, pipeline=pipeline)
# num_workers=0: the images are tiny, loading in the process is fastest;
# persistent_workers=False, which mmpretrain's tools/train.py would set to
# True (invalid without workers).
train_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset, data_prefix='train'),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset, data_prefix='val'),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(type='CosineAnnealingLR', by_epoch=True, T_max=5)
train_cfg = dict(by_epoch=True, max_epochs=5, val_interval=1)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(logger=dict(interval=20))
