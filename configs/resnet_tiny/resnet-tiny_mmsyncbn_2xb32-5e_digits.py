# The main job in 5 epochs instead of 15 (a quick check; about a third of the
# time): the same model and data, the cosine schedule ending at epoch 5.
# Shortening the 15-epoch config with train_cfg.max_epochs=5 alone would stop
# a schedule that decays to 0 at epoch 15 a third of the way down.
#   tools/dist_train.sh configs/resnet_tiny/resnet-tiny_mmsyncbn_2xb32-5e_digits.py 2  # noqa: E501
_base_ = ['./resnet-tiny_mmsyncbn_2xb32-15e_digits.py']

train_cfg = dict(max_epochs=5)
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.1,
        by_epoch=True,
        begin=0,
        end=1,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        by_epoch=True,
        begin=1,
        end=5,
        convert_to_iter_based=True),
]
