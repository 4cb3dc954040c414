"""Bad input ends in one line on stderr that says what to do, exit status 2,
no traceback, and nothing written to the work dir (checked before any
process group, logger or work dir exists): the config, the launch, the work
dir, the model's sub-groups, every data split it uses and the checkpoint to
resume."""
import os

import numpy as np
import pytest
import torch
from tools_launch import SYNC_CONFIG, base_env, python, run

from mmsync.datasets.digits import DIGITS_FILE

TORCHRUN_VARS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                 'MASTER_PORT')


def check_one_line_error(cmd, work_dir, *expected, env=None):
    """Run ``cmd``; it must fail cleanly and leave ``work_dir`` as it was."""
    work_dir.mkdir()
    (work_dir / 'earlier_run.txt').write_text('kept')
    result = run(cmd, timeout=120, env=env, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert ': error: ' in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert sorted(os.listdir(work_dir)) == ['earlier_run.txt']
    return lines[0]


def dist_train(*args):
    return ['bash', 'tools/dist_train.sh', *args]


@pytest.mark.parametrize('launch', ['python', 'dist_train'])
def test_missing_config(tmp_path, launch):
    work_dir = tmp_path / 'work'
    args = ['configs/no_such_config.py', '--work-dir', str(work_dir)]
    cmd = (
        python('train.py', *args) if launch == 'python' else dist_train(
            args[0], '2', *args[1:]))
    check_one_line_error(cmd, work_dir, "'configs/no_such_config.py' not "
                         'found', 'pass the path of a .py config')


def test_unknown_norm_type(tmp_path):
    work_dir = tmp_path / 'work'
    check_one_line_error(
        dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir),
                   '--cfg-options', 'model.norm_cfg.type=FancyBN'), work_dir,
        "Unknown norm layer type 'FancyBN'", 'Registered norm layers:',
        'MMSyncBN')


def test_pytorch_launcher_without_torchrun(tmp_path):
    work_dir = tmp_path / 'work'
    env = base_env()
    for name in TORCHRUN_VARS:
        env.pop(name, None)
    check_one_line_error(
        python('train.py', SYNC_CONFIG, '--launcher', 'pytorch', '--work-dir',
               str(work_dir)),
        work_dir,
        '--launcher pytorch needs',
        'RANK',
        'tools/dist_train.sh CONFIG NPROC',
        env=env)


def test_more_processes_than_samples(tmp_path):
    """1437 samples cannot feed 2000 processes; caught before torchrun."""
    work_dir = tmp_path / 'work'
    check_one_line_error(
        dist_train(SYNC_CONFIG, '2000', '--work-dir', str(work_dir)), work_dir,
        '2000 processes do not fit this train set', 'use 1437 processes')


def test_last_batch_leaving_a_rank_without_a_step(tmp_path):
    """65 samples in batches of 32 on 2 ranks: rank 0 gets 33 samples (2
    steps), rank 1 gets 32 (1 step), and would leave rank 0 hanging."""
    work_dir = tmp_path / 'work'
    check_one_line_error(
        dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir),
                   '--cfg-options', 'train_dataloader.dataset.indices=65'),
        work_dir, 'rank 0 2 step(s) per epoch but rank 1 1', 'use 1 processes')


@pytest.mark.parametrize('nproc,expected', [('two', 'NPROC must be'),
                                            ('0', 'NPROC must be')])
def test_bad_nproc(tmp_path, nproc, expected):
    work_dir = tmp_path / 'work'
    check_one_line_error(
        dist_train(SYNC_CONFIG, nproc, '--work-dir', str(work_dir)), work_dir,
        expected)


def test_resume_from_missing_checkpoint(tmp_path):
    work_dir = tmp_path / 'work'
    check_one_line_error(
        python('train.py', SYNC_CONFIG,
               '--work-dir', str(work_dir), '--resume',
               str(tmp_path / 'nope.pth')), work_dir, '--resume: checkpoint',
        'not found')


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available')
def test_amp_without_cuda(tmp_path):
    work_dir = tmp_path / 'work'
    check_one_line_error(
        python('train.py', SYNC_CONFIG, '--work-dir', str(work_dir), '--amp'),
        work_dir, '--amp needs CUDA')


