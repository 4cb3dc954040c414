# scikit-learn's handwritten digits, shipped with mmsync: 1437 train and 360
# val images of 8x8 pixels, 10 classes. batch_size is per process.
dataset_type = 'DigitsDataset'

train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    # round_up=False: every sample once per epoch and none repeated, so W
    # processes with batch B take the global batches of one process with
    # batch W*B (rank r holds positions r, r+W, ... of the shuffled order).
    sampler=dict(type='DefaultSampler', shuffle=True, round_up=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type=dataset_type, split='train'))

val_dataloader = dict(
    batch_size=128,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type=dataset_type, split='val'))
val_evaluator = dict(type='Accuracy')

test_dataloader = val_dataloader
test_evaluator = val_evaluator
