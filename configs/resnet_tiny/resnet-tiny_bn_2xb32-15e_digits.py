# For comparison: 2 processes x 32 with plain BN, so each process normalizes
# with the statistics of its own 32 samples only.
#   tools/dist_train.sh configs/resnet_tiny/resnet-tiny_bn_2xb32-15e_digits.py 2  # noqa: E501
_base_ = [
    '../_base_/models/resnet_tiny.py', '../_base_/datasets/digits_bs32.py',
    '../_base_/schedules/sgd_15e.py', '../_base_/default_runtime.py'
]
