"""Bad input ends in one line on stderr that says what to do, exit status 2,
no traceback, and nothing written to the work dir (checked before any
process group, logger or work dir exists)."""
import os

import pytest
import torch
from tools_launch import SYNC_CONFIG, base_env, python, run

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