def test_test_py_missing_checkpoint(tmp_path):
    work_dir = tmp_path / 'work'
    check_one_line_error(
        python('test.py', SYNC_CONFIG, str(tmp_path / 'nope.pth')), work_dir,
        'checkpoint file', 'not found')


def digits_file(path, drop=(), **change):
    """A copy of the shipped digits .npz without ``drop``, with ``change``."""
    with np.load(DIGITS_FILE) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    for key, fn in change.items():
        arrays[key] = fn(arrays[key])
    np.savez(path, **arrays)
    return str(path)


def with_label(split, value):
    """Labels with ``value`` for the first sample of ``split``."""

    def change(labels):
        labels = labels.copy()
        labels[np.load(DIGITS_FILE)[f'{split}_idx'][0]] = value
        return labels

    return change


@pytest.mark.parametrize('case', [
    'group_size', 'val file missing', 'val split missing', 'image shape',
    'label range', 'val label range'
])
def test_preflight_of_config_and_data(tmp_path, case):
    """Each caught by dist_train.sh's pre-flight, before torchrun starts."""
    data = tmp_path / 'digits.npz'
    option = {
        'group_size':
        lambda: 'model.norm_cfg.group_size=3',
        'val file missing':
        lambda: f'val_dataloader.dataset.data_file={data}',
        'val split missing':
        lambda: 'val_dataloader.dataset.data_file=' + digits_file(
            data, drop=('val_idx', )),
        'image shape':
        lambda: 'train_dataloader.dataset.data_file=' + digits_file(
            data, images=lambda x: np.repeat(x[..., None], 3, -1)),
        'label range':
        lambda: 'train_dataloader.dataset.data_file=' + digits_file(
            data, labels=with_label('train', 12)),
        'val label range':
        lambda: 'val_dataloader.dataset.data_file=' + digits_file(
            data, labels=with_label('val', 10)),
    }[case]()
    expected = {
        'group_size': ('model.norm_cfg.group_size=3 must divide the world '
                       'size 2', 'use one of [1, 2]'),
        'val file missing':
        ('cannot build val_dataloader.dataset', 'No such file'),
        'val split missing':
        ('cannot build val_dataloader.dataset', 'has no val_idx array'),
        'image shape': ('train_dataloader: its first batch does not go '
                        'through the model', '[32, 1, 8, 8, 3]'),
        'label range': ('train_dataloader.dataset: labels must be in 0..9',
                        "model's 10 classes", 'got 12 for sample 0'),
        'val label range': ('val_dataloader.dataset: labels must be in 0..9',
                            'got 10 for sample 0'),
    }[case]
    work_dir = tmp_path / 'work'
    check_one_line_error(
        dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir),
                   '--cfg-options', option), work_dir, *expected)


def test_work_dir_under_a_file(tmp_path):
    (tmp_path / 'a_file').write_text('')
    work_dir = tmp_path / 'a_file' / 'work'
    result = run(
        dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir)),
        timeout=120,
        check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"train.py: error: work dir '{work_dir}' cannot be made: "
        f"'{tmp_path / 'a_file'}' is a file, not a folder; pass another "
        '--work-dir')


@pytest.mark.skipif(
    os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_work_dir(tmp_path):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    work_dir.chmod(0o555)
    try:
        result = run(
            dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir)),
            timeout=120,
            check=False)
    finally:
        work_dir.chmod(0o755)
    assert result.returncode == 2
    assert 'is not writable' in result.stderr
    assert os.listdir(work_dir) == []


@pytest.mark.parametrize('damage', ['truncated', 'empty'])
def test_resume_from_unreadable_checkpoint(tmp_path, damage):
    """A named checkpoint that cannot be loaded: its path and why."""
    checkpoint = tmp_path / 'epoch_3.pth'
    torch.save(dict(state_dict=dict(w=torch.zeros(1000))), checkpoint)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) //
                                2] if damage == 'truncated' else b'')
    work_dir = tmp_path / 'work'
    why = ('failed finding central directory'
           if damage == 'truncated' else 'is empty (0 bytes)')
    check_one_line_error(
        dist_train(SYNC_CONFIG, '2', '--work-dir', str(work_dir), '--resume',
                   str(checkpoint)), work_dir,
        f"--resume: checkpoint '{checkpoint}'", why)
