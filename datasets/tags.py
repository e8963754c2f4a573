"""Your own images with image-level tags (`data.name=tags`), as written by tools/prepare_tags.py.

Layout at the import's output root (data.root):

    <root>/tags.json                          image_root, class names, import parameters (last)
    <root>/ImageSets/Segmentation/class_names.txt   the K foreground class names, one a line
    <root>/ImageSets/Segmentation/train.txt, val.txt   image paths relative to image_root
    <root>/ImageSets/Segmentation/cls_labels.npz       (N, K) image labels (datasets/voc_lists.py)
    <root>/masks/<image path>.png             optional masks (class indices 0..K, 255 ignore)

A list entry is the image's path relative to `image_root` with `/` separators, extension
included (`cats/Ünïcode name 01.JPG`): nested folders and any file name work without copying
or renaming, and `a.jpg` / `a.png` stay two images (the import refuses only names that a
one-line list cannot hold: a line break, or blank space at the start). Its mask is `masks/<entry>.png`. Stage
"val" returns the mask where one exists and an all-255 label (ignored by every metric) where
none does, so validation runs on tags alone (wetr/validate.py then reports the classifier).

K comes from class_names.txt: `resolve_classes(cfg.data)` sets data.num_classes = K + 1 (and the
training split to `train`), so the user never types K + 1.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from utils.metrics import IGNORE_INDEX

from .transforms import normalise
from .voc import LABEL_FILE, VOCDataset, default_list_dir, read_image, read_label

META_FILE = "tags.json"
CLASS_FILE = "class_names.txt"
MASK_FOLDER = "masks"
FORMAT = "more-tags"
TRAIN_SPLIT = "train"
RECIPE_NUM_CLASSES = 21     # the VOC recipe's value: with data.name=tags it means "not set"


def read_meta(root: str) -> dict | None:
    """The import's tags.json, or None when `root` is not a tag dataset."""
    try:
        with open(os.path.join(root, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def image_root(root: str) -> str:
    """Folder the list entries are relative to (tags.json's, relative to root unless absolute)."""
    try:
        stamp = os.stat(os.path.join(root, META_FILE)).st_mtime_ns
    except OSError:
        stamp = None
    return _image_root(root, stamp)


@functools.lru_cache(maxsize=16)
def _image_root(root: str, stamp: int | None) -> str:
    """Cached per (root, tags.json's mtime): the layout check asks once per listed image."""
    meta = read_meta(root)
    if meta is None:
        raise FileNotFoundError(f"{os.path.join(root, META_FILE)}: not a tag dataset; import one "
                                f"with: python tools/prepare_tags.py --images DIR --csv FILE "
                                f"--out {root}")
    return os.path.normpath(os.path.join(root, meta["image_root"]))


def read_class_file(path: str) -> list[str]:
    """The K foreground class names of class_names.txt (background is class 0, not listed)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"class-names file not found: {path}; import the dataset with "
                                f"python tools/prepare_tags.py") from None
    if not names:
        raise ValueError(f"{path}: no class names; write one foreground class a line")
    return names


def class_file(cfg_data: Any) -> str:
    list_dir = getattr(cfg_data, "list_dir", None) or default_list_dir(str(cfg_data.root))
    return os.path.join(list_dir, CLASS_FILE)


def resolve_classes(cfg_data: Any) -> None:
    """data.name=tags: data.num_classes = K + 1 from class_names.txt, and train_split `train`
    when the recipe's `train_aug` list does not exist. A num_classes that is neither K + 1 nor
    the VOC recipe's 21 (so typed by hand, and wrong) raises ValueError (one line). Other
    datasets: unchanged."""
    if cfg_data.name != "tags":
        return
    path = class_file(cfg_data)
    if not os.path.isfile(path):
        return      # the layout check says what is missing, with the command that fixes it
    k = len(read_class_file(path))
    given = int(cfg_data.num_classes)
    if given not in (k + 1, RECIPE_NUM_CLASSES):
        raise ValueError(f"data.num_classes={given} but {path} lists {k} classes (K + 1 = "
                         f"{k + 1}); leave data.num_classes out, it is read from that file")
    cfg_data.num_classes = k + 1
    list_dir = os.path.dirname(path)
    if (cfg_data.train_split == "train_aug"
            and not os.path.isfile(os.path.join(list_dir, "train_aug.txt"))):
        cfg_data.train_split = TRAIN_SPLIT


class TagDataset(VOCDataset):
    """Same stages and return types as `VOCDataset`; names are paths relative to image_root;
    stage "val" labels an image without a mask all 255."""

    image_folder = ""
    mask_folder = MASK_FOLDER
    default_aug = "voc"

    def __init__(self, root: str, split: str, stage: str, num_classes: int = 21, **kwargs):
        self._image_root = image_root(root)
        super().__init__(root, split, stage, num_classes=num_classes, **kwargs)

    @classmethod
    def image_path(cls, root: str, name: str) -> str:
        return os.path.join(image_root(root), name)

    @classmethod
    def mask_path(cls, root: str, name: str) -> str:
        return os.path.join(root, MASK_FOLDER, name + ".png")

    def _load(self, index: int):
        if self.stage != "val":
            return super()._load(index)
        name = self.names[index]
        image = read_image(os.path.join(self._image_root, name))
        mask_path = self.mask_path(self.root, name)
        if os.path.isfile(mask_path):
            label = read_label(mask_path, image)
        else:
            label = torch.full((image.height, image.width), IGNORE_INDEX, dtype=torch.long)
        return name, normalise(image), label, torch.from_numpy(self.labels[index])


__all__ = ["TagDataset", "class_file", "resolve_classes", "read_class_file", "read_meta",
           "image_root", "LABEL_FILE", "CLASS_FILE", "META_FILE", "MASK_FOLDER"]
