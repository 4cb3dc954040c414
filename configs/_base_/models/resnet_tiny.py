# A ResNet for 8x8 images: 3x3 stem, a basic block at 32 channels, one at 64
# (stride 2), global pooling, linear head; about 77k parameters.
norm_cfg = dict(type='BN')
model = dict(
    type='ResNetClassifier',
    num_classes=10,
    in_channels=1,
    widths=(32, 64),
    blocks=(1, 1),
    norm_cfg=norm_cfg)
