"""Draw the training loss and validation accuracy of a run as a PNG.

Reads the ``vis_data/scalars.json`` that mmengine's LocalVisBackend writes
(one JSON object per logged step). ``tools/train.py`` calls it at the end of
training; run it by hand on a work dir to draw a run again::

    python tools/analysis_tools/analyze_logs.py work_dirs/<config name> [--out curves.png]
"""
import argparse
import glob
import json
import os.path as osp
import sys
from typing import Dict, List, Optional, Tuple

ACCURACY_KEY = 'accuracy/top1'


def parse_args():
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Plot loss and accuracy curves of a training run.')
    parser.add_argument(
        'path',
        help='a scalars.json, a run folder (work_dir/<timestamp>) or a work '
        'dir (its latest run)')
    parser.add_argument(
        '--out', help='PNG to write; default: curves.png next to the run')
    return parser.parse_args()


def find_scalars(path: str) -> str:
    """The scalars.json of ``path``: itself, of a run, or of the latest run.

    Raises:
        FileNotFoundError: If there is none.
    """
    if osp.isfile(path):
        return path
    for pattern in ('vis_data/scalars.json', '*/vis_data/scalars.json'):
        found = sorted(glob.glob(osp.join(path, pattern)))
        if found:
            return found[-1]
    raise FileNotFoundError(f'no scalars.json in {path!r}: give a work dir '
                            'of tools/train.py or a scalars.json')


def read_scalars(
        path: str) -> Tuple[List[Tuple[int, float]], List[Tuple[int, float]]]:
    """Training loss by step and validation accuracy by epoch.

    Returns:
        tuple[list, list]: ``[(step, loss)]`` and ``[(epoch, top1)]``.
    """
    losses, accuracies = [], []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if not line.strip():
                continue
            record: Dict = json.loads(line)
            if 'loss' in record:
                losses.append((record['step'], record['loss']))
            if ACCURACY_KEY in record:
                accuracies.append((record['step'], record[ACCURACY_KEY]))
    return losses, accuracies


def plot_curves(scalars: str, out: str, title: Optional[str] = None) -> None:
    """Draw loss (left) and accuracy (right) from ``scalars`` into ``out``.

    Args:
        scalars (str): A scalars.json of mmengine's LocalVisBackend.
        out (str): The PNG to write.
        title (str, optional): Figure title. Default: None.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    losses, accuracies = read_scalars(scalars)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        ax_loss.plot(*zip(*losses), color='tab:blue')
    ax_loss.set(xlabel='step', ylabel='training loss', yscale='log')
    if accuracies:
        ax_acc.plot(*zip(*accuracies), marker='o', color='tab:green')
        epoch, top1 = accuracies[-1]
        ax_acc.annotate(
            f'{top1:.2f}%', (epoch, top1),
            textcoords='offset points',
            xytext=(-10, -15))
    ax_acc.set(xlabel='epoch', ylabel='validation top-1 accuracy (%)')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main():
    """Find the run's scalars, draw them, print where the PNG went."""
    args = parse_args()
    try:
        scalars = find_scalars(args.path)
    except FileNotFoundError as e:
        print(f'analyze_logs.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    out = args.out or osp.join(osp.dirname(osp.dirname(scalars)), 'curves.png')
    plot_curves(scalars, out, title=osp.basename(osp.dirname(out)))
    print(out)


if __name__ == '__main__':
    main()
