"""The import's second half: val masks, the train / val split, and the atomic writes of the
tag-dataset layout (datasets/tags.py). `import_tags` runs every check first, then writes;
tags.json goes last, so a folder with it is complete, and a rerun with the same inputs writes
the same bytes (stale masks of an earlier run are removed)."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from utils.io import atomic_open, write_atomic
from utils.metrics import IGNORE_INDEX

from .tag_import import (ImageIndex, Imported, Source, Split, TagImportError, class_list,
                         folder_rows, image_size, read_csv, read_json, resolve_rows, scan_images,
                         tag_labels)
from .tags import CLASS_FILE, FORMAT, MASK_FOLDER, META_FILE, read_class_file
from .voc import LABEL_FILE, default_list_dir, read_mask, read_name_list
from .voc_lists import write_cls_labels, write_name_list

VERSION = 1


def find_masks(mask_dir: str, index: ImageIndex, labels: dict[str, np.ndarray],
               sizes: dict[str, tuple[int, int]]) -> tuple[dict[str, str], list[str]]:
    """{image entry: mask path} of the PNGs under mask_dir, each checked: an index PNG (L or P)
    of values 0..K and 255, its image's size (`sizes`: entry -> (H, W)), an image that has a
    row; and the entries whose mask shows other classes than their tags (not an error: a tiny
    object may be untagged, but worth a look)."""
    if not os.path.isdir(mask_dir):
        raise TagImportError(f"{mask_dir}: masks folder not found; fix: pass --masks DIR")
    k = len(next(iter(labels.values())))
    found: dict[str, str] = {}
    differ: list[str] = []
    for rel in scan_images(mask_dir):
        if not rel.lower().endswith(".png"):
            continue
        path = os.path.join(mask_dir, rel)
        name = index.find(rel[:-4], f"mask {path}")
        if name not in labels:
            raise TagImportError(f"mask {path}: its image {name} has no row in the tags; fix: "
                                 f"add a row for it or remove the mask")
        if name in found:
            raise TagImportError(f"mask {path}: {name} has a second mask ({found[name]}); fix: "
                                 f"keep one")
        try:
            mask = read_mask(path)
        except ValueError as exc:
            raise TagImportError(f"{exc}; fix: masks are 8-bit palette or grey PNGs of class "
                                 f"indices (0 background, 1..{k}, 255 ignore)") from None
        bad = sorted(set(np.unique(mask).tolist()) - set(range(k + 1)) - {IGNORE_INDEX})
        if bad:
            raise TagImportError(f"mask {path}: values {bad[:5]} outside 0..{k} and 255; fix: "
                                 f"class indices in the order of the class list")
        h, w = sizes[name]
        if mask.shape != (h, w):
            raise TagImportError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its "
                                 f"image {name} is {w}x{h}; fix: save the mask at the image's "
                                 f"size")
        found[name] = path
        shown = [v for v in np.unique(mask).tolist() if 0 < v <= k]
        if shown != [c + 1 for c in np.flatnonzero(labels[name])]:
            differ.append(name)
    return found, differ


def split_names(names: Sequence[str], masked: Sequence[str], split: Split,
                index: ImageIndex) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]}, each sorted. An explicit val list wins; else val holds
    every image with a mask, topped up to round(val_fraction * N) by a seeded draw."""
    listed = set(names)
    if split.val_list:
        try:
            keys = read_name_list(split.val_list)
        except FileNotFoundError:
            raise TagImportError(f"{split.val_list}: val list not found; fix: pass "
                                 f"--val-list FILE or --val-fraction") from None
        val = set()
        for i, key in enumerate(keys):
            name = index.find(key, f"{split.val_list} line {i + 1}")
            if name not in listed:
                raise TagImportError(f"{split.val_list} line {i + 1}: {name} has no row in the "
                                     f"tags; fix: add one or drop the line")
            val.add(name)
    else:
        if not 0 <= split.val_fraction < 1:
            raise TagImportError(f"--val-fraction {split.val_fraction} must be in [0, 1)")
        val = set(masked)
        rest = sorted(listed - val)
        want = max(0, int(round(split.val_fraction * len(names))) - len(val))
        order = np.random.default_rng(split.seed).permutation(len(rest))
        val |= {rest[i] for i in order[:want]}
    lists = {"train": sorted(listed - val), "val": sorted(val)}
    for s, other in (("train", "--val-fraction lower"), ("val", "--val-fraction higher")):
        if not lists[s]:
            raise TagImportError(f"the {s} split would be empty ({len(names)} images); fix: "
                                 f"{other} or another --val-list")
    return lists


