# The main job: 2 processes x 32 digits, norm layers synchronized by MMSyncBN.
# stats_mode='N' weighs each rank by its sample count, so the statistics are
# those of the global batch of 64 even when the last batch splits unevenly:
# training equals resnet-tiny_bn_1xb64-15e_digits.py in one process.
#   tools/dist_train.sh configs/resnet_tiny/resnet-tiny_mmsyncbn_2xb32-15e_digits.py 2  # noqa: E501
_base_ = [
    '../_base_/models/resnet_tiny.py', '../_base_/datasets/digits_bs32.py',
    '../_base_/schedules/sgd_15e.py', '../_base_/default_runtime.py'
]

model = dict(norm_cfg=dict(type='MMSyncBN', stats_mode='N'))
