"""Run the tools as a user does: real processes, bounded in time.

Every command runs in its own process group, so that on a timeout the whole
tree (torchrun and its workers, srun and its tasks) is killed and the test
fails with the tail of the output instead of hanging.
"""
import glob
import json
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from dist_utils import free_port  # noqa: F401 (shared with the tests)

from mmsync.engine import checkpoint_safe_globals

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(REPO, 'tools')
CONFIGS = osp.join(REPO, 'configs', 'resnet_tiny')
SYNC_CONFIG = osp.join(CONFIGS, 'resnet-tiny_mmsyncbn_2xb32-15e_digits.py')
BN_1X_CONFIG = osp.join(CONFIGS, 'resnet-tiny_bn_1xb64-15e_digits.py')
BN_2X_CONFIG = osp.join(CONFIGS, 'resnet-tiny_bn_2xb32-15e_digits.py')

# A short run for equivalence checks: 333 samples split into 20 global
# batches of 16 and a last one of 13 (7 + 6 on two ranks), the loss logged
# at every step, a checkpoint after every epoch.
SHORT_RUN_SAMPLES = 333
SHORT_RUN_STEPS = 21  # per epoch, at a global batch of 16


def short_run_options(dtype: str,
                      batch_size: int,
                      max_epochs: int = 2) -> List[str]:
    """--cfg-options of a short run with this dtype and per-rank batch."""
    return [
        '--cfg-options', f'model.dtype={dtype}',
        f'train_dataloader.batch_size={batch_size}',
        f'train_dataloader.dataset.indices={SHORT_RUN_SAMPLES}',
        f'train_cfg.max_epochs={max_epochs}',
        'default_hooks.logger.interval=1', 'log_processor.window_size=1',
        'default_hooks.checkpoint.interval=1'
    ]


def base_env(**extra: str) -> Dict[str, str]:
    """The environment of a launch: the repo importable, one thread each."""
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    env['OMP_NUM_THREADS'] = '1'
    env.update(extra)
    return env


