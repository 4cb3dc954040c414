"""Write digits placed on canvases as segmentation and detection data sets.

mmsync's shipped digits (8x8, 10 classes), upscaled and placed without
overlap on dark canvases, in two OpenMMLab layouts:

- ``OUT/seg``: mmseg's folder layout, ``img_dir/{train,val}/*.png`` and
  ``ann_dir/{train,val}/*.png`` (label maps: 0 background, 1 + the digit on
  its stroke pixels), for mmseg's ``BaseSegDataset``;
- ``OUT/det``: COCO style, ``{train,val}/*.png`` and
  ``annotations/{train,val}.json`` (one box a digit, category id =
  digit + 1), for mmdet's ``CocoDataset`` and ``CocoMetric``.

Train canvases take digits from the shipped train split, val canvases from
the val split, so the metric is measured on unseen handwriting::

    python tools/misc/digits_on_canvas.py data/digits_canvas
"""
import argparse
import json
import os
import os.path as osp

import numpy as np

# The data set file of this checkout (mmsync need not be installed).
DIGITS_FILE = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'mmsync',
    'datasets', 'digits.npz')
CLASSES = tuple(str(d) for d in range(10))


def place(rng, size: int, digit: int, count: int):
    """Top-left corners of ``count`` non-overlapping ``digit``-pixel squares
    on a ``size`` canvas (fewer where no free place was found)."""
    corners = []
    for _ in range(50 * count):
        if len(corners) == count:
            break
        y, x = rng.integers(0, size - digit + 1, size=2)
        if all(
                abs(int(y) - cy) >= digit or abs(int(x) - cx) >= digit
                for cy, cx in corners):
            corners.append((int(y), int(x)))
    return corners


def write_canvases(out_dir: str,
                   num_train: int = 400,
                   num_val: int = 100,
                   size: int = 64,
                   digit: int = 24,
                   per_image: int = 2,
                   seed: int = 0) -> dict:
    """Write both data sets under ``out_dir``.

    Args:
        out_dir (str): Root folder; ``seg/`` and ``det/`` go under it.
        num_train (int): Train canvases. Default: 400.
        num_val (int): Validation canvases. Default: 100.
        size (int): Canvas side in pixels. Default: 64.
        digit (int): Side of a placed digit (8x8 upscaled). Default: 24.
        per_image (int): Most digits on a canvas (1 to this). Default: 2.
        seed (int): Seed of the placement. Default: 0.

    Returns:
        dict: Canvases and digits written per split.
    """
    from PIL import Image
    for name, value, low in (('num_train', num_train,
                              1), ('num_val', num_val, 1), ('digit', digit, 8),
                             ('per_image', per_image, 1)):
        if value < low:
            raise ValueError(f'{name} must be at least {low}, got {value}')
    if size < digit:
        raise ValueError(f'size must be at least digit ({digit}), got {size}')
    data = np.load(DIGITS_FILE)
    images = data['images'].astype(np.float32) / 16
    rng = np.random.default_rng(seed)
    counts = {}
    for split, num in (('train', num_train), ('val', num_val)):
        pool = data[f'{split}_idx'].astype(np.int64)
        for sub in ('seg/img_dir', 'seg/ann_dir', 'det'):
            os.makedirs(osp.join(out_dir, sub, split), exist_ok=True)
        os.makedirs(osp.join(out_dir, 'det', 'annotations'), exist_ok=True)
        coco = dict(
            images=[],
            annotations=[],
            categories=[dict(id=i + 1, name=c) for i, c in enumerate(CLASSES)])
        placed = 0
        for i in range(num):
            canvas = np.zeros((size, size), np.float32)
            labels = np.zeros((size, size), np.uint8)
            count = int(rng.integers(1, per_image + 1))
            for y, x in place(rng, size, digit, count):
                idx = int(rng.choice(pool))
                label = int(data['labels'][idx])
                big = np.asarray(
                    Image.fromarray(images[idx]).resize((digit, digit),
                                                        Image.BILINEAR))
                canvas[y:y + digit, x:x + digit] = big
                labels[y:y + digit, x:x + digit][big > 0.5] = label + 1
                ys, xs = np.nonzero(big > 0.25)
                x0, y0 = x + int(xs.min()), y + int(ys.min())
                w, h = int(xs.max() - xs.min()) + 1, int(ys.max() -
                                                         ys.min()) + 1
                coco['annotations'].append(
                    dict(
                        id=len(coco['annotations']) + 1,
                        image_id=i,
                        category_id=label + 1,
                        bbox=[x0, y0, w, h],
                        area=w * h,
                        iscrowd=0))
                placed += 1
            file_name = f'{i:05d}.png'
            pixels = (canvas * 255).round().astype(np.uint8)
            Image.fromarray(
                pixels, mode='L').save(
                    osp.join(out_dir, 'seg', 'img_dir', split, file_name))
            Image.fromarray(
                labels, mode='L').save(
                    osp.join(out_dir, 'seg', 'ann_dir', split, file_name))
            Image.fromarray(
                pixels,
                mode='L').save(osp.join(out_dir, 'det', split, file_name))
            coco['images'].append(
                dict(id=i, file_name=file_name, width=size, height=size))
        with open(
                osp.join(out_dir, 'det', 'annotations', f'{split}.json'),
                'w') as f:
            json.dump(coco, f)
        counts[split] = dict(canvases=num, digits=placed)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='root folder, e.g. data/digits_canvas')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--size', type=int, default=64, help='canvas side')
    parser.add_argument(
        '--digit', type=int, default=24, help='side of a placed digit')
    parser.add_argument(
        '--per-image', type=int, default=2, help='most digits a canvas')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    try:
        counts = write_canvases(args.out_dir, args.num_train, args.num_val,
                                args.size, args.digit, args.per_image,
                                args.seed)
    except ValueError as e:
        parser.error(str(e))
    for split, c in counts.items():
        print(f'{split}: {c["canvases"]} canvases, {c["digits"]} digits')


if __name__ == '__main__':
    main()
