"""VOC-style masks, split lists and image labels for MS COCO 2014 (METHOD.md §9).

    python -m tools.prepare_coco --root data/COCO --workers 8

Expects <root>/JPEGImages/{train2014,val2014}/COCO_*.jpg (the official zips, extracted) and
<root>/annotations/instances_{train,val}2014.json (`--ann-dir` to point elsewhere). Writes
- <root>/SegmentationClass/{train2014,val2014}/<12-digit id>.png: 8-bit L masks, one per image
  with at least one annotation (82081 train, 40137 val);
- into list_dir (default <root>/ImageSets/Segmentation): train.txt, val.txt, val_part.txt (the
  first 5000 val names) and cls_labels.npz (classes present in each mask, 0 and 255 excluded).
Names are the official file stems (COCO_val2014_000000000042), sorted.

Category ids are mapped to 1..K (K = 80) in increasing id order; 0 is background. Mask rules
(`--rule`; polygons and RLEs rasterised by pycocotools, as `annToMask`):
- area (default; the community COCO-to-VOC conversion behind the paper's masks): every
  annotation of the image, crowd ones included, is drawn from the smallest json `area` to the
  largest (ties in file order; a missing `area` counts the rasterised pixels), and a pixel keeps
  the first class drawn on it; no 255.
- strict: each class covers the union of its non-crowd instances; a pixel covered by two or more
  classes is 255, and so is every pixel inside a crowd region (iscrowd=1).

Resumable: an existing mask of the right size is kept (each PNG is written atomically, so one
that exists is complete); its labels are read back from it. Each mask folder records its rule
in a `.rule` file (none: strict, the rule before there was a choice); masks of another rule are
an error, not overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
from multiprocessing import Pool
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.coco import parse_name
from datasets.voc import LABEL_FILE, default_list_dir, read_cls_labels, read_mask
from datasets.voc_lists import mask_classes, write_cls_labels, write_name_list
from utils.errors import user_errors
from utils.io import atomic_open
from utils.metrics import IGNORE_INDEX

SUBSETS = {"train2014": "train", "val2014": "val"}  # image folder -> list name
VAL_PART = 5000
RULES = ("area", "strict")
RULE_FILE = ".rule"


def segm_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> (h, w) bool."""
    from pycocotools import mask as mask_utils
    if isinstance(segm, list):
        if not segm:
            return np.zeros((h, w), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool)


