"""Handwritten digits (8x8, 10 classes) shipped with mmsync as ``digits.npz``.

The images are scikit-learn's ``load_digits`` (1797 samples, pixel values
0..16, UCI's optical recognition of handwritten digits), stored once with a
fixed stratified split of 1437 training and 360 validation samples, so
training needs no download and no scikit-learn.
"""
import os.path as osp
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import DATASETS

DIGITS_FILE = osp.join(osp.dirname(__file__), 'digits.npz')
SPLITS = ('train', 'val')


def write_digits_npz(path: str, num_val: int = 360, seed: int = 0) -> None:
    """Write scikit-learn's digits and a stratified split to ``path``.

    This made ``digits.npz``; it needs scikit-learn, the data set does not.

    Args:
        path (str): The .npz file to write.
        num_val (int): Validation samples, stratified by class. Default: 360.
        seed (int): Seed of the split. Default: 0.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(
        np.arange(len(digits.target)),
        test_size=num_val,
        stratify=digits.target,
        random_state=seed)
    np.savez_compressed(
        path,
        images=digits.images.astype(np.uint8),
        labels=digits.target.astype(np.uint8),
        train_idx=np.sort(train_idx).astype(np.int16),
        val_idx=np.sort(val_idx).astype(np.int16))


@DATASETS.register_module()
class DigitsDataset(Dataset):
    """The shipped digits split as (1, 8, 8) float images in [0, 1].

    An item is ``dict(inputs=Tensor(1, 8, 8) float32, data_samples=Tensor()
    int64 label)``; collate with ``default_collate``.

    Args:
        split (str): 'train' (1437 samples) or 'val' (360). Default: 'train'.
        indices (int | Sequence[int], optional): Keep only these positions of
            the split; an int keeps the first ``indices``. Default: None.
        data_file (str, optional): Another .npz in the same format.
            Default: None, the shipped ``digits.npz``.
    """

    METAINFO = dict(classes=tuple(str(i) for i in range(10)))

    def __init__(self,
                 split: str = 'train',
                 indices: Optional[Union[int, Sequence[int]]] = None,
                 data_file: Optional[str] = None):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        data_file = data_file or DIGITS_FILE
        with np.load(data_file) as data:
            missing = [
                key for key in ('images', 'labels', f'{split}_idx')
                if key not in data.files
            ]
            if missing:
                raise KeyError(f'data_file {data_file!r} has no '
                               f'{", ".join(missing)} array(s): a digits '
                               'file holds images, labels, train_idx and '
                               'val_idx')
            order = data[f'{split}_idx'].astype(np.int64)
            if isinstance(indices, int):
                if not 0 < indices <= len(order):
                    raise ValueError(
                        f'indices={indices} must be in [1, {len(order)}], '
                        f'the size of the {split!r} split')
                order = order[:indices]
            elif indices is not None:
                order = order[np.asarray(indices, dtype=np.int64)]
            images = data['images'][order]
            labels = data['labels'][order]
        self.split = split
        self.images = torch.from_numpy(images).float().div_(16).unsqueeze(1)
        self.labels = torch.from_numpy(labels).long()

    @property
    def metainfo(self) -> Dict:
        """Class names, read by mmengine's evaluator."""
        return dict(self.METAINFO)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return dict(inputs=self.images[idx], data_samples=self.labels[idx])
