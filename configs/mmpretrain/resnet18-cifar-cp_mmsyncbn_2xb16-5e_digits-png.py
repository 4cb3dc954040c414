# The example of resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py with
# activation checkpointing (with_cp=True): each basic block's forward runs
# again in backward, and MMSyncBN reuses the first forward's statistics (no
# second collective, no second running-stat update), so training is that of
# the config without it, at less memory.
#   bash $MMPRETRAIN/.mim/tools/dist_train.sh configs/mmpretrain/resnet18-cifar-cp_mmsyncbn_2xb16-5e_digits-png.py 2  # noqa: E501
_base_ = ['./resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py']

model = dict(backbone=dict(with_cp=True))
