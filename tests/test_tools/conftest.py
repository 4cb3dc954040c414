"""Training runs shared by the tests of tools/: each launched once."""
import os.path as osp
from typing import Callable, Dict, Optional

import pytest
import torch
from tools_launch import (BN_1X_CONFIG, SYNC_CONFIG, base_env, free_port,
                          python, run, short_run_options)

needs_2_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason='needs 2 CUDA devices (one per process)')
DEVICES = ('cpu', pytest.param('cuda', marks=needs_2_gpus))


def device_env(device: str, **extra: str) -> Dict[str, str]:
    """The launch environment; 'cpu' hides any GPU from tools/train.py."""
    if device == 'cpu':
        extra['CUDA_VISIBLE_DEVICES'] = ''
    return base_env(**extra)


class Runs:
    """Work dirs of short training runs, each trained on first use."""

    def __init__(self, root: str):
        self.root = root
        self.done: Dict[str, Optional[str]] = {}

    def _get(self, name: str, train: Callable[[str], None]) -> str:
        if name not in self.done:
            self.done[name] = None  # stays None if training fails
            work_dir = osp.join(self.root, name)
            train(work_dir)
            self.done[name] = work_dir
        if self.done[name] is None:
            pytest.fail(f'the shared run {name} failed in an earlier test')
        return self.done[name]

    def sync_2proc(self, dtype: str = 'float64', device: str = 'cpu') -> str:
        """MMSyncBN, 2 processes x 8, with tools/dist_train.sh (torchrun)."""

        def train(work_dir):
            run([
                'bash', 'tools/dist_train.sh', SYNC_CONFIG, '2', '--work-dir',
                work_dir, *short_run_options(dtype, 8)
            ],
                env=device_env(device, PORT=str(free_port())))

        return self._get(f'sync_2proc_{dtype}_{device}', train)

    def bn_1proc(self, dtype: str = 'float64', device: str = 'cpu') -> str:
        """Plain BN, 1 process x 16, with tools/train.py."""

        def train(work_dir):
            run(python('train.py', BN_1X_CONFIG, '--work-dir', work_dir,
                       *short_run_options(dtype, 16)),
                env=device_env(device))

        return self._get(f'bn_1proc_{dtype}_{device}', train)


@pytest.fixture(scope='session')
def runs(tmp_path_factory) -> Runs:
    """The shared short runs (see tools_launch.short_run_options)."""
    return Runs(str(tmp_path_factory.mktemp('runs')))
