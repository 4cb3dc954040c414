"""Training curves of a run: its loss by step and its validation accuracy.

Read from the ``vis_data/scalars.json`` that mmengine's LocalVisBackend
writes (one JSON object per logged step); ``tools/train.py`` draws them at
the end of training and ``tools/analysis_tools/analyze_logs.py`` again on
demand.
"""
import glob
import json
import os.path as osp
from typing import Dict, List, Optional, Tuple

ACCURACY_KEY = 'accuracy/top1'


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
