"""Train a model from a config with mmsync's runner, on one or many ranks.

Examples::

    python tools/train.py CONFIG                      # one process
    tools/dist_train.sh CONFIG 2                      # torchrun, 2 processes
    tools/slurm_train.sh PARTITION JOB CONFIG WORK_DIR

Any OpenMMLab config trains: one without a ``runner_type`` of its own runs
on ``MMSyncRunner`` (mmsync.engine), whose pre-flight checks the launch,
work dir, model, data splits and checkpoint before the first step (one
line on stderr and exit status 2 when one fails), which loads checkpoints
safely, writes them atomically, resumes from the newest intact one of the
work dir (also when torchrun restarts the workers) and logs every rank's
error. ``--dry-run N`` runs the pre-flight for N processes and exits.
"""
import argparse
import gc
import os
import os.path as osp
import sys

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from torch.distributed.elastic.multiprocessing.errors import record

try:
    from mmsync.engine import LAUNCHERS, PreflightError, preflight
    from mmsync.utils.process import die_with_launcher
except ImportError as e:  # e.g. an _ext built for another torch
    sys.exit(f'train.py: error: {e}')


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
    # torch.distributed.launch (mim train) passes the local rank.
    parser.add_argument('--local-rank', '--local_rank', type=int)
    parser.add_argument(
        '--dry-run',
        type=int,
        metavar='WORLD_SIZE',
        help='check the config, model, data and checkpoint for WORLD_SIZE '
        'processes, print the plan and exit; writes nothing')
    args = parser.parse_args()
    if args.local_rank is not None:
        os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def error(message) -> None:
    """End with one line on stderr and exit status 2."""
    print(f'train.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def load_config(args) -> Config:
    """The config with the command line applied."""
    if not osp.isfile(args.config):
        error(f'config file {args.config!r} not found: pass the path of a '
              '.py config, e.g. configs/resnet_tiny/'
              'resnet-tiny_mmsyncbn_2xb32-15e_digits.py')
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
    except Exception as e:
        error(f'cannot read config {args.config!r}: {type(e).__name__}: '
              f'{" ".join(str(e).split())}')
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs',
        osp.splitext(osp.basename(args.config))[0])
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            error(f'--resume: checkpoint {args.resume!r} not found; give a '
                  '.pth file, or no value to resume from the latest one in '
                  'the work dir')
        cfg.resume, cfg.load_from = True, args.resume
    if args.trust_checkpoint:
        cfg.trust_checkpoint = True
    if args.seed is not None:
        cfg.setdefault('randomness', {})['seed'] = args.seed
    if args.amp:
        if not torch.cuda.is_available():
            error("--amp needs CUDA: mmengine's AmpOptimWrapper (float16 "
                  'autocast with loss scaling) runs on GPUs only; on CPU '
                  'train without --amp')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    # mmsync's runner for any config without a runner of its own.
    if 'runner_type' not in cfg:
        cfg.runner_type = 'MMSyncRunner'
    return cfg


@record
def main():
    """Load the config, build the runner, train."""
    args = parse_args()
    if args.launcher == 'pytorch' and args.dry_run is None:
        # Killed, torchrun cannot stop its workers: they stop themselves.
        die_with_launcher()
    cfg = load_config(args)
    if args.dry_run is not None:
        try:
            plan = preflight(cfg, args.dry_run)
        except PreflightError as e:
            error(e)
        print(f'{args.config}: norm layers {", ".join(plan.norms) or "none"}'
              f'; train set {plan.train_set}; work dir {cfg.work_dir}'
              f'{"; " + plan.checkpoint if plan.checkpoint else ""}')
        return
    try:
        runner = RUNNERS.build(cfg)
        runner.train()
    except KeyboardInterrupt:
        # One line per process instead of a traceback from every rank
        # (tools/dist_train.sh stops its workers with SIGTERM instead).
        print(
            f'train.py: interrupted (rank {os.environ.get("RANK", "0")})',
            file=sys.stderr)
        sys.exit(130)
    if dist.is_initialized():
        # The DDP wrapper (gone with the runner) holds the process group; a
        # group still alive when the interpreter exits aborts the process
        # ("terminate called without an active exception", gloo, torch 2.13).
        del runner
        gc.collect()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
