"""Helpers of tests/test_engine: a small mmengine model with BatchNorms and
deterministic data, as rank-sliced loaders."""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch.utils.data import DataLoader, Dataset


class ToyNet(BaseModel):
    """conv-BN-ReLU twice, global pooling and a linear classifier; BN is
    ``nn.BatchNorm2d`` or any class given."""

    def __init__(self, norm: type = nn.BatchNorm2d, channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.head = nn.Linear(channels, 3)

    @property
    def norms(self) -> Sequence[nn.Module]:
        return [self.bn1, self.bn2]

    def forward(self,
                inputs: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                mode: str = 'tensor'):
        x = F.relu(self.bn1(self.conv1(inputs)))
        x = F.relu(self.bn2(self.conv2(x)))
        logits = self.head(x.mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


def toy_batch(num: int, seed: int = 0, dtype=torch.float64) -> Dict:
    """``num`` deterministic 3x5x5 images (mean 1, std 2) and labels."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num, 3, 5, 5, generator=gen, dtype=dtype) * 2 + 1
    labels = torch.randint(0, 3, (num, ), generator=gen)
    return dict(inputs=inputs, labels=labels)


class Samples(Dataset):
    """The samples ``indices`` of ``batch`` as dicts."""

    def __init__(self, batch: Dict, indices: Sequence[int]):
        self.samples = [{k: v[i] for k, v in batch.items()} for i in indices]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict:
        return self.samples[index]


def rank_loader(batch: Dict, sizes: Sequence[int], iters: int,
                rank: int) -> DataLoader:
    """Rank ``rank``'s part of ``iters`` global batches: global batch i is
    ``sum(sizes)`` consecutive samples of ``batch``, of which each rank
    holds ``sizes[rank]``, in rank order."""
    total = sum(sizes)
    start = sum(sizes[:rank])
    indices = [
        i * total + start + j for i in range(iters) for j in range(sizes[rank])
    ]
    return DataLoader(Samples(batch, indices), batch_size=sizes[rank])
