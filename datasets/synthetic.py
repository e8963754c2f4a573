"""A small synthetic dataset in exactly the VOC layout, learnable from image labels alone.

    python -m datasets.synthetic --out data/synthetic   # K=4, 600 train_aug / 100 val, 128 px

Writes <out>/JPEGImages/*.jpg, <out>/SegmentationClassAug/*.png (L-mode, values 0..K, 255 on a
thin band along every object boundary, as VOC), <out>/ImageSets/Segmentation/{train_aug,val}.txt
and cls_labels.npz (through `tools.prepare_voc`, the code used for the real dataset), then
<out>/synthetic.json with the parameters, last: a run with the same parameters finds it and
skips. Train with `data.root=<out> data.num_classes=K+1`.

    python -m datasets.synthetic --out data/synthetic_tags --format tags

writes the same images as a user's own data would come (photos/ with odd, nested names, JPEG
and PNG, tags.csv, classes.txt, val_masks/, val_list.txt) and imports them with the code of
tools/prepare_tags.py: train with `data.name=tags data.root=<out>` (K read from the import).

Class c is a shape family (ellipse, box, triangle, cross) combined with a texture (checker,
stripes, dots, rings). Each object's two texture colours are a light and a dark shade of one hue
drawn around the class's hue with a Gaussian jitter of half the hue spacing, with random
saturation and value: neighbouring classes overlap, so colour is a cue a tiny ViT picks up early
but not the class (a nearest-mean colour classifier is right for about 3/4 of the objects at
K=4); shape and texture settle the rest. Each image has 1-3 objects of 1-2 classes with random
position, size and orientation, on a cluttered background (smooth colour noise, solid blobs, lines
and faint textured patches, mostly muted, some vivid), plus pixel noise and JPEG compression.
Every image is a pure function of (seed, split, index); 700 images take a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from utils.errors import user_errors
from utils.io import atomic_open

from .voc_lists import prepare_voc, write_name_list

SHAPES = ("ellipse", "box", "triangle", "cross")
TEXTURES = ("checker", "stripes", "dots", "rings")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
PARAMS_FILE = "synthetic.json"
VERSION = 2
FORMATS = ("voc", "tags")
TAG_SOURCES = ("photos", "val_masks", "tags.csv", "classes.txt", "val_list.txt")


def class_recipe(c: int) -> tuple[str, str]:
    """Foreground class index c (0-based) -> (shape, texture); distinct for c < 16."""
    s = c % len(SHAPES)
    return SHAPES[s], TEXTURES[(s + c // len(SHAPES)) % len(TEXTURES)]


def class_names(num_fg_classes: int) -> list[str]:
    """["background", "ellipse-checker", ...] for K = num_fg_classes foreground classes."""
    return ["background"] + ["-".join(class_recipe(c)) for c in range(num_fg_classes)]


def _object_colours(rng: np.random.Generator, cls: int, num_fg_classes: int,
                    min_diff: float = 60) -> tuple[np.ndarray, np.ndarray]:
    """The two texture colours of one object: a light and a dark shade of one hue drawn around
    the class's own hue with a Gaussian jitter of half the hue spacing, so neighbouring classes
    overlap: colour is a cue, never the class."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        hue = (cls + rng.normal(0, 0.5)) * 180 / num_fg_classes % 180
        hsv = np.array([[[hue, rng.uniform(120, 255), rng.uniform(150, 255)],
                         [hue, rng.uniform(120, 255), rng.uniform(20, 130)]]], dtype=np.uint8)
        a, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float64)
        if abs(luma @ (a - b)) >= min_diff:
            return (a, b) if rng.random() < 0.5 else (b, a)


