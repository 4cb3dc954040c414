"""Train a model from a config with mmengine's Runner, on one or many ranks.

Examples::

    python tools/train.py CONFIG                      # one process
    tools/dist_train.sh CONFIG 2                      # torchrun, 2 processes
    tools/slurm_train.sh PARTITION JOB CONFIG WORK_DIR

Every check of the input (config, launcher environment, work dir, model,
its sub-groups, every data split it uses, the checkpoint to resume or load)
runs before anything is written, and a failed one ends the run with one line
on stderr and exit status 2. Under torchrun a worker records its error for
torchrun's summary and in the work dir's log, dies with torchrun, and, when
torchrun restarts it (``--max-restarts``), resumes from the newest checkpoint
of the work dir that loads.
"""
import argparse
import gc
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time
import traceback
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.config import Config, DictAction
from mmengine.registry import DATASETS, MODELS, RUNNERS, init_default_scope
from mmengine.runner import Runner
from torch.distributed.elastic.multiprocessing.errors import record

from mmsync.cnn import MMSyncRunner, is_norm
from mmsync.cnn.utils.runner import init_dist_from_env
from mmsync.datasets import max_even_world_size, rank_steps
from mmsync.models.checkpoint import (ATOMIC_BACKEND, CheckpointError,
                                      checkpoint_candidates,
                                      checkpoint_loading,
                                      find_resume_checkpoint,
                                      load_checkpoint_file)
from mmsync.ops import SyncBatchNorm
from mmsync.utils.process import die_with_launcher

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
TORCHRUN_VARS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                 'MASTER_PORT')
SLURM_VARS = ('SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS',
              'SLURM_NODELIST')
MPI_VARS = ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK',
            'OMPI_COMM_WORLD_SIZE', 'MASTER_ADDR')
# Errors of a rank whose peer died first (gloo's words), and how long such a
# rank waits before it reports.
PEER_GONE = ('Connection closed by peer', 'Connection reset by peer')
PEER_GONE_DELAY = 3


class UsageError(Exception):
    """Bad input: reported as one line, before anything is written."""


def parse_args():
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Train a model with mmengine; MMSyncBN layers '
        'synchronize over all processes of the launch.')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--work-dir',
        help='where logs, checkpoints and curves go; default: '
        'cfg.work_dir or ./work_dirs/<config name>')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        help='resume from this checkpoint, or without a value from the '
        'newest checkpoint in the work dir that loads')
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='load checkpoints (--resume, load_from) with full unpickling, '
        'which can run code: only for files from a source you trust')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision with loss scaling (CUDA only)')
    parser.add_argument(
        '--seed', type=int, help='random seed; default: cfg.randomness.seed')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config entries, e.g. train_cfg.max_epochs=5 '
        'train_dataloader.batch_size=16')
    parser.add_argument(
        '--launcher',
        choices=LAUNCHERS,
        default='none',
        help='how the processes were started (pytorch: torchrun)')
    parser.add_argument(
        '--dry-run',
        type=int,
        metavar='WORLD_SIZE',
        help='check the config, model and split of the train set over '
        'WORLD_SIZE processes, print the plan and exit; writes nothing')
    return parser.parse_args()


def load_config(args) -> Config:
    """The config with the command line applied."""
    if not osp.isfile(args.config):
        raise UsageError(f'config file {args.config!r} not found: pass the '
                         'path of a .py config, e.g. configs/resnet_tiny/'
                         'resnet-tiny_mmsyncbn_2xb32-15e_digits.py')
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
    except Exception as e:
        raise UsageError(f'cannot read config {args.config!r}: '
                         f'{type(e).__name__}: {_one_line(e)}')
    # Config.fromfile imported cfg.custom_imports; names resolve from the
    # config's own scope (e.g. 'mmpretrain'), as in mmengine's Runner.
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs',
        osp.splitext(osp.basename(args.config))[0])
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise UsageError(f'--resume: checkpoint {args.resume!r} not '
                             'found; give a .pth file, or no value to '
                             'resume from the latest one in the work dir')
        cfg.resume, cfg.load_from = True, args.resume
    if args.seed is not None:
        cfg.setdefault('randomness', {})['seed'] = args.seed
    if args.amp:
        if not torch.cuda.is_available():
            raise UsageError(
                "--amp needs CUDA: mmengine's AmpOptimWrapper (float16 "
                'autocast with loss scaling) runs on GPUs only; on CPU train '
                'without --amp')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    return cfg


