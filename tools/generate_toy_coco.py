"""Generate toy COCO: simple shapes of several classes on textured backgrounds, with boxes and instance masks.

Deterministic given the seed. Writes::

    data/toy_coco/
      train/000000.png ...   val/000000.png ...
      annotations/instances_train.json, instances_val.json   (COCO format, polygons)
      meta.json                                               (the generator's parameters)

Run ``python tools/generate_toy_coco.py`` (or let ``make demo`` do it); a second run with the same parameters
returns at once.
"""
import argparse
import json
import math
import os
import os.path as osp

import cv2
import numpy as np
from tqdm import tqdm

CLASSES = ('rectangle', 'ellipse', 'triangle')
# a hue per class (with jitter) so that a small detector trained from scratch on a CPU can learn it in minutes
CLASS_HUES = (10, 70, 130)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: low-frequency colour noise, stripes and fine grain."""
    grid = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.float32)
    img = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.3)
    stripes = 18 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    img = img * 0.7 + stripes[..., None] + rng.normal(0, 8, size=(size, size, 3))
    return img


def shape_polygon(rng: np.random.Generator, cls: int, size: int):
    """A polygon (K, 2) for one object of class ``cls``, inside the image."""
    r = rng.uniform(0.1, 0.22) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    theta = rng.uniform(0, math.pi)
    if cls == 0:  # rotated rectangle
        w, h = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 0.9)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif cls == 1:  # ellipse
        a, b = r, r * rng.uniform(0.5, 1.0)
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        corners = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    else:  # triangle
        t = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        corners = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    poly = corners @ rot.T + np.array([cx, cy])
    return np.clip(poly, 0, size - 1)


def colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    hsv = np.uint8([[[(CLASS_HUES[cls] + rng.integers(-8, 9)) % 180, rng.integers(150, 256), rng.integers(150,
                                                                                                          256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def make_image(rng: np.random.Generator, size: int, max_objects: int):
    img = texture(rng, size)
    occupied = np.zeros((size, size), np.int32)  # instance id per pixel, painter's order
    objects = []
    for obj_id in range(1, rng.integers(1, max_objects + 1) + 1):
        cls = int(rng.integers(len(CLASSES)))
        poly = shape_polygon(rng, cls, size)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        img[mask > 0] = colour(rng, cls) + rng.normal(0, 6, size=(int(mask.sum()), 3))
        occupied[mask > 0] = obj_id
        objects.append((cls, obj_id))
    annos = []
    for cls, obj_id in objects:
        mask = (occupied == obj_id).astype(np.uint8)
        if mask.sum() < 30:  # mostly covered by later objects
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        segs = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        if not segs:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0 = float(xs.min()), float(ys.min())
        annos.append(dict(category_id=cls + 1, segmentation=segs, area=float(mask.sum()), iscrowd=0,
                          bbox=[x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]))
    return np.clip(img, 0, 255).astype(np.uint8), annos


def generate(out_dir: str, num_train: int, num_val: int, size: int, max_objects: int, seed: int) -> None:
    params = dict(num_train=num_train, num_val=num_val, size=size, max_objects=max_objects, seed=seed, version=1)
    meta_path = osp.join(out_dir, 'meta.json')
    if osp.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == params:
                print(f'toy COCO already at {out_dir} ({num_train} train / {num_val} val images)')
                return
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)]
    for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 1)):
        rng = np.random.default_rng(split_seed)
        os.makedirs(osp.join(out_dir, split), exist_ok=True)
        images, annotations = [], []
        for idx in tqdm(range(count), desc=f'toy COCO {split}', unit='img'):
            img, annos = make_image(rng, size, max_objects)
            name = f'{idx:06d}.png'
            cv2.imwrite(osp.join(out_dir, split, name), img)
            images.append(dict(id=idx + 1, file_name=name, width=size, height=size))
            for anno in annos:
                annotations.append(dict(anno, id=len(annotations) + 1, image_id=idx + 1))
        with open(osp.join(out_dir, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    with open(meta_path, 'w') as f:
        json.dump(params, f)
    print(f'toy COCO written to {out_dir}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', default='data/toy_coco')
    parser.add_argument('--num-train', type=int, default=600)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--max-objects', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out_dir, args.num_train, args.num_val, args.size, args.max_objects, args.seed)


if __name__ == '__main__':
    main()
