"""Helpers of tests/test_cnn: a toy model built from norm_cfg, gloo spawning.

The model and data set are registered in mmsync's MODELS and DATASETS as
'CnnTestToyNet' and 'CnnTestToyDataset', so configs refer to them as
``type='mmsync.CnnTestToyNet'``.
"""
import datetime
import io
import multiprocessing
import os
import queue
import socket
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from mmsync.cnn import build_norm_layer
from mmsync.registry import DATASETS, MODELS

PG_TIMEOUT = datetime.timedelta(seconds=60)


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
            results) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size))
        dist.init_process_group(
            'gloo', rank=rank, world_size=world_size, timeout=PG_TIMEOUT)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


def run_distributed(fn: Callable,
                    world_size: int = 2,
                    args: tuple = (),
                    timeout: float = 120.) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in spawned gloo processes.

    Args:
        fn (callable): A module-level function; its return value must be
            loadable by ``torch.load`` (tensors, dicts, lists, numbers).
        world_size (int): Number of processes. Default: 2.
        args (tuple): Further arguments of ``fn``. Default: ().
        timeout (float): Seconds for all ranks to finish; then they are
            killed and the test fails. Default: 120.

    Returns:
        list: The return value of each rank, by rank.
    """
    ctx = multiprocessing.get_context('spawn')
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, results),
            daemon=True) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: Dict[int, Any] = {}
    errors = []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(outputs) + len(errors) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, payload, error = results.get(timeout=max(left, 0.1))
            except queue.Empty:
                raise AssertionError(
                    f'distributed run of {fn.__name__} timed out after '
                    f'{timeout}s with ranks {sorted(outputs)} done and '
                    f'errors {errors}') from None
            if error is not None:
                errors.append(f'rank {rank}:\n{error}')
                # The other ranks may now wait on a collective until the
                # process group times out; fail now instead.
                break
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    if errors:
        raise AssertionError('\n'.join(errors))
    return [outputs[rank] for rank in range(world_size)]
