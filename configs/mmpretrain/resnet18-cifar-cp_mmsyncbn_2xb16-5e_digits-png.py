# The example of resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py with
# activation checkpointing (with_cp=True): each basic block's forward runs
# again in backward, at less memory; the weights train as without it.
#   bash $MMPRETRAIN/.mim/tools/dist_train.sh configs/mmpretrain/resnet18-cifar-cp_mmsyncbn_2xb16-5e_digits-png.py 2  # noqa: E501
_base_ = ['./resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py']

model = dict(backbone=dict(with_cp=True))