def read_source(images: str, source: Source, out: str) -> tuple[ImageIndex, list, str]:
    """-> the image index, the rows (where, key, tags) and the class-list description."""
    paths = scan_images(images, skip=(out, os.path.join(out, MASK_FOLDER)))
    if not paths:
        raise TagImportError(f"{images}: no .jpg, .jpeg or .png images; fix: pass the folder "
                             f"that holds them (sub-folders are searched too)")
    index = ImageIndex(images, paths)
    if sum(x is not None and x is not False for x in (source.csv, source.json, source.folders)) != 1:
        raise TagImportError("give the tags once: --csv FILE, --json FILE or --folders")
    if source.csv:
        rows = read_csv(source.csv, read_class_file(source.classes) if source.classes else ())
    elif source.json:
        rows = read_json(source.json)
    else:
        rows = folder_rows(paths, images)
    if not rows:
        raise TagImportError(f"{source.csv or source.json}: no rows; fix: one row per image")
    return index, rows, source.classes or "the tags"


def import_tags(images: str, source: Source, out: str, split: Split | None = None,
                masks: str | None = None) -> Imported:
    """Check everything, then write the layout at `out` (module docstring). -> what was written."""
    split = split or Split()
    index, rows, class_source = read_source(images, source, out)
    classes = class_list(source, rows)
    labels = tag_labels(rows, classes, source.index_base, class_source)
    names = resolve_rows(rows, index)
    sizes: dict[str, tuple[int, int]] = {}
    for name, (where, _, _) in zip(names, rows):   # every listed image must open
        sizes[name] = image_size(os.path.join(images, name), where)
    by_name = dict(zip(names, labels))
    found, differ = find_masks(masks, index, by_name, sizes) if masks else ({}, [])
    lists = split_names(names, sorted(found), split, index)
    order = np.argsort(np.asarray(names, dtype=str), kind="stable")
    result = Imported(classes=classes, lists=lists, labels=labels[order],
                      names=[names[i] for i in order], masks=found,
                      unlisted=len(index.paths) - len(names),
                      untagged=int((labels.sum(1) == 0).sum()), differ=differ)
    write_layout(out, images, result, {"source": _describe(source), "val_fraction":
                                       split.val_fraction, "val_list": split.val_list,
                                       "seed": split.seed})
    return result


def _describe(source: Source) -> dict:
    return {k: v for k, v in vars(source).items() if v not in (None, False)}


def write_layout(out: str, images: str, result: Imported, params: dict) -> None:
    """Lists, labels, class names, masks, then tags.json (last: its presence means complete)."""
    list_dir = default_list_dir(out)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, META_FILE)
    if os.path.exists(meta_path):   # an earlier import: it is complete again only at the end
        os.remove(meta_path)
    with atomic_open(os.path.join(list_dir, CLASS_FILE), "w") as f:
        f.write("".join(f"{c}\n" for c in result.classes))
    for s, names in result.lists.items():
        write_name_list(os.path.join(list_dir, f"{s}.txt"), names)
    write_cls_labels(os.path.join(list_dir, LABEL_FILE), result.names, result.labels)
    _write_masks(os.path.join(out, MASK_FOLDER), result.masks)
    counts = {**{s: len(n) for s, n in result.lists.items()}, "masks": len(result.masks),
              "untagged": result.untagged}
    meta = {"format": FORMAT, "version": VERSION,
            "image_root": os.path.relpath(os.path.abspath(images), os.path.abspath(out)),
            "classes": result.classes, "counts": counts, **params}
    with atomic_open(meta_path, "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


def _write_masks(folder: str, masks: dict[str, str]) -> None:
    """Copy each mask to <folder>/<image entry>.png (atomic); remove masks of earlier runs."""
    keep = set()
    for name, src in masks.items():
        dst = os.path.join(folder, name + ".png")
        keep.add(os.path.normpath(dst))
        with open(src, "rb") as f:
            data = f.read()
        write_atomic(dst, lambda g: g.write(data), durable=False)
    for d, _, files in os.walk(folder, topdown=False):
        for f in files:
            if os.path.normpath(os.path.join(d, f)) not in keep:
                os.remove(os.path.join(d, f))
        if d != folder and not os.listdir(d):
            os.rmdir(d)
