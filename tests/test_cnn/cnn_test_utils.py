"""Helpers of tests/test_cnn: a toy model built from norm_cfg, gloo spawning.

The model and data set are registered in mmsync's MODELS and DATASETS as
'CnnTestToyNet' and 'CnnTestToyDataset', so configs refer to them as
``type='mmsync.CnnTestToyNet'``.
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from mmsync.cnn import build_norm_layer
from mmsync.registry import DATASETS, MODELS


class CnnTestToyNet(BaseModel):
    """Conv-norm-ReLU twice, global pooling and a linear classifier.

    Args:
        norm_cfg (dict): Config of both norm layers.
        channels (int): Width of the convolutions. Default: 4.
        num_classes (int): Outputs of the classifier. Default: 3.
        norm_eval (bool): Keep BatchNorm layers in eval mode while training,
            with the idiom of OpenMMLab backbones. Default: False.
    """

    def __init__(self,
                 norm_cfg: Dict,
                 channels: int = 4,
                 num_classes: int = 3,
                 norm_eval: bool = False,
                 data_preprocessor: Optional[Dict] = None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, channels, 1)
        self.add_module(self.norm1_name, norm1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, channels, 2)
        self.add_module(self.norm2_name, norm2)
        self.head = nn.Linear(channels, num_classes)

    @property
    def norms(self) -> List[nn.Module]:
        return [getattr(self, self.norm1_name), getattr(self, self.norm2_name)]

    def forward(self,
                inputs: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                mode: str = 'tensor'):
        norm1, norm2 = self.norms
        x = F.relu(norm1(self.conv1(inputs)))
        x = F.relu(norm2(self.conv2(x)))
        logits = self.head(x.mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        return logits

    def train(self, mode: bool = True) -> 'CnnTestToyNet':
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


MODELS.register_module(name='CnnTestToyNet', module=CnnTestToyNet, force=True)


def toy_batch(num: int, seed: int = 0, dtype=torch.float64) -> Dict:
    """A deterministic batch of ``num`` 3x5x5 images and labels in [0, 3)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num, 3, 5, 5, generator=gen, dtype=dtype) * 2 + 1
    labels = torch.randint(0, 3, (num, ), generator=gen)
    return dict(inputs=inputs, labels=labels)


class CnnTestToyDataset(Dataset):
    """The samples of ``toy_batch(num)`` in float32, as dicts."""

    def __init__(self, num: int = 4):
        self.batch = toy_batch(num, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.batch['labels'])

    def __getitem__(self, index: int) -> Dict:
        return {k: v[index] for k, v in self.batch.items()}


DATASETS.register_module(
    name='CnnTestToyDataset', module=CnnTestToyDataset, force=True)