def _pattern(texture: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, theta: float,
             period: float) -> np.ndarray:
    """(S, S) bool texture in the object's rotated frame, centred at (cx, cy)."""
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if texture == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if texture == "stripes":
        return np.floor(u / period) % 2 == 0
    if texture == "dots":
        q = 1.7 * period
        return ((u % q - q / 2) ** 2 + (v % q - q / 2) ** 2) < (0.33 * q) ** 2
    if texture == "rings":
        return np.floor(np.hypot(u, v) / period) % 2 == 0
    raise ValueError(texture)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float,
                rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool filled shape of radius ~r centred at (cx, cy), rotated by angle (degrees)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    if shape == "ellipse":
        axes = (int(round(r)), int(round(r * rng.uniform(0.55, 0.9))))
        cv2.ellipse(canvas, (int(round(cx)), int(round(cy))), axes, angle, 0, 360, 1, -1)
    elif shape == "box":
        box = cv2.boxPoints(((cx, cy), (1.8 * r, 1.8 * r * rng.uniform(0.5, 0.85)), angle))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    elif shape == "triangle":
        t = np.deg2rad(angle + np.array([0.0, 120.0, 240.0]) + rng.uniform(-12, 12, 3))
        pts = np.stack([cx + 1.15 * r * np.cos(t), cy + 1.15 * r * np.sin(t)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    elif shape == "cross":
        arm = rng.uniform(0.55, 0.75) * r
        for a in (angle, angle + 90):
            box = cv2.boxPoints(((cx, cy), (2.1 * r, arm), a))
            cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    else:
        raise ValueError(shape)
    return canvas.astype(bool)


def _muted(rng: np.random.Generator, chroma: float = 20.0) -> np.ndarray:
    """A greyish RGB colour (grey level 40..215 plus a little chroma)."""
    return rng.uniform(40, 215) + rng.normal(0, chroma, 3)


def _background(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(S, S, 3) float clutter: smooth colour noise, solid blobs, lines, faint textured patches;
    mostly muted colours (scenes whose objects stand out), with some vivid blobs and lines."""
    low = cv2.resize(rng.normal(0, 1, (5, 5, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
    img = _muted(rng) + low * rng.uniform(10, 30)
    for _ in range(rng.integers(0, 3)):  # faint textured patch, same families as the objects
        centre, radius = rng.uniform(0, size, 2), rng.uniform(0.15, 0.35) * size
        patch = _shape_mask("ellipse", size, *centre, radius, rng.uniform(0, 180), rng)
        a = _muted(rng)
        b = a + rng.uniform(-25, 25, 3)
        tex = _pattern(TEXTURES[rng.integers(len(TEXTURES))], xx, yy, *rng.uniform(0, size, 2),
                       rng.uniform(0, np.pi), rng.uniform(0.035, 0.06) * size)
        img[patch] = np.where(tex[patch, None], a, b)
    for _ in range(rng.integers(2, 7)):  # solid blobs: random convex polygons and ellipses
        c, r = rng.uniform(0, size, 2), rng.uniform(0.04, 0.13) * size
        if rng.random() < 0.5:
            blob = _shape_mask("ellipse", size, *c, r, rng.uniform(0, 180), rng)
        else:
            t = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(4, 8)))
            pts = np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1)
            canvas = np.zeros((size, size), dtype=np.uint8)
            cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
            blob = canvas.astype(bool)
        img[blob] = rng.uniform(0, 255, 3) if rng.random() < 0.1 else _muted(rng, 25)
    img = np.ascontiguousarray(img)
    for _ in range(rng.integers(1, 6)):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        colour = rng.uniform(0, 255, 3) if rng.random() < 0.4 else _muted(rng)
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q),
                 tuple(float(v) for v in colour), int(rng.integers(1, 3)))
    return img


def render(rng: np.random.Generator, num_fg_classes: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image (S, S, 3) uint8 RGB, mask (S, S) uint8 (0..K, 255 boundary band)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = _background(rng, size, xx, yy)
    n_present = 1 if rng.random() < 0.55 else min(2, num_fg_classes)
    present = rng.choice(num_fg_classes, n_present, replace=False)
    n_obj = int(rng.integers(n_present, 4))
    classes = list(present) + list(rng.choice(present, n_obj - n_present))
    label = np.zeros((size, size), dtype=np.uint8)
    for cls in classes:
        shape, texture = class_recipe(int(cls))
        for _ in range(50):  # place with little overlap so every object stays recognisable
            lo, hi = (0.2, 0.33) if n_obj == 1 else (0.14, 0.24)
            r = rng.uniform(lo, hi) * size
            cx, cy = rng.uniform(0.12 * size, 0.88 * size, 2)
            m = _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 360), rng)
            area = m.sum()
            if area > 0.02 * size * size and (m & (label > 0)).sum() <= 0.1 * area:
                break
        else:
            continue
        a, b = _object_colours(rng, int(cls), num_fg_classes)
        period = rng.uniform(0.035, 0.055) * size
        tex = _pattern(texture, xx, yy, cx, cy, rng.uniform(0, np.pi), period)
        img[m] = np.where(tex[m, None], a, b)
        label[m] = cls + 1
    img += rng.normal(0, rng.uniform(3, 9), img.shape)
    kernel = np.ones((3, 3), np.uint8)
    label[cv2.dilate(label, kernel) != cv2.erode(label, kernel)] = 255
    return np.clip(img, 0, 255).astype(np.uint8), label


@dataclass(frozen=True)
class SyntheticParams:
    """Which synthetic dataset: K = num_fg_classes foreground classes, num_train / num_val
    images of size x size pixels, the seed every image is drawn from, and the layout (fmt
    "voc", or "tags": images with odd names imported as data.name=tags)."""
    num_fg_classes: int = 4
    num_train: int = 600
    num_val: int = 100
    size: int = 128
    seed: int = 0
    fmt: str = "voc"

    def record(self) -> dict:
        """The parameters as synthetic.json holds them."""
        params = dict(version=VERSION, num_fg_classes=self.num_fg_classes,
                      num_train=self.num_train, num_val=self.num_val, size=self.size,
                      seed=self.seed, class_names=class_names(self.num_fg_classes))
        if self.fmt != "voc":   # VOC-layout sets keep the parameters (and files) they always had
            params["format"] = self.fmt
        return params


def read_params(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, PARAMS_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def tag_file_name(split: str, i: int) -> str:
    """Relative path of a tags-format image: nested folders, spaces, non-ASCII, both suffixes."""
    folder = "nested dir/ünïcode" if i % 3 == 0 else ("flat" if i % 3 == 1 else "")
    name = f"{split} Ünïcode #{i:04d} (copy).{'png' if i % 4 == 0 else 'jpg'}"
    return f"{folder}/{name}" if folder else name


def make_synthetic(out_dir: str, p: SyntheticParams = SyntheticParams(), force: bool = False,
                   progress: bool = True) -> bool:
    """Write the dataset `p`. -> False when an identical one already exists (nothing written;
    `force` rewrites it), True otherwise. p.fmt "voc": the VOC layout; "tags":
    `write_tag_sources` then the tag import (datasets/tags.py; train with data.name=tags
    data.root=out_dir)."""
    if not 1 <= p.num_fg_classes <= MAX_CLASSES:
        raise ValueError(f"num_fg_classes must be in 1..{MAX_CLASSES}; got {p.num_fg_classes}")
    if p.fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {p.fmt!r}")
    params = p.record()
    old = read_params(out_dir)
    if old == params and not force:
        return False
    if old is not None:  # our own dataset with other parameters: start clean, no stale files
        os.remove(os.path.join(out_dir, PARAMS_FILE))
        for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets", "masks", "tags.json",
                    *TAG_SOURCES):
            path = os.path.join(out_dir, sub)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.remove(path)
    names = {split: [f"{split}_{i:05d}" for i in range(n)]
             for split, n in (("train", p.num_train), ("val", p.num_val))}
    if p.fmt == "tags":
        write_tag_sources(out_dir, p, names, progress)
    else:
        _write_voc(out_dir, p, names, progress)
    with atomic_open(os.path.join(out_dir, PARAMS_FILE), "w") as f:
        json.dump(params, f, indent=1)
    return True


def _samples(names: dict[str, list[str]], p: SyntheticParams, progress: bool):
    """Yields (split, index, name, image (S, S, 3) RGB, mask (S, S)); a pure function of
    (p.seed, split, index)."""
    jobs = [(s, i, n) for s, (split, ns) in enumerate(names.items()) for i, n in enumerate(ns)]
    for split_id, i, name in tqdm(jobs, desc="synthetic", disable=not progress, unit="img"):
        image, mask = render(np.random.default_rng([p.seed, split_id, i]), p.num_fg_classes,
                             p.size)
        yield list(names)[split_id], i, name, image, mask


def _write_voc(out_dir: str, p: SyntheticParams, names: dict[str, list[str]],
               progress: bool) -> None:
    img_dir = os.path.join(out_dir, "JPEGImages")
    mask_dir = os.path.join(out_dir, "SegmentationClassAug")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for _, _, name, image, mask in _samples(names, p, progress):
        cv2.imwrite(os.path.join(img_dir, name + ".jpg"), image[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(os.path.join(mask_dir, name + ".png"), mask)
    # the "official" val list, from which prepare_voc derives train_aug exactly as for VOC
    write_name_list(os.path.join(out_dir, "ImageSets", "Segmentation", "val.txt"), names["val"])
    prepare_voc(out_dir, num_fg_classes=p.num_fg_classes, progress=False)


def write_tag_sources(out_dir: str, p: SyntheticParams, names: dict[str, list[str]],
                      progress: bool) -> None:
    """What a user brings, then the import: photos/ (odd names, nested, JPEG and PNG),
    tags.csv (`image,tags`, names joined by `;`), classes.txt, val_masks/ (a palette-free index
    PNG per val image, named like its image), val_list.txt; then `import_tags` into out_dir."""
    from .tag_dataset_writer import import_tags
    from .tag_import import Source, Split

    photos, masks = (os.path.join(out_dir, d) for d in ("photos", "val_masks"))
    classes = class_names(p.num_fg_classes)[1:]
    rows, val = [], []
    for split, i, _, image, mask in _samples(names, p, progress):
        rel = tag_file_name(split, i)
        path = os.path.join(photos, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        suffix = os.path.splitext(rel)[1]
        _, data = cv2.imencode(suffix, image[:, :, ::-1],
                               [cv2.IMWRITE_JPEG_QUALITY, 90] if suffix == ".jpg" else [])
        with atomic_open(path, "wb") as f:
            f.write(data.tobytes())
        present = [classes[c - 1] for c in np.unique(mask) if 0 < c <= p.num_fg_classes]
        rows.append(f'"{rel}",{";".join(present)}\n')
        if split == "val":
            val.append(rel)
            _, data = cv2.imencode(".png", mask)
            with atomic_open(os.path.join(masks, rel + ".png"), "wb") as f:
                f.write(data.tobytes())
    with atomic_open(os.path.join(out_dir, "tags.csv"), "w") as f:
        f.write("image,tags\n" + "".join(rows))
    with atomic_open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(f"{c}\n" for c in classes))
    write_name_list(os.path.join(out_dir, "val_list.txt"), val)
    import_tags(photos, Source(csv=os.path.join(out_dir, "tags.csv"),
                               classes=os.path.join(out_dir, "classes.txt")),
                out_dir, Split(val_list=os.path.join(out_dir, "val_list.txt")), masks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic VOC-layout dataset.")
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--num-fg-classes", type=int, default=4, help="foreground classes K")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="voc",
                        help="voc: the VOC layout; tags: images with odd names + tags.csv + val "
                        "masks, imported as data.name=tags (tools/prepare_tags.py)")
    parser.add_argument("--force", action="store_true", help="rewrite even if up to date")
    args = parser.parse_args(argv)
    with user_errors():
        wrote = make_synthetic(args.out, SyntheticParams(args.num_fg_classes, args.train, args.val,
                                                         args.size, args.seed, args.format),
                               force=args.force)
    state = "wrote" if wrote else "up to date:"
    how = (f"data.name=tags data.root={args.out}" if args.format == "tags" else
           f"data.root={args.out} data.num_classes={args.num_fg_classes + 1}")
    train = "train_aug" if args.format == "voc" else "train"
    print(f"{state} {args.out} ({args.train} {train} / {args.val} val, K={args.num_fg_classes}, "
          f"{args.size}px, {args.format} format); train with {how}")


if __name__ == "__main__":
    main()
