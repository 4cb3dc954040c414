# The single-process reference of the MMSyncBN config: one process, plain BN,
# batch 64, the same samples per step as 2 processes x 32.
#   python tools/train.py configs/resnet_tiny/resnet-tiny_bn_1xb64-15e_digits.py  # noqa: E501
_base_ = [
    '../_base_/models/resnet_tiny.py', '../_base_/datasets/digits_bs32.py',
    '../_base_/schedules/sgd_15e.py', '../_base_/default_runtime.py'
]

train_dataloader = dict(batch_size=64)
