"""Write a keypoint data set of shapes in mmpose's COCO layout.

Each image holds filled quadrilaterals and triangles on a noisy background;
their corners are the keypoints. A shape's corners lie one in each quadrant
of its box (the annotation's tight box), so every keypoint has a name that
fixes it (``top_left``, ``top_right``, ``bottom_right``, ``bottom_left``); a
triangle lacks one of them (visibility 0). The layout is mmpose's top-down COCO layout::

    OUT/images/{train,val}/*.png
    OUT/annotations/{train,val}.json    (COCO keypoints: one box and four
                                         (x, y, v) triplets a shape)

for mmpose's ``CocoDataset`` (``data_mode='topdown'``) with the metainfo of
``configs/mmpose/`` and its ``CocoMetric`` (OKS) and ``PCKAccuracy``::

    python tools/misc/shapes_keypoints.py data/shapes_keypoints
"""
import argparse
import json
import os
import os.path as osp

import numpy as np

KEYPOINTS = ('top_left', 'top_right', 'bottom_right', 'bottom_left')
# Keypoints joined by the shape's edges, by index from 1 (COCO's skeleton).
SKELETON = [[1, 2], [2, 3], [3, 4], [4, 1]]


def corners(rng, box) -> np.ndarray:
    """Four corners (x, y) inside ``box`` (x0, y0, w, h), one a quadrant,
    in the order of ``KEYPOINTS``: a simple polygon whatever they are.

    Each coordinate lies in the outer 30 % of its side, so that any three
    of the corners also lie in the quadrants of their own tight box: the
    box of the annotation names them, for triangles too.
    """
    x0, y0, w, h = box
    low = rng.uniform(0, 0.3, size=(4, 2))
    high = rng.uniform(0.7, 1, size=(4, 2))
    fx = np.array([low[0, 0], high[1, 0], high[2, 0], low[3, 0]])
    fy = np.array([low[0, 1], low[1, 1], high[2, 1], high[3, 1]])
    return np.stack([x0 + fx * w, y0 + fy * h], axis=1)


def place(rng, size: int, count: int, low: int, high: int):
    """Boxes (x0, y0, w, h) of ``count`` shapes that do not overlap on a
    ``size`` image, sides from ``low`` to ``high`` (fewer where no free
    place was found)."""
    boxes = []
    for _ in range(50 * count):
        if len(boxes) == count:
            break
        w, h = rng.integers(low, high + 1, size=2)
        x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        if all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
               for bx, by, bw, bh in boxes):
            boxes.append((int(x), int(y), int(w), int(h)))
    return boxes


def draw(rng, size: int, per_image: int, low: int, high: int):
    """An RGB image and its shapes' keypoints, (N, 4, 3) as (x, y, v)."""
    from PIL import Image, ImageDraw
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    canvas = ImageDraw.Draw(image)
    shapes = []
    count = int(rng.integers(1, per_image + 1))
    for box in place(rng, size, count, low, high):
        points = corners(rng, box)
        visible = np.full(4, 2.0)
        if rng.random() < 0.5:  # a triangle: one corner missing
            visible[rng.integers(4)] = 0
        # A colour far from the background's, so that every shape shows.
        color = (background + rng.integers(96, 160, size=3)) % 256
        canvas.polygon([tuple(p) for p, v in zip(points, visible) if v],
                       fill=tuple(int(c) for c in color))
        keypoints = np.concatenate([points, visible[:, None]], axis=1)
        keypoints[visible == 0] = 0
        shapes.append(keypoints)
    return image, shapes


def write_shapes(out_dir: str,
                 num_train: int = 1000,
                 num_val: int = 200,
                 size: int = 96,
                 per_image: int = 2,
                 seed: int = 0) -> dict:
    """Write the train and val splits under ``out_dir``.

    Args:
        out_dir (str): Root folder of ``images/`` and ``annotations/``.
        num_train (int): Train images. Default: 1000.
        num_val (int): Validation images. Default: 200.
        size (int): Image side in pixels. Default: 96.
        per_image (int): Most shapes on an image (1 to this). Default: 2.
        seed (int): Seed of everything drawn. Default: 0.

    Returns:
        dict: Images and shapes written per split.
    """
    least = dict(num_train=1, num_val=1, per_image=1, size=32)
    given = dict(
        num_train=num_train, num_val=num_val, per_image=per_image, size=size)
    for name, value in given.items():
        if value < least[name]:
            raise ValueError(
                f'{name} must be at least {least[name]}, got {value}')
    low, high = size // 4, size // 2
    rng = np.random.default_rng(seed)
    counts = {}
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    for split, num in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(out_dir, 'images', split), exist_ok=True)
        coco = dict(
            images=[],
            annotations=[],
            categories=[
                dict(
                    id=1,
                    name='shape',
                    supercategory='shape',
                    keypoints=list(KEYPOINTS),
                    skeleton=SKELETON)
            ])
        for i in range(num):
            image, shapes = draw(rng, size, per_image, low, high)
            file_name = f'{i:05d}.png'
            image.save(osp.join(out_dir, 'images', split, file_name))
            coco['images'].append(
                dict(id=i, file_name=file_name, width=size, height=size))
            for keypoints in shapes:
                seen = keypoints[keypoints[:, 2] > 0, :2]
                x0, y0 = seen.min(0)
                w, h = seen.max(0) - seen.min(0)
                coco['annotations'].append(
                    dict(
                        id=len(coco['annotations']) + 1,
                        image_id=i,
                        category_id=1,
                        bbox=[round(float(v), 2) for v in (x0, y0, w, h)],
                        area=round(float(w * h), 2),
                        iscrowd=0,
                        num_keypoints=int((keypoints[:, 2] > 0).sum()),
                        keypoints=[
                            round(float(v), 2) for v in keypoints.ravel()
                        ]))
        with open(
                osp.join(out_dir, 'annotations', f'{split}.json'),
                'w',
                encoding='utf-8') as f:
            json.dump(coco, f)
        counts[split] = dict(images=num, shapes=len(coco['annotations']))
    return counts


def parse_args():
    parser = argparse.ArgumentParser(
        description='Write images of shapes whose corners are keypoints, '
        "in mmpose's COCO layout (images/{train,val}, "
        'annotations/{train,val}.json).')
    parser.add_argument('out_dir', help='folder to write the data set to')
    parser.add_argument('--num-train', type=int, default=1000)
    parser.add_argument('--num-val', type=int, default=200)
    parser.add_argument('--size', type=int, default=96, help='image side')
    parser.add_argument(
        '--per-image', type=int, default=2, help='most shapes an image')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    counts = write_shapes(args.out_dir, args.num_train, args.num_val,
                          args.size, args.per_image, args.seed)
    for split, count in counts.items():
        print(f'{split}: {count["images"]} images, {count["shapes"]} shapes '
              f'in {osp.join(args.out_dir, "annotations", split + ".json")}')


if __name__ == '__main__':
    main()
