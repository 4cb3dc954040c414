"""The pre-flight: every check of a run's input before its first step.

A run that starts with bad input fails late and on every rank: a process
group that waits for ever, a traceback per process after minutes of data
loading, a checkpoint that cannot be resumed. ``MMSyncRunner`` runs these
checks before it writes anything (the launch, the work dir, the model and
its MMSyncBN sub-groups, the checkpoint to resume or load) and before its
first training or test step (every data split it uses: the split over the
ranks, labels against the model's classes, one batch through the data
path); ``tools/train.py --dry-run N`` runs them all without training. A
failed check raises :class:`PreflightError`, one line that says what to do.
"""
import contextlib
import copy
import os
import os.path as osp
import random
import subprocess
import tempfile
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import DATASETS, MODELS, init_default_scope
from mmengine.runner import Runner

from ..cnn import is_norm
from ..datasets import max_even_world_size, rank_steps
from ..ops import SyncBatchNorm
from .checkpoint import (CheckpointError, find_resume_checkpoint,
                         load_checkpoint_file, resume_candidates)

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
TORCHRUN_VARS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                 'MASTER_PORT')
SLURM_VARS = ('SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS',
              'SLURM_NODELIST')
MPI_VARS = ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK',
            'OMPI_COMM_WORLD_SIZE', 'MASTER_ADDR')
# The data loaders each kind of run reads, with the keys that must be set
# beside each loader for the run to use it.
SPLITS = dict(
    train_dataloader=('train_cfg', ),
    val_dataloader=('val_cfg', 'val_evaluator'),
    test_dataloader=('test_cfg', 'test_evaluator'))
MODE_LOADERS = dict(
    train=('train_dataloader', 'val_dataloader'),
    val=('val_dataloader', ),
    test=('test_dataloader', ))


class PreflightError(Exception):
    """Bad input of a run: what is wrong and what to do, in one line."""


class Plan(NamedTuple):
    """What the pre-flight found, for the log and ``--dry-run``."""
    world_size: int
    norms: List[str]
    train_set: str
    checkpoint: str


