"""mmpretrain's own packaged launchers on mmsync's example configs, on CPU.

``mmpretrain/.mim/tools/dist_train.sh`` (torch.distributed.launch, 2
processes) and ``tools/test.py``, unchanged, on
configs/mmpretrain/resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py as it is
(but for the data folder and a short schedule): what MMSyncRunner gives from
the config's ``runner_type`` alone. A run of 3 epochs on half of the digits
is shared by the tests (every other image). Needs mmpretrain (the second
environment, .ci/cuda_env.sh).
"""
import os
import os.path as osp
import re
import shutil
import sys

import pytest
import torch

mmpretrain = pytest.importorskip(
    'mmpretrain.models',
    reason='needs mmpretrain (the second environment, .ci/cuda_env.sh)')
sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'test_tools'))
from test_checkpoints import getattr_chain  # noqa: E402
from tools_launch import copy_with_newer_best  # noqa: E402
from tools_launch import start  # noqa: E402
from tools_launch import REPO, accuracies, base_env, finish, free_port, scalars

import mmsync  # noqa: E402
from mmsync.engine import load_checkpoint_file  # noqa: E402

MIM_TOOLS = osp.join(
    osp.dirname(osp.dirname(osp.abspath(mmpretrain.__file__))), '.mim',
    'tools')
CONFIG = osp.join(REPO, 'configs', 'mmpretrain',
                  'resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py')
CP_CONFIG = osp.join(REPO, 'configs', 'mmpretrain',
                     'resnet18-cifar-cp_mmsyncbn_2xb16-5e_digits-png.py')
# Every other image of the train set (CustomDataset lists them class by
# class): 719 images, all classes, 23 steps per epoch at 2 x 16.
SAMPLES = list(range(0, 1437, 2))
STEPS = 23
EPOCHS = 3


def launch_env(**extra):
    """GPUs hidden, this interpreter's ``python`` first on the PATH (the
    scripts run ``python -m torch.distributed.launch``), a free PORT."""
    env = base_env(
        CUDA_VISIBLE_DEVICES='', MKL_NUM_THREADS='1', PORT=str(free_port()))
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    env.update(extra)
    return env


def data_options(data, *extra):
    return [
        '--cfg-options', f'train_dataloader.dataset.data_root={data}',
        f'val_dataloader.dataset.data_root={data}',
        f'test_dataloader.dataset.data_root={data}',
        f'train_dataloader.dataset.indices={SAMPLES}'.replace(' ', ''),
        f'param_scheduler.T_max={EPOCHS}', 'randomness.seed=0', *extra
    ]


def dist_train(config, work_dir, data, *args, epochs=EPOCHS, wrap=()):
    """mmpretrain's dist_train.sh, 2 processes, to its end (bounded)."""
    cmd = [
        *wrap, 'bash',
        osp.join(MIM_TOOLS, 'dist_train.sh'), config, '2', '--work-dir',
        str(work_dir), *args,
        *data_options(data, f'train_cfg.max_epochs={epochs}')
    ]
    return finish(start(cmd, launch_env()), 900)


def run_log(work_dir) -> str:
    """The log of the latest run in ``work_dir``."""
    (latest, ) = sorted(
        d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d))
        and osp.isfile(osp.join(work_dir, d, f'{d}.log')))[-1:]
    with open(osp.join(work_dir, latest, f'{latest}.log')) as f:
        return f.read()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The digits as PNG class folders (mmpretrain's CustomDataset)."""
    root = str(tmp_path_factory.mktemp('digits') / 'digits_png')
    made = finish(
        start([sys.executable, 'tools/misc/digits_to_images.py', root]), 300)
    assert made.returncode == 0, made.stderr
    return root


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data):
    """3 epochs through mmpretrain's dist_train.sh, a checkpoint each."""
    work_dir = tmp_path_factory.mktemp('reference') / 'work'
    result = dist_train(CONFIG, work_dir, data)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return work_dir


def lrs(work_dir, after_step=0):
    """(step, lr) of the latest run's logged steps after ``after_step``."""
    return [(r['step'], r['lr']) for r in scalars(str(work_dir))
            if 'lr' in r and r['step'] > after_step]


def test_packaged_dist_train_trains_the_example_config(reference):
    log = run_log(reference)
    assert 'process group: gloo, 2 ranks' in log
    top1 = accuracies(str(reference))
    # 719 16x16 digits, 3 epochs of ResNet-18 (measured 9x %).
    assert len(top1) == EPOCHS and top1[-1] >= 70.0, top1
    for epoch in range(1, EPOCHS + 1):
        load_checkpoint_file(str(reference / f'epoch_{epoch}.pth'))


def test_resume_in_a_copy_falls_back_from_a_truncated_checkpoint(
        reference, data, tmp_path):
    """--resume in a copied work dir whose newest checkpoint is truncated:
    the copy's own epoch_2.pth (last_checkpoint names the original's
    epoch_3.pth), one warning naming both, and epoch 3 trained again."""
    work_dir = tmp_path / 'copy'
    shutil.copytree(reference, work_dir)
    newest = work_dir / f'epoch_{EPOCHS}.pth'
    newest.write_bytes(newest.read_bytes()[:1000])
    result = dist_train(CONFIG, work_dir, data, '--resume')
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    warnings = [
        line for line in run_log(work_dir).splitlines()
        if 'WARNING' in line and 'resuming from' in line
    ]
    assert len(warnings) == 1, warnings
    assert f'resuming from {work_dir / "epoch_2.pth"}' in warnings[0]
    assert f"'{newest}' (1000 bytes) cannot be read" in warnings[0]
    assert load_checkpoint_file(str(newest))['meta']['epoch'] == EPOCHS
    assert lrs(work_dir) == lrs(reference, after_step=2 * STEPS)


