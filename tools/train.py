"""Train a model from a config with mmengine's Runner, on one or many ranks.

Examples::

    python tools/train.py CONFIG                      # one process
    tools/dist_train.sh CONFIG 2                      # torchrun, 2 processes
    tools/slurm_train.sh PARTITION JOB CONFIG WORK_DIR

Every check of the input (config, launcher environment, model, split of the
train set over the ranks) runs before anything is written, and a failed one
ends the run with one line on stderr and exit status 2.
"""
import argparse
import gc
import os
import os.path as osp
import subprocess
import sys
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.registry import DATASETS, MODELS, RUNNERS, init_default_scope
from mmengine.runner import Runner

from mmsync.cnn import MMSyncRunner, is_norm
from mmsync.cnn.utils.runner import init_dist_from_env
from mmsync.datasets import max_even_world_size, rank_steps
from mmsync.models import checkpoint_safe_globals

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
TORCHRUN_VARS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                 'MASTER_PORT')
SLURM_VARS = ('SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS',
              'SLURM_NODELIST')
MPI_VARS = ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK',
            'OMPI_COMM_WORLD_SIZE', 'MASTER_ADDR')


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
        'latest checkpoint in the work dir')
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


def check_model(cfg: Config, config: str) -> list:
    """Build the model once (cheap, no process group) to check its config.

    Returns:
        list[str]: Class names of the model's norm layers.
    """
    try:
        model = MODELS.build(cfg.model)
    except Exception as e:
        raise UsageError(f'cannot build the model of {config}: '
                         f'{_one_line(e)}')
    return sorted({type(m).__name__ for m in model.modules() if is_norm(m)})


def check_split(cfg: Config, world_size: int) -> str:
    """Check that every rank takes the same number of training steps.

    Ranks with fewer steps than others would leave them waiting in a
    collective for ever; a rank without samples cannot train at all.

    Returns:
        str: The plan, e.g. '1437 samples, 2 process(es) x 32, 23
        steps/epoch'.
    """
    loader = cfg.train_dataloader
    try:
        dataset = DATASETS.build(loader.dataset)
    except Exception as e:
        raise UsageError(f'cannot build train_dataloader.dataset: '
                         f'{_one_line(e)}')
    if len(dataset) == 0:
        raise UsageError('train_dataloader.dataset is empty: check its '
                         'split and indices')
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


def train(cfg: Config, backend: Optional[str], plan: str) -> None:
    """Build the runner, train, and draw the curves on rank 0."""
    # MMSyncRunner: gloo and a CPU-capable DDP wrapper for any config.
    runner = (
        RUNNERS.build(cfg)
        if 'runner_type' in cfg else MMSyncRunner.from_cfg(cfg))
    if backend:
        runner.logger.info(f'process group: {backend}, {runner.world_size} '
                           f'ranks; train set {plan}')
    # --resume and load_from read mmengine checkpoints with torch.load.
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        runner.train()
    if runner.rank == 0:
        draw_curves(runner)


def main():
    """Check the input, join the process group, train, draw the curves."""
    args = parse_args()
    try:
        cfg = load_config(args)
        env = launch_env(args.launcher) if args.dry_run is None else {}
        world_size = (
            args.dry_run if args.dry_run is not None else int(
                env.get('WORLD_SIZE', 1)))
        if world_size < 1:
            raise UsageError(f'--dry-run: WORLD_SIZE must be at least 1, '
                             f'got {world_size}')
        norms = check_model(cfg, args.config)
        plan = check_split(cfg, world_size)
    except UsageError as e:
        print(f'{osp.basename(__file__)}: error: {e}', file=sys.stderr)
        sys.exit(2)
    if args.dry_run is not None:
        print(f'{args.config}: norm layers {", ".join(norms) or "none"}; '
              f'train set {plan}; work dir {cfg.work_dir}')
        return
    backend = init_distributed(cfg, env) if env else None
    train(cfg, backend, plan)
    if backend:
        # The DDP wrapper (gone with the runner) holds the process group; a
        # group still alive when the interpreter exits aborts the process
        # ("terminate called without an active exception", gloo, torch 2.13).
        gc.collect()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