def one_line(e: BaseException) -> str:
    """An exception's message on one line (KeyError's without quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return ' '.join(str(msg).split())


def _require(launcher: str, names: Sequence[str], hint: str) -> dict:
    """The environment variables ``names``, or a PreflightError naming
    them."""
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise PreflightError(f'--launcher {launcher} needs the environment '
                             f'variable(s) {", ".join(missing)}: {hint}')
    return {name: os.environ[name] for name in names}


def launch_env(launcher: str) -> Dict[str, str]:
    """Rank, local rank, world size, master address and port of a launch.

    Args:
        launcher (str): One of ``LAUNCHERS``.

    Returns:
        dict: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as
        strings (empty for 'none').
    """
    if launcher not in LAUNCHERS:
        raise PreflightError(f'launcher={launcher!r} is not one of '
                             f'{", ".join(LAUNCHERS)}')
    if launcher == 'none':
        return {}
    if launcher == 'pytorch':
        return _require(
            launcher, TORCHRUN_VARS,
            'start it with tools/dist_train.sh CONFIG NPROC, or torchrun '
            '--nproc-per-node NPROC tools/train.py CONFIG --launcher '
            'pytorch')
    if launcher == 'slurm':
        env = _require(
            launcher, SLURM_VARS,
            'start it with tools/slurm_train.sh PARTITION JOB CONFIG '
            'WORK_DIR, or srun ... python tools/train.py CONFIG --launcher '
            'slurm')
        addr = os.environ.get('MASTER_ADDR')
        if not addr:
            try:
                addr = subprocess.run(
                    ['scontrol', 'show', 'hostnames', env['SLURM_NODELIST']],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True).stdout.split()[0]
            except (OSError, subprocess.SubprocessError, IndexError) as e:
                raise PreflightError(
                    '--launcher slurm: cannot resolve the first node of '
                    f'SLURM_NODELIST={env["SLURM_NODELIST"]!r} with '
                    f'scontrol ({one_line(e)}); set MASTER_ADDR')
        # A port per job, so that jobs sharing a node do not collide.
        port = os.environ.get(
            'MASTER_PORT',
            str(20000 + int(os.environ.get('SLURM_JOB_ID', 0)) % 10000))
        return dict(
            RANK=env['SLURM_PROCID'],
            LOCAL_RANK=env['SLURM_LOCALID'],
            WORLD_SIZE=env['SLURM_NTASKS'],
            MASTER_ADDR=addr,
            MASTER_PORT=port)
    env = _require(
        launcher, MPI_VARS,
        'start it with mpirun -n NPROC -x MASTER_ADDR=<host of rank 0> '
        '[-x MASTER_PORT=29500] python tools/train.py CONFIG --launcher mpi')
    return dict(
        RANK=env['OMPI_COMM_WORLD_RANK'],
        LOCAL_RANK=env['OMPI_COMM_WORLD_LOCAL_RANK'],
        WORLD_SIZE=env['OMPI_COMM_WORLD_SIZE'],
        MASTER_ADDR=env['MASTER_ADDR'],
        MASTER_PORT=os.environ.get('MASTER_PORT', '29500'))


def check_work_dir(work_dir: str) -> None:
    """Check that the work dir can be made and written, writing nothing.

    The nearest existing folder on its path takes a temporary file that is
    gone at once (os.access says yes to root, whatever the folder).
    """
    path = osp.abspath(work_dir)
    while not osp.exists(path):
        path = osp.dirname(path)
    if not osp.isdir(path):
        raise PreflightError(
            f'work dir {work_dir!r} cannot be made: {path!r} is a file, not '
            'a folder; pass another --work-dir')
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PreflightError(
            f'work dir {work_dir!r} is not writable ({path!r}: '
            f'{e.strerror}); pass another --work-dir')


def build_model(cfg: Config) -> nn.Module:
    """The config's model as the Runner builds it (with the config's
    ``data_preprocessor``), on CPU and without a process group."""
    model_cfg = copy.deepcopy(cfg.model)
    if isinstance(model_cfg, dict) and cfg.get('data_preprocessor'):
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    try:
        return MODELS.build(model_cfg)
    except Exception as e:
        raise PreflightError(f'cannot build the model of '
                             f'{cfg.filename or "the config"}: {one_line(e)}')


def norm_names(model: nn.Module) -> List[str]:
    """The class names of the model's norm layers."""
    return sorted({type(m).__name__ for m in model.modules() if is_norm(m)})


def _config_paths(node, key: str, value, prefix: str = '') -> List[str]:
    """Dotted paths of the entries ``key=value`` in a config's dicts."""
    paths = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and v == value:
                paths.append(f'{prefix}{k}')
            else:
                paths += _config_paths(v, key, value, f'{prefix}{k}.')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            paths += _config_paths(v, key, value, f'{prefix}{i}.')
    return paths


def check_group_size(cfg: Config, model: nn.Module, world_size: int) -> None:
    """Check that every MMSyncBN ``group_size`` divides the world size.

    MMSyncBN synchronizes groups of ``group_size`` consecutive ranks; a size
    that does not divide the world would fail on every rank after start.
    """
    sizes = {
        m.subgroup_size
        for m in model.modules()
        if isinstance(m, SyncBatchNorm) and m.subgroup_size
    }
    sync_bn = cfg.get('sync_bn')
    if isinstance(sync_bn, dict) and sync_bn.get('group_size'):
        size = sync_bn['group_size']
        # 'node': the launcher's processes per node (a world of one: all).
        sizes.add(
            int(os.environ.get('LOCAL_WORLD_SIZE') or world_size) if size ==
            'node' else size)
    for size in sorted(sizes):
        if world_size % size:
            where = ', '.join(_config_paths(cfg.to_dict(), 'group_size', size))
            divisors = [
                d for d in range(1, world_size + 1) if world_size % d == 0
            ]
            raise PreflightError(
                f'{where or "group_size"}={size} must divide the world size '
                f'{world_size} (MMSyncBN synchronizes groups of group_size '
                f'consecutive ranks): use one of {divisors}, or a multiple '
                f'of {size} processes')


