"""Split lists and image labels in the VOC layout (METHOD.md §9), shared by tools/prepare_voc.py,
tools/prepare_coco.py and the synthetic dataset.

`prepare_voc(root)` writes into list_dir (default <root>/ImageSets/Segmentation): train_aug.txt
(every mask name not in the official val list), val.txt, test.txt when the official test list is
present, and cls_labels.npz (`names`, `labels` (N, K) uint8: classes present in each mask, 0 and
255 excluded). Every file is written atomically (temp file + os.replace).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from tqdm import tqdm

from utils.io import atomic_open
from utils.metrics import IGNORE_INDEX

from .voc import LABEL_FILE, default_list_dir, read_mask, read_name_list


def write_name_list(path: str, names: Sequence[str]) -> None:
    with atomic_open(path, "w") as f:
        f.write("".join(f"{n}\n" for n in names))


def write_cls_labels(path: str, names: Sequence[str], labels: np.ndarray) -> None:
    """names (N,), labels (N, K) 0/1 -> npz with a unicode `names` array (loads without pickle)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, names=np.asarray(list(names), dtype=str), labels=labels.astype(np.uint8))


def mask_classes(mask: np.ndarray, num_fg_classes: int) -> np.ndarray:
    """(H, W) uint8 -> (K,) uint8 presence of classes 1..K. Values outside 0..K and 255 raise."""
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if v > num_fg_classes and v != IGNORE_INDEX]
    if bad:
        raise ValueError(f"values {bad} outside 0..{num_fg_classes} and 255")
    return (counts[1:num_fg_classes + 1] > 0).astype(np.uint8)


def labels_from_masks(paths: Sequence[str], num_fg_classes: int,
                      progress: bool = True) -> np.ndarray:
    """(N, K) uint8 image labels from mask files; a bad mask raises naming its path."""
    labels = np.zeros((len(paths), num_fg_classes), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="masks", disable=not progress, unit="img")):
        try:
            labels[i] = mask_classes(read_mask(path), num_fg_classes)
        except ValueError as exc:
            msg = str(exc) if path in str(exc) else f"{path}: {exc}"
            raise ValueError(msg) from None
    return labels


def prepare_voc(root: str, list_dir: str | None = None, num_fg_classes: int = 20,
                mask_folder: str = "SegmentationClassAug", progress: bool = True) -> dict[str, int]:
    """Write lists + cls_labels.npz; num_fg_classes = K foreground classes. -> {list name: count}."""
    mask_dir = os.path.join(root, mask_folder)
    if not os.path.isdir(mask_dir):
        raise FileNotFoundError(f"mask folder not found: {mask_dir} (download SegmentationClassAug "
                                "and extract it into the VOC2012 folder)")
    official = default_list_dir(root)
    list_dir = list_dir or official
    masks = sorted(f[:-4] for f in os.listdir(mask_dir) if f.endswith(".png"))
    if not masks:
        raise FileNotFoundError(f"no .png masks in {mask_dir}")
    val_path = os.path.join(official, "val.txt")
    val = read_name_list(val_path) if os.path.isfile(val_path) else []
    missing = sorted(set(val) - set(masks))
    if missing:
        raise FileNotFoundError(f"{len(missing)} val names of {val_path} have no mask in "
                                f"{mask_dir} (first: {missing[0]}.png)")
    val_set = set(val)
    lists = {"train_aug": [n for n in masks if n not in val_set]}
    if val:
        lists["val"] = val
    test_path = os.path.join(official, "test.txt")
    if os.path.isfile(test_path):
        lists["test"] = read_name_list(test_path)

    labels = labels_from_masks([os.path.join(mask_dir, n + ".png") for n in masks], num_fg_classes,
                               progress)
    for split, names in lists.items():
        write_name_list(os.path.join(list_dir, f"{split}.txt"), names)
    write_cls_labels(os.path.join(list_dir, LABEL_FILE), masks, labels)
    return {split: len(names) for split, names in lists.items()}