def compose_mask(anns: Sequence[tuple[int, int, Any, float | None]], h: int, w: int,
                 rule: str = "area") -> np.ndarray:
    """anns: (class 1..K, iscrowd, segmentation, json area or None) -> (h, w) uint8 by `rule`
    (module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown mask rule {rule!r}; expected one of {', '.join(RULES)}")
    masks = [(cls, iscrowd, segm_to_mask(segm, h, w), area) for cls, iscrowd, segm, area in anns]
    label = np.zeros((h, w), dtype=np.uint8)
    if rule == "area":
        # stable sort: equal areas keep the file's order
        order = sorted(range(len(masks)), key=lambda i: masks[i][3] if masks[i][3] is not None
                       else float(masks[i][2].sum()))
        for i in order:
            cls, _, m, _ = masks[i]
            label[m & (label == 0)] = cls
        return label
    unions: dict[int, np.ndarray] = {}
    crowd = np.zeros((h, w), dtype=bool)
    for cls, iscrowd, m, _ in masks:
        if iscrowd:
            crowd |= m
        else:
            unions[cls] = unions[cls] | m if cls in unions else m
    covered = np.zeros((h, w), dtype=np.uint8)
    for cls, m in unions.items():
        label[m] = cls
        covered += m
    label[(covered > 1) | crowd] = IGNORE_INDEX
    return label


def _convert(task: tuple) -> np.ndarray:
    """Write one mask unless a complete one exists; -> (K,) image label read from the mask."""
    path, h, w, anns, num_classes, rule = task
    if os.path.isfile(path):
        try:
            mask = read_mask(path)
            if mask.shape == (h, w):
                return mask_classes(mask, num_classes)
        except ValueError:
            pass  # unreadable leftover: rewrite it
    mask = compose_mask(anns, h, w, rule)
    with atomic_open(path, "wb") as f:
        Image.fromarray(mask).save(f, format="PNG")
    return mask_classes(mask, num_classes)


def _load_tasks(ann_path: str, mask_dir: str, cat_ids: list[int] | None, rule: str):
    """-> names, tasks, sorted category ids (from the json)."""
    try:
        with open(ann_path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {ann_path} (download "
                                "annotations_trainval2014.zip from cocodataset.org)") from None
    ids = sorted(c["id"] for c in data["categories"])
    if cat_ids is not None and ids != cat_ids:
        raise ValueError(f"{ann_path}: categories differ from the other annotation file")
    index = {cid: i + 1 for i, cid in enumerate(ids)}
    per_image: dict[int, list] = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(
            (index[a["category_id"]], int(a.get("iscrowd", 0)), a["segmentation"], a.get("area")))
    tasks = []
    for img in sorted(data["images"], key=lambda im: im["file_name"]):
        if img["id"] not in per_image:
            continue  # images without any annotation are not listed (as in the usual lists)
        name = os.path.splitext(img["file_name"])[0]
        _, image_id = parse_name(name)
        path = os.path.join(mask_dir, image_id + ".png")
        tasks.append((name, (path, img["height"], img["width"], per_image[img["id"]], len(ids),
                             rule)))
    return [n for n, _ in tasks], [t for _, t in tasks], ids


def _check_rule(mask_dir: str, rule: str) -> None:
    """Existing masks are resumed only if they were written by `rule` (ValueError otherwise)."""
    marker = os.path.join(mask_dir, RULE_FILE)
    if not os.path.isdir(mask_dir) or not any(f.endswith(".png") for f in os.listdir(mask_dir)):
        return
    # masks written before the rule file existed follow the only rule there was: strict
    old = open(marker).read().strip() if os.path.isfile(marker) else "strict"
    if old != rule:
        raise ValueError(f"{mask_dir} holds masks written by rule {old!r}, not {rule!r}: remove "
                         f"the folder to rewrite them, or pass --rule {old}")


def prepare_coco(root: str, ann_dir: str | None = None, list_dir: str | None = None,
                 subsets: Sequence[str] = tuple(SUBSETS), workers: int = 1,
                 rule: str = "area") -> dict[str, int]:
    """Masks (by `rule`, module docstring) + lists + cls_labels.npz. -> {list name: count}."""
    ann_dir = ann_dir or os.path.join(root, "annotations")
    list_dir = list_dir or default_list_dir(root)
    if rule not in RULES:
        raise ValueError(f"unknown mask rule {rule!r}; expected one of {', '.join(RULES)}")
    for subset in subsets:   # every check before anything is written
        if subset not in SUBSETS:
            raise ValueError(f"unknown subset {subset!r}; expected train2014 or val2014")
        _check_rule(os.path.join(root, "SegmentationClass", subset), rule)
    all_names: list[str] = []
    all_labels: list[np.ndarray] = []
    counts: dict[str, int] = {}
    cat_ids = None
    for subset in subsets:
        ann_path = os.path.join(ann_dir, f"instances_{subset}.json")
        mask_dir = os.path.join(root, "SegmentationClass", subset)
        names, tasks, cat_ids = _load_tasks(ann_path, mask_dir, cat_ids, rule)
        os.makedirs(mask_dir, exist_ok=True)
        with atomic_open(os.path.join(mask_dir, RULE_FILE), "w") as f:
            f.write(rule + "\n")
        bar = dict(total=len(tasks), desc=subset, unit="img")
        if workers > 1:
            with Pool(workers) as pool:
                labels = list(tqdm(pool.imap(_convert, tasks, chunksize=32), **bar))
        else:
            labels = [_convert(t) for t in tqdm(tasks, **bar)]
        split = SUBSETS[subset]
        write_name_list(os.path.join(list_dir, f"{split}.txt"), names)
        counts[split] = len(names)
        if split == "val":
            write_name_list(os.path.join(list_dir, "val_part.txt"), names[:VAL_PART])
            counts["val_part"] = min(len(names), VAL_PART)
        all_names += names
        all_labels += labels
    labels = np.stack(all_labels) if all_labels else np.zeros((0, len(cat_ids or [])), np.uint8)
    label_path = os.path.join(list_dir, LABEL_FILE)
    if os.path.isfile(label_path):  # keep the rows of subsets not converted in this run
        old_names, old_labels = read_cls_labels(label_path)
        done = set(all_names)
        keep = [i for i, n in enumerate(old_names) if n not in done]
        if keep and old_labels.shape[1] == labels.shape[1]:
            all_names = [old_names[i] for i in keep] + all_names
            labels = np.concatenate([old_labels[keep], labels])
    order = np.argsort(all_names, kind="stable")
    write_cls_labels(label_path, [all_names[i] for i in order], labels[order])
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="COCO folder holding JPEGImages/")
    parser.add_argument("--ann-dir", default=None, help="default <root>/annotations")
    parser.add_argument("--list-dir", default=None,
                        help="folder for lists and labels (default <root>/ImageSets/Segmentation)")
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=list(SUBSETS))
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--rule", choices=RULES, default="area",
                        help="area (default): the paper's masks; every annotation, crowd ones "
                        "included, drawn from the smallest json area to the largest, a pixel "
                        "keeps the first class drawn on it, no 255. strict: 255 where two "
                        "classes overlap and on crowd regions")
    args = parser.parse_args(argv)
    with user_errors():
        counts = prepare_coco(args.root, args.ann_dir, args.list_dir, args.subsets, args.workers,
                              rule=args.rule)
    out = args.list_dir or default_list_dir(args.root)
    written = ", ".join(f"{k}.txt ({v})" for k, v in counts.items())
    print(f"wrote {written} and {LABEL_FILE} to {out}")


if __name__ == "__main__":
    main()
