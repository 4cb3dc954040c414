"""Write mmsync's digits split as PNG files in the ImageNet folder layout.

``OUT/{train,val}/<digit>/<index>.png``: the layout of mmpretrain's
``CustomDataset`` (and of most OpenMMLab classification codebases), so an
OpenMMLab config trains on it unchanged, e.g.
configs/mmpretrain/resnet18-cifar_mmsyncbn_2xb16-10e_digits-png.py::

    python tools/misc/digits_to_images.py data/digits_png
"""
import argparse
import os
import os.path as osp

import numpy as np

# The data set file of this checkout (mmsync need not be installed).
DIGITS_FILE = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'mmsync',
    'datasets', 'digits.npz')


def write_images(out_dir: str, size: int = 16) -> dict:
    """Write every image of the shipped split as a ``size`` x ``size`` PNG.

    Args:
        out_dir (str): The root folder; ``train/`` and ``val/`` go under it.
        size (int): Side of the written images (8x8 digits, upscaled
            bilinearly). Default: 16.

    Returns:
        dict: Number of images written per split.
    """
    from PIL import Image
    if size < 8:
        raise ValueError(f'size must be at least 8 (the digits are 8x8), '
                         f'got {size}')
    data = np.load(DIGITS_FILE)
    images = (data['images'].astype(np.float32) * (255 / 16)).round()
    counts = {}
    for split in ('train', 'val'):
        indices = data[f'{split}_idx'].astype(np.int64)
        for idx in indices:
            label = int(data['labels'][idx])
            folder = osp.join(out_dir, split, str(label))
            os.makedirs(folder, exist_ok=True)
            image = Image.fromarray(images[idx].astype(np.uint8), mode='L')
            image.resize(
                (size, size),
                Image.BILINEAR).save(osp.join(folder, f'{idx:04d}.png'))
        counts[split] = len(indices)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='root folder, e.g. data/digits_png')
    parser.add_argument(
        '--size', type=int, default=16, help='image side (default 16)')
    args = parser.parse_args()
    counts = write_images(args.out_dir, args.size)
    print(f'{args.out_dir}: {counts["train"]} train and {counts["val"]} val '
          f'images of {args.size}x{args.size} in 10 class folders')


if __name__ == '__main__':
    main()
