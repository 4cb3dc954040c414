"""Evaluate a checkpoint on CPU, in one process or split over many.

MMSyncBN layers are reverted to BatchNorm on load, so a model trained on
many GPUs or nodes is checked on a laptop; with ``--launcher`` the test set
is split over the processes of a launch and the metric is the same::

    python tools/test.py CONFIG CHECKPOINT [--out metrics.json]
    tools/dist_test.sh CONFIG CHECKPOINT NPROC [--out metrics.json]
"""
import argparse
import json
import os
import os.path as osp
import sys

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.evaluator import Evaluator
from mmengine.runner import Runner
from train import LAUNCHERS, UsageError, launch_env

from mmsync.cnn.utils.runner import init_dist_from_env
from mmsync.models import init_model
from mmsync.models.checkpoint import CheckpointError
from mmsync.utils.process import die_with_launcher


def parse_args():
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Evaluate a checkpoint on the test set of its config, '
        'on CPU, in one process or in every process of a launch.')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file (.pth)')
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
    return parser.parse_args()


def evaluate(model, cfg) -> dict:
    """Metrics of ``model`` on ``cfg.test_dataloader``."""
    loader = Runner.build_dataloader(cfg.test_dataloader)
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = getattr(loader.dataset, 'metainfo', None)
    with torch.no_grad():
        for batch in loader:
            evaluator.process(model.test_step(batch), batch)
    return evaluator.evaluate(len(loader.dataset))


def error(message: str) -> None:
    """End with one line on stderr and exit status 2."""
    print(f'test.py: error: {" ".join(message.split())}', file=sys.stderr)
    sys.exit(2)


def main():
    """Load the model, evaluate it, print (and write) the metrics."""
    args = parse_args()
    for name in ('config', 'checkpoint'):
        path = getattr(args, name)
        if not osp.isfile(path):
            error(f'{name} file {path!r} not found')
    try:
        env = launch_env(args.launcher)
    except UsageError as e:
        error(str(e))
    if args.launcher == 'pytorch':
        die_with_launcher()  # not to outlive a killed torchrun
    try:
        cfg = Config.fromfile(args.config)
        model = init_model(cfg, args.checkpoint, args.cfg_options,
                           args.trust_checkpoint)
    except CheckpointError as e:
        error(str(e))
    except Exception as e:
        error(f'cannot load the model of {args.config!r} with '
              f'{args.checkpoint!r}: {type(e).__name__}: {e}')
    if env:
        os.environ.update(env)
        init_dist_from_env(**cfg.get('env_cfg', {}).get('dist_cfg', {}))
    # Every rank gets the metrics of the whole test set; rank 0 reports them.
    metrics = evaluate(model, cfg)
    if not env or dist.get_rank() == 0:
        print(' '.join(f'{k}: {v:.4f}' for k, v in metrics.items()))
        if args.out:
            with open(args.out, 'w', encoding='utf-8') as f:
                json.dump(metrics, f, indent=2)
    if env:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
