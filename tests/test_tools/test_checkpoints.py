"""Checkpoints from elsewhere cannot run code; checkpoints of mmsync load.

Crafted files (the ``getattr`` chain that reaches ``__import__``, a call of
``os.system``) are refused by ``load_checkpoint_file`` and, before anything
starts, by tools/train.py (``--resume``, ``load_from``) and tools/test.py,
with one line naming the global asked for and ``--trust-checkpoint``. The
checkpoints that mmsync's training writes, and those of an mmpretrain run
(where mmpretrain is installed), load without it, their log history intact.
"""
import os
import os.path as osp
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
from dist_utils import free_port
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint
from test_bad_input import check_one_line_error, dist_train
from tools_launch import REPO, SYNC_CONFIG, accuracies, base_env, python, run

from mmsync.engine import (CheckpointError, PreflightError, checkpoint_loading,
                           load_checkpoint_file)
from mmsync.engine.preflight import check_checkpoints

MMPRETRAIN_CONFIG = osp.join(REPO, 'configs', 'mmpretrain',
                             'resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py')


class _Reduce:
    """Pickles as ``func(*args)``: what a crafted checkpoint asks for."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def getattr_chain():
    """``getattr(getattr(getattr, '__self__'), '__import__')``."""
    return _Reduce(getattr, _Reduce(getattr, getattr, '__self__'),
                   '__import__')


def write_crafted(tmp_path, name, payload):
    path = tmp_path / name
    torch.save(dict(state_dict={}, meta=dict(epoch=1), payload=payload), path)
    return str(path)


@pytest.fixture
def marker(tmp_path):
    """A file that the crafted ``os.system`` call would create."""
    return tmp_path / 'code_ran'


def crafted_files(tmp_path, marker):
    return {
        'getattr chain': (write_crafted(tmp_path, 'getattr.pth',
                                        getattr_chain()),
                          "builtins.getattr(getattr, '__self__')"),
        'os.system':
        (write_crafted(tmp_path, 'system.pth',
                       _Reduce(os.system, f'touch {marker}')), 'posix.system'),
    }


@pytest.mark.parametrize('kind', ['getattr chain', 'os.system'])
def test_crafted_checkpoint_is_refused(tmp_path, marker, kind):
    path, asked = crafted_files(tmp_path, marker)[kind]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert f'asks for the global {asked}' in message
    assert '--trust-checkpoint' in message and path in message
    assert len(message.splitlines()) == 1
    # mmengine's own loading (resume, load_from) runs under the same rules.
    with checkpoint_loading(), pytest.raises(Exception, match='getattr|posix'):
        torch.load(path)
    assert not marker.exists()


@pytest.mark.parametrize('kind', ['getattr chain', 'os.system'])
@pytest.mark.parametrize('setting', ['--resume', 'load_from'])
def test_train_refuses_crafted_checkpoint(tmp_path, marker, kind, setting):
    """One line before any process starts; nothing written, no code run."""
    path, asked = crafted_files(tmp_path, marker)[kind]
    work_dir = tmp_path / 'work'
    option = (['--resume', path] if setting == '--resume' else
              ['--cfg-options', f'load_from={path}'])
    check_one_line_error([
        'bash', 'tools/dist_train.sh', SYNC_CONFIG, '2', '--work-dir',
        str(work_dir), *option
    ], work_dir, f'{setting}: checkpoint', f'asks for the global {asked}',
                         '--trust-checkpoint')
    assert not marker.exists()


def test_test_py_refuses_crafted_checkpoint(tmp_path, marker):
    path, _ = crafted_files(tmp_path, marker)['getattr chain']
    check_one_line_error(
        python('test.py', SYNC_CONFIG, path), tmp_path / 'work', 'refused',
        "builtins.getattr(getattr, '__self__')", '--trust-checkpoint')


@pytest.fixture
def served(tmp_path, monkeypatch):
    """``tmp_path`` served over http on 127.0.0.1 (a free port) by
    ``python -m http.server``; downloads cached under ``tmp_path``."""
    port = free_port()
    server = subprocess.Popen([
        sys.executable, '-m', 'http.server',
        str(port), '--bind', '127.0.0.1', '--directory',
        str(tmp_path)
    ],
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, 'http.server not up'
                time.sleep(0.1)
        monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
        yield f'http://127.0.0.1:{port}'
    finally:
        server.kill()
        server.wait()


def test_remote_crafted_checkpoint_is_refused(served, tmp_path, marker):
    """Review finding 7: ``load_from='http://...'`` ran a crafted pickle's
    code (mmengine downloads it through torch.hub with weights_only=False)
    and the pre-flight skipped it. Downloaded to the cache, it is loaded
    under the same allow-list as a local file, by our loader, mmengine's
    (what the runner calls for any ``://`` path) and the pre-flight."""
    write_crafted(tmp_path, 'system.pth', _Reduce(os.system,
                                                  f'touch {marker}'))
    url = f'{served}/system.pth'
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(url)
    message = str(info.value)
    assert 'asks for the global posix.system' in message
    assert url in message and '--trust-checkpoint' in message
    assert len(message.splitlines()) == 1
    assert not marker.exists()
    write_crafted(tmp_path, 'other.pth', _Reduce(os.system, f'touch {marker}'))
    with checkpoint_loading(), pytest.raises(Exception, match='posix'):
        _load_checkpoint(f'{served}/other.pth', map_location='cpu')
    assert not marker.exists()
    cfg = Config(dict(load_from=url, work_dir=str(tmp_path / 'work')))
    with pytest.raises(PreflightError, match='load_from: checkpoint.*posix'):
        check_checkpoints(cfg)
    assert not marker.exists()


def test_remote_checkpoint_loads_from_the_cache(served, tmp_path):
    """A checkpoint of weights over http loads, once downloaded."""
    torch.save(dict(state_dict=dict(w=torch.arange(3.))), tmp_path / 'w.pth')
    loaded = load_checkpoint_file(f'{served}/w.pth')
    assert torch.equal(loaded['state_dict']['w'], torch.arange(3.))
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'w.pth'
    assert cached.is_file()
    # What MMSyncRunner.load_checkpoint runs for a URL.
    with checkpoint_loading():
        again = _load_checkpoint(f'{served}/w.pth', map_location='cpu')
    assert torch.equal(again['state_dict']['w'], torch.arange(3.))
    with pytest.raises(CheckpointError, match='cannot be downloaded'):
        load_checkpoint_file(f'{served}/missing.pth')


def test_train_refuses_remote_crafted_checkpoint(served, tmp_path, marker):
    """The review's repro: tools/dist_train.sh with
    ``--cfg-options load_from=http://...`` fails in one line before any
    process starts, and the code does not run."""
    write_crafted(tmp_path, 'system.pth', _Reduce(os.system,
                                                  f'touch {marker}'))
    work_dir = tmp_path / 'work'
    check_one_line_error(
        dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir),
                   '--cfg-options', f'load_from={served}/system.pth'),
        work_dir,
        'load_from: checkpoint',
        'asks for the global posix.system',
        '--trust-checkpoint',
        env=base_env(TORCH_HOME=str(tmp_path / 'torch_home')))
    assert not marker.exists()


