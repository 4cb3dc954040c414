"""A small ResNet classifier whose norm layers come from ``norm_cfg``."""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dist import all_reduce, get_world_size
from mmengine.model import BaseModel, BaseModule

from ..cnn import build_norm_layer
from ..registry import MODELS

DTYPES = ('float32', 'float64')


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution without bias (a norm layer follows)."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(BaseModule):
    """ResNet's basic block: two 3x3 convolutions and a shortcut.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the first convolution (and of the 1x1
            shortcut convolution, built when shape changes). Default: 1.
        norm_cfg (dict): Norm layer config. Default: dict(type='BN').
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 stride: int = 1,
                 norm_cfg: Dict = dict(type='BN')):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, out_channels, 1)
        self.add_module(self.norm1_name, norm1)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, out_channels, 2)
        self.add_module(self.norm2_name, norm2)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(
                    in_channels, out_channels, 1, stride=stride, bias=False),
                build_norm_layer(norm_cfg, out_channels)[1])

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + identity)


@MODELS.register_module()
class ResNetClassifier(BaseModel):
    """A small ResNet for small images, trained with cross entropy.

    A 3x3 stem, then one stage per entry of ``widths`` (the first keeps the
    resolution, each further one halves it), global average pooling and a
    linear head. The defaults have about 77k parameters.

    Its loss is exact under data parallelism with unequal batches: each rank
    back-propagates ``world_size / n * sum(its per-sample losses)`` where n
    is the global batch size, so the gradient averaged over ranks by
    DistributedDataParallel is the gradient of the global batch's mean loss,
    and the logged ``loss`` is that mean, the same on every rank.

    Args:
        num_classes (int): Classes. Default: 10.
        in_channels (int): Image channels. Default: 1.
        widths (Sequence[int]): Channels of each stage. Default: (32, 64).
        blocks (Sequence[int]): Basic blocks in each stage. Default: (1, 1).
        norm_cfg (dict): Config of every norm layer, e.g.
            ``dict(type='MMSyncBN', stats_mode='N')``.
            Default: dict(type='BN').
        dtype (str): 'float32' or 'float64' (for exactness checks); inputs
            are cast to it. Default: 'float32'.
        data_preprocessor (dict, optional): mmengine data preprocessor.
            Default: None, which moves the batch to the model's device.
        init_cfg (dict | list[dict], optional): mmengine init config.
            Default: None, torch's default initialization.
    """

    def __init__(self,
                 num_classes: int = 10,
                 in_channels: int = 1,
                 widths: Sequence[int] = (32, 64),
                 blocks: Sequence[int] = (1, 1),
                 norm_cfg: Dict = dict(type='BN'),
                 dtype: str = 'float32',
                 data_preprocessor: Optional[Dict] = None,
                 init_cfg: Optional[Union[Dict, List[Dict]]] = None):
        super().__init__(
            data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if len(widths) != len(blocks) or not widths:
            raise ValueError('widths and blocks must be non-empty and of the '
                             f'same length, got {widths} and {blocks}')
        if dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
        self.num_classes = num_classes
        self.stem = conv3x3(in_channels, widths[0])
        self.norm_name, norm = build_norm_layer(norm_cfg, widths[0])
        self.add_module(self.norm_name, norm)
        stages = []
        channels = widths[0]
        for i, (width, num_blocks) in enumerate(zip(widths, blocks)):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(channels, width, stride, norm_cfg))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        self.to(getattr(torch, dtype))

    def forward(self,
                inputs: torch.Tensor,
                data_samples: Optional[torch.Tensor] = None,
                mode: str = 'tensor') -> Union[torch.Tensor, Dict, List]:
        """Logits (``mode='tensor'``), losses ('loss') or predictions.

        Args:
            inputs (Tensor): Images of shape (N, C, H, W).
            data_samples (Tensor, optional): Labels of shape (N, ); needed
                by 'loss', copied into the predictions by 'predict'.
            mode (str): 'tensor', 'loss' or 'predict'. Default: 'tensor'.

        Returns:
            Tensor (N, num_classes) | dict[str, Tensor] | list[dict]: logits,
            ``dict(loss=...)``, or per sample
            ``dict(pred_label, pred_score, gt_label)``.
        """
        x = inputs.to(self.fc.weight.dtype)
        x = F.relu(getattr(self, self.norm_name)(self.stem(x)))
        x = self.stages(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if mode == 'tensor':
            return logits
        if mode == 'loss':
            return self.loss(logits, data_samples)
        if mode == 'predict':
            return self.predict(logits, data_samples)
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got "
                         f'{mode!r}')

    def loss(self, logits: torch.Tensor,
             labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """This rank's share of the global mean loss, and that mean.

        One all_reduce of two numbers gives the global sample count and loss
        sum; ranks may hold different batch sizes (the last batch of an
        epoch).

        Returns:
            dict[str, Tensor]: ``loss`` to back-propagate and ``batch_loss``
            (detached), the global batch's mean cross entropy.
        """
        loss_sum = F.cross_entropy(logits, labels, reduction='sum')
        totals = torch.stack([
            loss_sum.detach().double(),
            loss_sum.new_tensor(labels.numel(), dtype=torch.float64)
        ])
        world_size = get_world_size()
        if world_size > 1:
            all_reduce(totals)
        return dict(
            loss=loss_sum * (world_size / totals[1]).to(loss_sum.dtype),
            batch_loss=totals[0] / totals[1])

    def parse_losses(
        self, losses: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Back-propagate this rank's share; log the global batch mean."""
        return losses['loss'], OrderedDict(loss=losses['batch_loss'])

    def predict(self, logits: torch.Tensor,
                labels: Optional[torch.Tensor]) -> List[Dict]:
        """Per-sample predicted label, its softmax score and the label."""
        scores, preds = F.softmax(logits.detach().float(), dim=1).max(dim=1)
        return [
            dict(
                pred_label=int(preds[i]),
                pred_score=float(scores[i]),
                gt_label=None if labels is None else int(labels[i]))
            for i in range(len(preds))
        ]