def _one_line(e: Exception) -> str:
    """An exception's message on one line (KeyError's without quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return ' '.join(str(msg).split())


def _require(launcher: str, names, hint: str) -> dict:
    """The environment variables ``names``, or a UsageError naming them."""
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise UsageError(f'--launcher {launcher} needs the environment '
                         f'variable(s) {", ".join(missing)}: {hint}')
    return {name: os.environ[name] for name in names}


def launch_env(launcher: str) -> dict:
    """Rank, local rank, world size, master address and port of a launch.

    Args:
        launcher (str): One of ``LAUNCHERS``.

    Returns:
        dict: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as
        strings (empty for 'none').
    """
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
                raise UsageError(
                    '--launcher slurm: cannot resolve the first node of '
                    f'SLURM_NODELIST={env["SLURM_NODELIST"]!r} with '
                    f'scontrol ({_one_line(e)}); set MASTER_ADDR')
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


def check_model(cfg: Config, config: str) -> Tuple[nn.Module, list]:
    """Build the model once (cheap, no process group) to check its config.

    Returns:
        tuple[nn.Module, list[str]]: The model and the class names of its
        norm layers.
    """
    try:
        model = MODELS.build(cfg.model)
    except Exception as e:
        raise UsageError(f'cannot build the model of {config}: '
                         f'{_one_line(e)}')
    return model, sorted(
        {type(m).__name__
         for m in model.modules() if is_norm(m)})


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
        raise UsageError(
            f'train_dataloader.batch_size={batch_size} with drop_last=True '
            f'leaves no step in {len(dataset)} samples: lower the batch size')
    raise UsageError(
        f'{world_size} processes do not fit this train set: '
        f'{len(dataset)} samples in batches of {batch_size} per process '
        f'give rank 0 {first} step(s) per epoch but rank {world_size - 1} '
        f'{last}, and ranks that run out would wait for the others for '
        f'ever; use {fits} processes (the most that fit), or change '
        'train_dataloader.batch_size')


def check_work_dir(work_dir: str) -> None:
    """Check that the work dir can be made and written, writing nothing.

    The nearest existing folder on its path takes a temporary file that is
    gone at once (os.access says yes to root, whatever the folder).
    """
    path = osp.abspath(work_dir)
    while not osp.exists(path):
        path = osp.dirname(path)
    if not osp.isdir(path):
        raise UsageError(f'work dir {work_dir!r} cannot be made: {path!r} is '
                         'a file, not a folder; pass another --work-dir')
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f'work dir {work_dir!r} is not writable ({path!r}: '
                         f'{e.strerror}); pass another --work-dir')


def used_loaders(cfg: Config) -> List[str]:
    """The data loaders that training reads: train, and val where the
    config validates (val_dataloader, val_cfg and val_evaluator set)."""
    names = ['train_dataloader']
    if all(
            cfg.get(key) is not None
            for key in ('val_dataloader', 'val_cfg', 'val_evaluator')):
        names.append('val_dataloader')
    return names


def build_dataset(cfg: Config, name: str):
    """The data set of ``cfg[name]``, which must not be empty."""
    try:
        dataset = DATASETS.build(cfg[name].dataset)
    except Exception as e:
        raise UsageError(f'cannot build {name}.dataset: {_one_line(e)}')
    if len(dataset) == 0:
        raise UsageError(f'{name}.dataset is empty: check its split and '
                         'indices')
    return dataset


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
        UsageError: Naming the loader and what was expected.
    """
    num_classes, labels = _num_classes(model), _labels(dataset)
    if (num_classes is not None and labels is not None and labels.ndim == 1
            and labels.dtype.kind in 'iu'):
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise UsageError(
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
        raise UsageError(
            f'{name}: its first batch does not go through the model: '
            f'{type(e).__name__}: {_one_line(e)}')


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
        sizes.add(sync_bn['group_size'])
    for size in sorted(sizes):
        if world_size % size:
            where = ', '.join(_config_paths(cfg.to_dict(), 'group_size', size))
            divisors = [
                d for d in range(1, world_size + 1) if world_size % d == 0
            ]
            raise UsageError(
                f'{where or "group_size"}={size} must divide the world size '
                f'{world_size} (MMSyncBN synchronizes groups of group_size '
                f'consecutive ranks): use one of {divisors}, or a multiple '
                f'of {size} processes')


def check_checkpoints(cfg: Config, trust: bool) -> str:
    """Choose and check the checkpoint to resume from or to load.

    Auto-resume (``--resume`` without a value, and every restart by
    torchrun) takes the newest checkpoint inside the work dir that loads;
    an explicit one, or ``load_from``, must load. Loading maps the tensors
    without reading them, so the check is cheap.

    Returns:
        str: What will be resumed, for the log; '' when nothing is.
    """
    restarted = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')) > 0
    if restarted and checkpoint_candidates(cfg.work_dir):
        cfg.resume, cfg.load_from = True, None
    if cfg.get('resume') and cfg.get('load_from') is None:
        try:
            path, skipped = find_resume_checkpoint(cfg.work_dir, trust)
        except CheckpointError as e:
            raise UsageError(f'--resume: {e}')
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
    if load_from and '://' not in load_from:
        setting = '--resume' if cfg.get('resume') else 'load_from'
        try:
            load_checkpoint_file(load_from, trust, check_only=True)
        except CheckpointError as e:
            raise UsageError(f'{setting}: {e}')
    return ''


def atomic_checkpoints(cfg: Config) -> None:
    """Write checkpoints atomically (see ``AtomicLocalBackend``) where the
    checkpoint hook writes local files with mmengine's default backend."""
    hook = cfg.get('default_hooks', {}).get('checkpoint')
    if (hook and hook.get('type')
            in ('CheckpointHook', 'mmengine.CheckpointHook')
            and hook.get('backend_args') is None
            and hook.get('file_client_args') is None
            and '://' not in str(hook.get('out_dir') or '')):
        hook.backend_args = dict(backend=ATOMIC_BACKEND)


def log_failure(runner: Runner, error: BaseException) -> None:
    """Append this rank's error and traceback to the run's log file.

    Every rank writes (not only rank 0, whose logger owns the file), so the
    log says which rank failed and why, not only where it stops.
    """
    stamp = time.strftime('%Y/%m/%d %H:%M:%S')
    trace = ''.join(
        traceback.format_exception(type(error), error, error.__traceback__))
    with open(
            osp.join(runner.log_dir, f'{runner.timestamp}.log'),
            'a',
            encoding='utf-8') as f:
        f.write(f'{stamp} - mmengine - ERROR - rank {runner.rank} failed: '
                f'{type(error).__name__}: {_one_line(error)}\n{trace}')


def init_distributed(cfg: Config, env: dict) -> str:
    """Join the process group: NCCL with CUDA, else gloo (also on CPU).

    Returns:
        str: The backend.
    """
    os.environ.update(env)
    return init_dist_from_env(**cfg.get('env_cfg', {}).get('dist_cfg', {}))


def draw_curves(runner: Runner) -> None:
    """Write the loss/accuracy curves of this run next to its logs."""
    from analyze_logs import plot_curves
    scalars = osp.join(runner.log_dir, 'vis_data', 'scalars.json')
    if osp.isfile(scalars):
        out = osp.join(runner.log_dir, 'curves.png')
        plot_curves(scalars, out, title=runner.experiment_name)
        runner.logger.info(f'loss and accuracy curves: {out}')


def train(cfg: Config, backend: Optional[str], plan: str, resume_note: str,
          trust: bool) -> None:
    """Build the runner, train, and draw the curves on rank 0."""
    # MMSyncRunner: gloo and a CPU-capable DDP wrapper for any config.
    runner = (
        RUNNERS.build(cfg)
        if 'runner_type' in cfg else MMSyncRunner.from_cfg(cfg))
    if backend:
        runner.logger.info(f'process group: {backend}, {runner.world_size} '
                           f'ranks; train set {plan}')
    if resume_note:
        log = runner.logger.warning if 'passed over' in resume_note else (
            runner.logger.info)
        log(resume_note)
    try:
        # --resume and load_from read mmengine checkpoints with torch.load.
        with checkpoint_loading(trust):
            runner.train()
    except Exception as e:
        log_failure(runner, e)
        if any(text in str(e) for text in PEER_GONE):
            # torchrun names the earliest error (to the second) as the root
            # cause: let the rank that failed first be the earliest.
            time.sleep(PEER_GONE_DELAY)
        raise
    if runner.rank == 0:
        draw_curves(runner)


@record
def main():
    """Check the input, join the process group, train, draw the curves."""
    args = parse_args()
    if args.launcher == 'pytorch' and args.dry_run is None:
        # Killed, torchrun cannot stop its workers: they stop themselves.
        die_with_launcher()
    try:
        cfg = load_config(args)
        env = launch_env(args.launcher) if args.dry_run is None else {}
        world_size = (
            args.dry_run if args.dry_run is not None else int(
                env.get('WORLD_SIZE', 1)))
        if world_size < 1:
            raise UsageError(f'--dry-run: WORLD_SIZE must be at least 1, '
                             f'got {world_size}')
        check_work_dir(cfg.work_dir)
        model, norms = check_model(cfg, args.config)
        check_group_size(cfg, model, world_size)
        datasets = {
            name: build_dataset(cfg, name)
            for name in used_loaders(cfg)
        }
        plan = check_split(cfg, world_size, datasets['train_dataloader'])
        for name, dataset in datasets.items():
            check_data(cfg, name, dataset, model)
        resume_note = check_checkpoints(cfg, args.trust_checkpoint)
    except UsageError as e:
        print(f'{osp.basename(__file__)}: error: {e}', file=sys.stderr)
        sys.exit(2)
    if args.dry_run is not None:
        print(f'{args.config}: norm layers {", ".join(norms) or "none"}; '
              f'train set {plan}; work dir {cfg.work_dir}'
              f'{"; " + resume_note if resume_note else ""}')
        return
    del model, datasets
    atomic_checkpoints(cfg)
    rank = env.get('RANK', '0')
    try:
        backend = init_distributed(cfg, env) if env else None
        train(cfg, backend, plan, resume_note, args.trust_checkpoint)
    except KeyboardInterrupt:
        # One line per process instead of a traceback from every rank
        # (tools/dist_train.sh stops its workers with SIGTERM instead).
        print(
            f'{osp.basename(__file__)}: interrupted (rank {rank})',
            file=sys.stderr)
        sys.exit(130)
    if backend:
        # The DDP wrapper (gone with the runner) holds the process group; a
        # group still alive when the interpreter exits aborts the process
        # ("terminate called without an active exception", gloo, torch 2.13).
        gc.collect()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