def test_trust_checkpoint_loads_what_is_refused(runs, tmp_path):
    """A checkpoint with a global outside the allow-list (a path object in
    its meta) is refused by default and loads with --trust-checkpoint."""
    checkpoint = torch.load(
        os.path.join(runs.sync_2proc(), 'epoch_2.pth'),
        map_location='cpu',
        weights_only=False)
    checkpoint['meta']['data_root'] = pathlib.PurePosixPath('/data/digits')
    path = str(tmp_path / 'with_path.pth')
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match='pathlib.PurePosixPath'):
        load_checkpoint_file(path)
    loaded = load_checkpoint_file(path, trust=True)
    assert loaded['meta']['data_root'] == checkpoint['meta']['data_root']
    result = run(
        python('test.py', SYNC_CONFIG, path, '--trust-checkpoint'),
        timeout=120)
    top1 = accuracies(runs.sync_2proc())[-1]
    assert f'accuracy/top1: {top1:.4f}' in result.stdout


def test_mmsync_checkpoint_loads_with_its_log_history(runs):
    """mmengine pickles HistoryBuffer's statistics methods as getattr calls;
    they load through the narrow stand-in, and the history is intact."""
    loaded = load_checkpoint_file(
        os.path.join(runs.sync_2proc(), 'epoch_2.pth'))
    full = torch.load(
        os.path.join(runs.sync_2proc(), 'epoch_2.pth'),
        map_location='cpu',
        weights_only=False)
    scalars = loaded['message_hub']['log_scalars']
    assert scalars and all(
        isinstance(buffer, HistoryBuffer) for buffer in scalars.values())
    for key, buffer in scalars.items():
        want = full['message_hub']['log_scalars'][key]
        for got, expected in zip(buffer.data, want.data):
            assert (got == expected).all(), key
        assert buffer.statistics('mean') == want.statistics('mean')
    assert set(HistoryBuffer._statistics_methods) >= {
        'min', 'max', 'current', 'mean'
    }
    for key, value in full['state_dict'].items():
        assert torch.equal(loaded['state_dict'][key], value), key


def test_mmpretrain_checkpoint_loads(tmp_path):
    """A checkpoint of an mmpretrain run (its ResNet-18, runtime and data
    set through tools/dist_train.sh, one epoch) loads without trust."""
    pytest.importorskip('mmpretrain.models', reason='needs mmpretrain')
    data = str(tmp_path / 'digits_png')
    run([sys.executable, 'tools/misc/digits_to_images.py', data], timeout=300)
    work_dir = tmp_path / 'work'
    run([
        'bash', 'tools/dist_train.sh', MMPRETRAIN_CONFIG, '2', '--work-dir',
        str(work_dir), '--cfg-options',
        f'train_dataloader.dataset.data_root={data}',
        f'val_dataloader.dataset.data_root={data}',
        f'test_dataloader.dataset.data_root={data}', 'train_cfg.max_epochs=1',
        'param_scheduler.T_max=1'
    ],
        timeout=1200,
        env=base_env(CUDA_VISIBLE_DEVICES=''))
    loaded = load_checkpoint_file(str(work_dir / 'epoch_1.pth'))
    assert loaded['meta']['epoch'] == 1
    assert 'dataset_meta' in loaded['meta']
    assert all(
        isinstance(buffer, HistoryBuffer)
        for buffer in loaded['message_hub']['log_scalars'].values())