def check_checkpoints(cfg: Config) -> str:
    """Choose and check the checkpoint to resume from or to load.

    Auto-resume (``resume=True`` without ``load_from``, and every restart by
    torchrun) takes the newest checkpoint inside the work dir that loads
    with the full training state, and sets ``cfg.load_from`` to it; an
    explicit one, or ``load_from``, must load. Loading maps the tensors
    without reading them, so the check is cheap.

    Returns:
        str: What will be resumed, for the log; '' when nothing is.
    """
    trust = bool(cfg.get('trust_checkpoint', False))
    restarted = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')) > 0
    if restarted and resume_candidates(cfg.work_dir):
        cfg.resume, cfg.load_from = True, None
    if cfg.get('resume') and cfg.get('load_from') is None:
        try:
            path, skipped = find_resume_checkpoint(cfg.work_dir, trust)
        except CheckpointError as e:
            raise PreflightError(f'--resume: {e}')
        if path is None:
            cfg.resume = False
            return (f'no checkpoint in {cfg.work_dir} to resume from: '
                    'training starts afresh')
        cfg.load_from = path
        if skipped:
            return (f'resuming from {path}, the newest checkpoint that '
                    f'loads; passed over: {"; ".join(skipped)}')
        return f'resuming from {path}'
    load_from = cfg.get('load_from')
    if load_from:
        # A URL too: downloaded (http(s)) or read by mmengine, then checked
        # under the same rule as a local file.
        setting = '--resume' if cfg.get('resume') else 'load_from'
        try:
            load_checkpoint_file(load_from, trust, check_only=True)
        except CheckpointError as e:
            raise PreflightError(f'{setting}: {e}')
    return ''


def check_start(cfg: Config, world_size: int) -> Tuple[List[str], str]:
    """The checks before anything is written: work dir, model, sub-groups
    (in a distributed run), checkpoint. Sets ``cfg.load_from`` /
    ``cfg.resume`` to what is resumed.

    Returns:
        tuple[list[str], str]: The norm layers of the model and what is
        resumed (see :func:`check_checkpoints`).
    """
    if world_size < 1:
        raise PreflightError(f'WORLD_SIZE must be at least 1, got '
                             f'{world_size}')
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    check_work_dir(cfg.work_dir)
    model = build_model(cfg)
    if world_size > 1:
        # The run's model would fail to build on every rank; in one process
        # MMSyncBN normalizes alone (evaluation), and training checks it in
        # check_splits.
        check_group_size(cfg, model, world_size)
    return norm_names(model), check_checkpoints(cfg)


def used_loaders(cfg: Config, mode: str) -> List[str]:
    """The data loaders that a run of ``mode`` ('train', 'val', 'test')
    reads: those of the mode whose loop and evaluator are configured."""
    return [
        name for name in MODE_LOADERS[mode] if all(
            cfg.get(key) is not None for key in (name, ) + SPLITS[name])
    ]


def build_dataset(cfg: Config, name: str):
    """The data set of ``cfg[name]``, which must not be empty."""
    try:
        dataset = DATASETS.build(cfg[name].dataset)
    except Exception as e:
        raise PreflightError(f'cannot build {name}.dataset: {one_line(e)}')
    if len(dataset) == 0:
        raise PreflightError(f'{name}.dataset is empty: check its split and '
                             'indices')
    return dataset


def check_split(cfg: Config, world_size: int, dataset) -> str:
    """Check that every rank takes the same number of training steps.

    Ranks with fewer steps than others would leave them waiting in a
    collective for ever; a rank without samples cannot train at all.

    Returns:
        str: The plan, e.g. '1437 samples, 2 process(es) x 32, 23
        steps/epoch'.
    """
    loader = cfg.train_dataloader
    sampler = loader.get('sampler', {})
    batch_size = loader.batch_size
    plan = f'{len(dataset)} samples, {world_size} process(es) x {batch_size}'
    if sampler.get('type') not in ('DefaultSampler',
                                   'mmengine.DefaultSampler'):
        return plan
    kwargs = dict(
        num_samples=len(dataset),
        batch_size=batch_size,
        drop_last=loader.get('drop_last', False),
        round_up=sampler.get('round_up', True))
    fits = max_even_world_size(world_size=world_size, **kwargs)
    first, last = (
        rank_steps(world_size=world_size, rank=rank, **kwargs)
        for rank in (0, world_size - 1))
    if fits == world_size:
        return f'{plan}, {first} steps/epoch'
    if fits == 0:
        raise PreflightError(
            f'train_dataloader.batch_size={batch_size} with drop_last=True '
            f'leaves no step in {len(dataset)} samples: lower the batch size')
    raise PreflightError(
        f'{world_size} processes do not fit this train set: '
        f'{len(dataset)} samples in batches of {batch_size} per process '
        f'give rank 0 {first} step(s) per epoch but rank {world_size - 1} '
        f'{last}, and ranks that run out would wait for the others for '
        f'ever; use {fits} processes (the most that fit), or change '
        'train_dataloader.batch_size')


