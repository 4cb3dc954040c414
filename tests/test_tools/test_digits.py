"""The shipped digits data set, its split, the metric and the rank split."""
from unittest import mock

import numpy as np
import pytest
import torch
from mmengine.dataset import DefaultSampler
from mmengine.evaluator import Evaluator
from torch.utils.data import DataLoader

from mmsync.datasets import DigitsDataset, max_even_world_size, steps_per_rank
from mmsync.datasets.digits import DIGITS_FILE
from mmsync.registry import DATASETS


@pytest.fixture(scope='module')
def shipped():
    with np.load(DIGITS_FILE) as data:
        return {key: data[key] for key in data.files}


def test_shipped_file_is_sklearn_digits(shipped):
    sklearn_datasets = pytest.importorskip('sklearn.datasets')
    digits = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(shipped['images'], digits.images)
    np.testing.assert_array_equal(shipped['labels'], digits.target)


def test_split_is_fixed_disjoint_and_stratified(shipped):
    train, val = shipped['train_idx'], shipped['val_idx']
    assert (len(train), len(val)) == (1437, 360)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(1797))
    counts = np.bincount(shipped['labels'], minlength=10)
    val_counts = np.bincount(shipped['labels'][val], minlength=10)
    assert np.all(np.abs(val_counts - counts * 360 / 1797) <= 1)


def test_items(shipped):
    dataset = DATASETS.build(dict(type='mmsync.DigitsDataset', split='val'))
    assert len(dataset) == 360
    item = dataset[5]
    assert item['inputs'].shape == (1, 8, 8)
    assert item['inputs'].dtype == torch.float32
    idx = shipped['val_idx'][5]
    np.testing.assert_array_equal(item['inputs'][0].numpy() * 16,
                                  shipped['images'][idx])
    assert int(item['data_samples']) == shipped['labels'][idx]
    assert dataset.metainfo['classes'] == tuple('0123456789')


def test_indices(shipped):
    first = DigitsDataset(indices=333)
    assert len(first) == 333
    torch.testing.assert_close(first[332]['inputs'],
                               DigitsDataset()[332]['inputs'])
    picked = DigitsDataset(split='val', indices=[3, 1])
    assert int(
        picked[0]['data_samples']) == shipped['labels'][shipped['val_idx'][3]]


@pytest.mark.parametrize('kwargs,match', [
    (dict(split='test'), 'split must be one of'),
    (dict(indices=0), r'indices=0 must be in \[1, 1437\]'),
    (dict(split='val', indices=361), r'must be in \[1, 360\]'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataset(**kwargs)


@pytest.mark.parametrize('num_samples', [1, 7, 64, 65, 333, 1437])
@pytest.mark.parametrize('world_size', [1, 2, 3, 8])
@pytest.mark.parametrize('batch_size', [1, 8, 32])
@pytest.mark.parametrize('drop_last', [False, True])
@pytest.mark.parametrize('round_up', [False, True])
def test_steps_per_rank_match_sampler_and_loader(num_samples, world_size,
                                                 batch_size, drop_last,
                                                 round_up):
    """The oracle: mmengine's DefaultSampler and torch's DataLoader."""
    dataset = list(range(num_samples))
    steps = []
    for rank in range(world_size):
        with mock.patch(
                'mmengine.dataset.sampler.get_dist_info',
                return_value=(rank, world_size)):
            sampler = DefaultSampler(
                dataset, shuffle=True, seed=0, round_up=round_up)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last)
        steps.append(sum(1 for _ in loader))
    assert steps_per_rank(num_samples, world_size, batch_size, drop_last,
                          round_up) == steps


@pytest.mark.parametrize('num_samples', [1, 5, 65, 333, 1437])
@pytest.mark.parametrize('batch_size', [1, 8, 32])
@pytest.mark.parametrize('drop_last', [False, True])
@pytest.mark.parametrize('round_up', [False, True])
def test_max_even_world_size(num_samples, batch_size, drop_last, round_up):
    """Against a search over every world size with all ranks' steps."""
    for world_size in (1, 2, 3, 7, 40):
        even = [
            n for n in range(1, world_size + 1) if len(
                set(
                    steps_per_rank(num_samples, n, batch_size, drop_last,
                                   round_up))) == 1
            and steps_per_rank(num_samples, n, batch_size, drop_last,
                               round_up)[0] > 0
        ]
        assert max_even_world_size(num_samples, world_size, batch_size,
                                   drop_last, round_up) == max(
                                       even, default=0)


def test_accuracy_metric():
    preds = [3, 1, 4, 1, 5, 9, 2, 6]
    labels = [3, 1, 4, 0, 5, 9, 0, 6]
    evaluator = Evaluator(dict(type='mmsync.Accuracy'))
    for start in (0, 4):
        evaluator.process([
            dict(pred_label=p, gt_label=g)
            for p, g in zip(preds[start:start + 4], labels[start:start + 4])
        ])
    expected = 100.0 * np.mean(np.array(preds) == np.array(labels))
    assert evaluator.evaluate(8) == {'accuracy/top1': expected}
