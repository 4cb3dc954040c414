"""Which checkpoints auto-resume may take: only full-state ones of the work
dir (epoch_*, iter_*, what last_checkpoint names there), newest first."""
import os

import pytest
import torch

from mmsync.engine import (CheckpointError, find_resume_checkpoint,
                           resume_candidates)


def save(path, full=True, mtime=None):
    """A checkpoint as CheckpointHook writes it (without optimizer and
    scheduler state for save_best)."""
    checkpoint = dict(meta=dict(epoch=1), state_dict=dict(w=torch.zeros(2)))
    if full:
        checkpoint.update(optimizer=dict(state={}), param_schedulers=[])
    torch.save(checkpoint, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


def test_candidates_are_full_state_names_newest_first(tmp_path):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    save(work_dir / 'epoch_2.pth', mtime=100)
    save(work_dir / 'epoch_10.pth', mtime=50)
    save(work_dir / 'iter_3.pth', mtime=200)
    save(work_dir / 'best_accuracy_top1_epoch_12.pth', full=False, mtime=300)
    save(work_dir / 'pretrained.pth', mtime=400)
    elsewhere = save(tmp_path / 'epoch_99.pth')
    (work_dir / 'last_checkpoint').write_text(elsewhere)
    assert resume_candidates(str(work_dir)) == [
        str(work_dir / name)
        for name in ('epoch_10.pth', 'iter_3.pth', 'epoch_2.pth')
    ]
    # last_checkpoint naming a file of the work dir comes first, whatever
    # its name (CheckpointHook's filename_tmpl).
    named = save(work_dir / 'ckpt_e7.pth')
    (work_dir / 'last_checkpoint').write_text(named)
    assert resume_candidates(str(work_dir))[0] == named


def test_a_newer_best_file_is_never_resumed(tmp_path):
    """The defect: ranking every .pth by the last number in its name took
    best_accuracy_top1_epoch_2.pth (same number, newer) over epoch_2.pth."""
    epoch = save(tmp_path / 'epoch_2.pth', mtime=100)
    save(tmp_path / 'best_accuracy_top1_epoch_2.pth', full=False, mtime=200)
    assert find_resume_checkpoint(str(tmp_path)) == (epoch, [])


def test_weights_only_checkpoint_under_a_full_state_name(tmp_path):
    """An epoch_N.pth saved with save_optimizer=False cannot be resumed:
    passed over for an older full one, or refused when it is the only
    one."""
    older = save(tmp_path / 'epoch_1.pth')
    save(tmp_path / 'epoch_2.pth', full=False)
    path, skipped = find_resume_checkpoint(str(tmp_path))
    assert path == older
    assert len(skipped) == 1 and 'no optimizer' in skipped[0]
    os.remove(older)
    with pytest.raises(CheckpointError, match='can be resumed'):
        find_resume_checkpoint(str(tmp_path))
