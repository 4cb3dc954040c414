"""Evaluate a checkpoint on the test set of its config, in one process or
split over the processes of a launch (the metric is the same)::

    python tools/test.py CONFIG CHECKPOINT [--out metrics.json]
    tools/dist_test.sh CONFIG CHECKPOINT NPROC [--out metrics.json]

The runner is the config's (``MMSyncRunner`` when it names none): the
checkpoint is checked and loaded under the weights-only allow-list, and
MMSyncBN layers normalize with their running statistics, so a model
trained on many GPUs or nodes is checked on a laptop's CPU.
"""
import argparse
import gc
import json
import os
import os.path as osp
import sys

import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS

try:
    from mmsync.engine import LAUNCHERS
    from mmsync.utils.process import die_with_launcher
except ImportError as e:  # e.g. an _ext built for another torch
    sys.exit(f'test.py: error: {e}')


def parse_args():
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Evaluate a checkpoint on the test set of its config, '
        'in one process or in every process of a launch.')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file (.pth)')
    parser.add_argument(
        '--work-dir',
        help='where the logs go; default: cfg.work_dir or '
        './work_dirs/<config name>')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config entries, e.g. test_dataloader.batch_size=64')
    parser.add_argument('--out', help='also write the metrics to this JSON')
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='load the checkpoint with full unpickling, which can run code: '
        'only for files from a source you trust')
    parser.add_argument(
        '--launcher',
        choices=LAUNCHERS,
        default='none',
        help='how the processes were started (pytorch: torchrun, as '
        'tools/dist_test.sh does); each evaluates its share of the test set')
    # torch.distributed.launch (mim test) passes the local rank.
    parser.add_argument('--local-rank', '--local_rank', type=int)
    args = parser.parse_args()
    if args.local_rank is not None:
        os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def error(message: str) -> None:
    """End with one line on stderr and exit status 2."""
    print(f'test.py: error: {" ".join(message.split())}', file=sys.stderr)
    sys.exit(2)


def load_config(args) -> Config:
    """The config with the command line applied, set to test CHECKPOINT."""
    for name in ('config', 'checkpoint'):
        path = getattr(args, name)
        if not osp.isfile(path):
            error(f'{name} file {path!r} not found')
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
    except Exception as e:
        error(f'cannot read config {args.config!r}: {type(e).__name__}: {e}')
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs',
        osp.splitext(osp.basename(args.config))[0])
    cfg.load_from, cfg.resume = args.checkpoint, False
    if args.trust_checkpoint:
        cfg.trust_checkpoint = True
    if 'runner_type' not in cfg:
        cfg.runner_type = 'MMSyncRunner'
    return cfg


def main():
    """Build the runner, test, print (and write) the metrics."""
    args = parse_args()
    cfg = load_config(args)
    if args.launcher == 'pytorch':
        die_with_launcher()  # not to outlive a killed torchrun
    runner = RUNNERS.build(cfg)
    # Every rank gets the metrics of the whole test set; rank 0 reports them.
    metrics = runner.test()
    if runner.rank == 0:
        print(' '.join(f'{k}: {v:.4f}' for k, v in metrics.items()))
        if args.out:
            with open(args.out, 'w', encoding='utf-8') as f:
                json.dump(metrics, f, indent=2)
    if dist.is_initialized():
        del runner
        gc.collect()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