def start(cmd: Sequence[str],
          env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start ``cmd`` in the repo, in its own process group."""
    return subprocess.Popen(
        list(cmd),
        cwd=REPO,
        env=env or base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True)


def finish(proc: subprocess.Popen,
           timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc``; on timeout kill its group and raise with output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f'{proc.args} did not finish in {timeout} s (killed), and '
                'processes outside its group (orphans?) hold its output')
        raise AssertionError(
            f'{proc.args} did not finish in {timeout} s (killed); output:\n'
            f'{out[-3000:]}\n{err[-3000:]}')
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: Sequence[str],
        timeout: float = 300,
        env: Optional[Dict[str, str]] = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end within ``timeout`` seconds.

    With ``check``, a non-zero exit fails the test with the output's tail.
    """
    result = finish(start(cmd, env), timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f'{cmd} exited with {result.returncode}; output:\n'
            f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result


def python(*args: str) -> List[str]:
    """A command running tools/<script> with this interpreter."""
    return [sys.executable, osp.join(TOOLS, args[0]), *args[1:]]


def scalars(work_dir: str, run: int = -1) -> List[Dict]:
    """The records of a run's scalars.json; default: the latest run."""
    files = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    assert files, f'no run in {work_dir}'
    with open(files[run], encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(work_dir: str, run: int = -1) -> List[Tuple[int, float]]:
    """(step, training loss) of every logged step."""
    return [(r['step'], r['loss']) for r in scalars(work_dir, run)
            if 'loss' in r]


def accuracies(work_dir: str, run: int = -1) -> List[float]:
    """Validation top-1 accuracy after each validated epoch."""
    return [
        r['accuracy/top1'] for r in scalars(work_dir, run)
        if 'accuracy/top1' in r
    ]


def copy_with_newer_best(reference, work_dir, epoch: int) -> None:
    """Copy the work dir ``reference`` to ``work_dir`` without its
    ``epoch_{epoch + 1}.pth`` and with a ``best_*.pth`` of ``epoch`` newer
    than every other file: weights without optimizer or scheduler state, as
    CheckpointHook's save_best writes it."""
    shutil.copytree(reference, work_dir)
    os.remove(osp.join(work_dir, f'epoch_{epoch + 1}.pth'))
    source = osp.join(work_dir, f'epoch_{epoch}.pth')
    checkpoint = torch.load(source, map_location='cpu', weights_only=False)
    del checkpoint['optimizer'], checkpoint['param_schedulers']
    best = osp.join(work_dir, f'best_accuracy_top1_epoch_{epoch}.pth')
    torch.save(checkpoint, best)
    later = osp.getmtime(source) + 60
    os.utime(best, (later, later))


def state_dict(checkpoint: str) -> Dict[str, torch.Tensor]:
    """The model weights and buffers of a checkpoint of tools/train.py."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(checkpoint, map_location='cpu')['state_dict']


def assert_as_accurate(work_dir: str, ref_dir: str, oracle_dir: str,
                       rtol: float, epochs: int) -> None:
    """A low-precision run is as close to a float64 oracle as the reference
    run in the same precision, at every step and in the final weights:
    its error is at most twice the reference's, or within ``rtol`` (the
    house rule for low precision: tolerance relative to the reference's
    own error, since float32 rounding differences grow chaotically over
    training steps, and which run drifts first depends on the machine)."""
    steps = epochs * SHORT_RUN_STEPS
    got, want, truth = (
        losses(d)[:steps] for d in (work_dir, ref_dir, oracle_dir))
    assert [s for s, _ in got] == [s for s, _ in truth] == list(
        range(1, steps + 1))
    for (step, a), (_, b), (_, t) in zip(got, want, truth):
        bound = max(2 * abs(b - t), rtol * abs(t))
        assert abs(a - t) <= bound, (
            f'loss at step {step}: {a} (reference {b}, float64 {t})')
    got, want, truth = (
        state_dict(osp.join(d, f'epoch_{epochs}.pth'))
        for d in (work_dir, ref_dir, oracle_dir))
    assert got.keys() == want.keys() == truth.keys()
    for key, t in truth.items():
        if not t.is_floating_point():
            assert torch.equal(got[key], t) and torch.equal(want[key], t)
            continue
        t = t.double()
        ours = (got[key].double() - t).abs().max().item()
        theirs = (want[key].double() - t).abs().max().item()
        scale = max(t.abs().max().item(), 1e-12)
        assert ours <= max(
            2 * theirs, rtol *
            scale), (f'{key}: max abs error {ours}, the reference\'s {theirs}')


def assert_runs_match(work_dir: str,
                      ref_dir: str,
                      rtol: float,
                      epochs: int = 2,
                      same_accuracy: bool = True) -> None:
    """Two short runs agree over their first ``epochs`` epochs: the loss at
    every step, the weights and buffers at the end, the validation accuracy.

    Args:
        work_dir (str): Work dir of the run under test.
        ref_dir (str): Work dir of the reference run.
        rtol (float): Bound on each difference relative to the reference
            loss, or to the largest magnitude of the reference tensor.
        epochs (int): Epochs compared. Default: 2.
        same_accuracy (bool): Also require equal accuracies (a difference
            of ``rtol`` can flip a borderline prediction). Default: True.
    """
    steps = epochs * SHORT_RUN_STEPS
    got, want = losses(work_dir)[:steps], losses(ref_dir)[:steps]
    assert [s for s, _ in got] == [s for s, _ in want] == list(
        range(1, steps + 1))
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= rtol * abs(b), f'loss at step {step}: {a} != {b}'
    got, want = (
        state_dict(osp.join(d, f'epoch_{epochs}.pth'))
        for d in (work_dir, ref_dir))
    assert got.keys() == want.keys()
    for key, ref in want.items():
        err = (got[key].double() - ref.double()).abs().max().item()
        scale = max(ref.double().abs().max().item(), 1e-12)
        assert err <= rtol * scale, f'{key}: max abs difference {err}'
    if same_accuracy:
        assert accuracies(work_dir)[:epochs] == accuracies(ref_dir)[:epochs]