def _num_classes(model: nn.Module) -> Optional[int]:
    """The classes of a classifier (``num_classes`` of it or its head)."""
    for owner in (model, getattr(model, 'head', None)):
        num_classes = getattr(owner, 'num_classes', None)
        if isinstance(num_classes, int):
            return num_classes
    return None


def _labels(dataset) -> Optional[np.ndarray]:
    """Every label of a classification data set that lists them."""
    if hasattr(dataset, 'get_gt_labels'):  # mmpretrain's BaseDataset
        return np.asarray(dataset.get_gt_labels())
    labels = getattr(dataset, 'labels', None)
    return None if labels is None else np.asarray(labels)


def check_data(cfg: Config, name: str, dataset, model: nn.Module) -> None:
    """Check a split against the model: its labels against the classes, and
    one batch through the model's data path (shapes, dtypes, keys).

    Raises:
        PreflightError: Naming the loader and what was expected.
    """
    num_classes, labels = _num_classes(model), _labels(dataset)
    if (num_classes is not None and labels is not None and labels.ndim == 1
            and labels.dtype.kind in 'iu'):
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise PreflightError(
                f'{name}.dataset: labels must be in 0..{num_classes - 1} for '
                f"the model's {num_classes} classes, got {labels[bad[0]]} "
                f'for sample {bad[0]} ({bad.size} such samples)')
    loader = dict(
        cfg[name],
        dataset=dataset,
        num_workers=0,
        persistent_workers=False,
        sampler=dict(type='DefaultSampler', shuffle=False))
    training = name == 'train_dataloader'
    try:
        batch = next(iter(Runner.build_dataloader(loader)))
        model.train(training)
        with torch.no_grad():
            if not training:
                model.val_step(batch)
            else:
                data = model.data_preprocessor(batch, True)
                if isinstance(data, dict):
                    model(**data, mode='loss')
                else:
                    model(*data, mode='loss')
    except Exception as e:
        raise PreflightError(
            f'{name}: its first batch does not go through the model: '
            f'{type(e).__name__}: {one_line(e)}')


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Leave Python's, numpy's and torch's random states as they were: the
    checks build models and samplers (which draw a seed), and the run must
    draw what it would draw without them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def check_splits(cfg: Config, world_size: int, mode: str) -> str:
    """Check every data split a run of ``mode`` reads, on a model of its
    own (the run's model is left untouched: no step, no running stats), and
    for training the sub-groups against the world size.

    Returns:
        str: The plan of the train set ('' when the run does not train).
    """
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    names = used_loaders(cfg, mode)
    if not names:
        return ''
    with random_state_kept():
        datasets = {name: build_dataset(cfg, name) for name in names}
        plan = ''
        if 'train_dataloader' in datasets:
            plan = check_split(cfg, world_size, datasets['train_dataloader'])
        model = build_model(cfg)
        if mode == 'train':
            check_group_size(cfg, model, world_size)
        for name, dataset in datasets.items():
            check_data(cfg, name, dataset, model)
    return plan


def preflight(cfg: Config, world_size: int, mode: str = 'train') -> Plan:
    """Every check of a run of ``mode`` over ``world_size`` processes.

    Raises:
        PreflightError: The first check that fails.
    """
    norms, checkpoint = check_start(cfg, world_size)
    return Plan(world_size, norms, check_splits(cfg, world_size, mode),
                checkpoint)
