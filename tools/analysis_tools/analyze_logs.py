"""Draw the training loss and validation accuracy of a run as a PNG.

``tools/train.py`` draws them at the end of training; run this by hand on a
work dir to draw a run again::

    python tools/analysis_tools/analyze_logs.py work_dirs/<config name> [--out curves.png]
"""
import argparse
import os.path as osp
import sys

from mmsync.utils.curves import find_scalars, plot_curves


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