def test_resume_passes_over_a_newer_best_checkpoint(reference, data, tmp_path):
    """A best_*.pth (weights only, as save_best writes it) newer than
    epoch_2.pth: epoch 3 resumes from epoch_2.pth at the learning rate of
    the uninterrupted run, not at the schedule's start."""
    work_dir = tmp_path / 'copy'
    copy_with_newer_best(reference, work_dir, EPOCHS - 1)
    result = dist_train(CONFIG, work_dir, data, '--resume')
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f'resuming from {work_dir / "epoch_2.pth"}' in run_log(work_dir)
    got, want = lrs(work_dir), lrs(reference, after_step=2 * STEPS)
    assert got == want and want, (got, want)
    # From the best file the cosine schedule would restart at lr=0.05.
    assert all(lr < 0.05 for _, lr in got)


def test_group_size_not_dividing_the_world_fails_in_one_line_each(
        data, tmp_path):
    result = dist_train(CONFIG, tmp_path / 'work', data, '--cfg-options',
                        'model.backbone.norm_cfg.group_size=3')
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if 'error:' in line]
    assert errors == [
        'train.py: error: model.backbone.norm_cfg.group_size=3 must divide '
        'the world size 2 (MMSyncBN synchronizes groups of group_size '
        'consecutive ranks): use one of [1, 2], or a multiple of 3 processes'
    ] * 2, result.stderr[-3000:]
    # torchrun's own summary (its traceback of ChildFailedError), no
    # traceback of the workers: no frame in mmsync's package or tools (the
    # check must not depend on where the checkout lies: its path may say
    # mmsync).
    ours = (osp.dirname(mmsync.__file__) + os.sep,
            osp.join(REPO, 'tools') + os.sep)
    frames = re.findall(r'File "([^"]+)", line', result.stderr)
    assert not [f for f in frames if f.startswith(ours)], frames
    assert not osp.exists(tmp_path / 'work')


def test_checkpoint_write_on_a_full_disk_leaves_no_partial_file(
        data, tmp_path):
    """Every write beyond 300 KiB fails (EFBIG, as on a full disk): the
    first checkpoint (45 MB) is not written, no part of it is left."""
    work_dir = tmp_path / 'work'
    result = dist_train(
        CONFIG,
        work_dir,
        data,
        epochs=1,
        wrap=('bash', '-c', 'ulimit -f 300 && exec "$@"', 'bash'))
    assert result.returncode != 0
    assert [n for n in os.listdir(work_dir)
            if n.endswith(('.pth', '.tmp'))] == []
    assert ('rank 0 failed: OSError: [Errno 27] File too large'
            in run_log(work_dir))


def test_packaged_test_scores_a_checkpoint_and_refuses_a_crafted_one(
        reference, data, tmp_path):
    checkpoint = str(reference / f'epoch_{EPOCHS}.pth')
    cmd = [
        sys.executable,
        osp.join(MIM_TOOLS, 'test.py'), CONFIG, checkpoint, '--work-dir',
        str(tmp_path / 'test'), *data_options(data)
    ]
    result = finish(start(cmd, launch_env()), 300)
    assert result.returncode == 0, result.stderr[-3000:]
    top1 = accuracies(str(reference))[-1]
    assert f'accuracy/top1: {top1:.4f}' in result.stdout
    marker = tmp_path / 'code_ran'
    crafted = tmp_path / 'crafted.pth'
    torch.save(
        dict(state_dict={}, meta=dict(epoch=1), payload=getattr_chain()),
        crafted)
    cmd[3] = str(crafted)
    # (mmengine's warnings about pkg_resources off: only the tool's lines.)
    result = finish(start(cmd, launch_env(PYTHONWARNINGS='ignore')), 300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"test.py: error: load_from: checkpoint "
                               f"'{crafted}' refused")
    assert "builtins.getattr(getattr, '__self__')" in lines[0]
    assert not marker.exists()


@pytest.fixture(scope='module')
def with_cp(tmp_path_factory, data):
    """One epoch of the with_cp=True example through dist_train.sh."""
    work_dir = tmp_path_factory.mktemp('with_cp') / 'work'
    result = dist_train(CP_CONFIG, work_dir, data, epochs=1)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return work_dir


def state_dicts(reference, with_cp, buffers):
    """The first epoch's parameters (or BN buffers) of both runs."""
    got, want = (
        load_checkpoint_file(str(d / 'epoch_1.pth'))['state_dict']
        for d in (with_cp, reference))
    assert got.keys() == want.keys()
    keys = [
        k for k in want if k.endswith(('running_mean', 'running_var',
                                       'num_batches_tracked')) == buffers
    ]
    return {k: got[k] for k in keys}, {k: want[k] for k in keys}


def test_activation_checkpointing_config_trains_as_the_plain_one(
        reference, with_cp):
    """The with_cp=True example trains with mmpretrain's launcher, its
    weights after one epoch those of the plain config."""
    got, want = state_dicts(reference, with_cp, buffers=False)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_activation_checkpointing_updates_running_stats_once(
        reference, with_cp):
    """Through mmpretrain's launcher, the with_cp=True example counts each
    batch once: its BN buffers after one epoch (num_batches_tracked
    included) are those of the plain config."""
    got, want = state_dicts(reference, with_cp, buffers=True)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, rtol=1e-4, atol=1e-5, msg=key)
