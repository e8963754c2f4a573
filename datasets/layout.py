"""Dataset layout check, run before training and evaluation.

`check_layout(cfg.data, [train_split, val_split])` verifies, in order: the data root and its
image / mask folders; each split list; the image-label file (loads without pickle, K columns,
a row for every listed name); that every listed image and mask exists (all names: a directory
listing, cheap even for COCO); and for the first `max_masks` names of each split (default 1500:
all of VOC val and of the synthetic set, a prefix of VOC train_aug and COCO; None checks all) that
the mask decodes, holds only 0..K and 255, has its image's size, and agrees with its image label.
The "test" split needs neither masks nor labels. A tag dataset (data.name=tags, datasets/tags.py)
is checked by `_check_tags`: tags.json, its image folder, class_names.txt against
data.num_classes, the lists and labels as above, every listed image, and the masks it has
(optional; values and size, not their agreement with the tags). Each problem raises
`LayoutError` with one line: the path, what is wrong, and the command that fixes it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence

import numpy as np

from utils.errors import UserError
from utils.metrics import IGNORE_INDEX

from .coco import COCODataset
from .synthetic import read_params
from .tags import META_FILE, TagDataset, class_file, image_root, read_class_file, read_meta
from .voc import (LABEL_FILE, VOCDataset, default_list_dir, image_size, read_cls_labels,
                  read_mask, read_name_list)

_CLASSES = {"voc": VOCDataset, "coco": COCODataset}


class LayoutError(UserError, ValueError):
    """The dataset on disk does not match what the config expects (one-line message)."""


def _prepare_command(name: str, root: str, list_dir: str | None, num_fg: int) -> str:
    params = read_params(root)
    if params is not None:
        k = params.get("num_fg_classes", num_fg)   # datasets written before the key's rename
        return (f"python -m datasets.synthetic --out {root} --num-fg-classes {k} "
                f"--train {params['num_train']} --val {params['num_val']} --size {params['size']} "
                f"--seed {params['seed']} --force")
    extra = f" --list-dir {list_dir}" if list_dir else ""
    if name == "coco":
        return f"python -m tools.prepare_coco --root {root}{extra}"
    if num_fg != 20:
        extra += f" --num-fg-classes {num_fg}"
    return f"python -m tools.prepare_voc --root {root}{extra}"


def _download_hint(name: str, root: str) -> str:
    if name == "coco":
        return (f"extract the COCO 2014 train2014/val2014 images into {root}/JPEGImages and the "
                f"annotations into {root}/annotations, then run: "
                f"python -m tools.prepare_coco --root {root}")
    return (f"extract VOCdevkit/VOC2012 and SegmentationClassAug (see README) there and run: "
            f"python -m tools.prepare_voc --root {root}, or set data.root (a demo set: "
            f"python -m datasets.synthetic --out {root})")


def _fail(path: str, problem: str, how: str) -> NoReturn:
    raise LayoutError(f"{path}: {problem}; fix: {how}")


def check_layout(cfg_data: Any, splits: Sequence[str], max_masks: int | None = 1500) -> None:
    """cfg_data: attribute access to name, root, list_dir, num_classes (K + 1)."""
    name, root = cfg_data.name, str(cfg_data.root)
    if name == "tags":
        return _check_tags(cfg_data, splits, max_masks)
    if name not in _CLASSES:
        raise LayoutError(f"unknown dataset {name!r}; fix: set data.name to voc, coco or tags")
    dataset = _CLASSES[name]
    given_list_dir = getattr(cfg_data, "list_dir", None) or None
    list_dir = given_list_dir or default_list_dir(root)
    num_fg = int(cfg_data.num_classes) - 1
    fix = "run: " + _prepare_command(name, root, given_list_dir, num_fg)
    download = fix if read_params(root) else _download_hint(name, root)  # synthetic: regenerate

    if not os.path.isdir(root):
        _fail(root, "data root not found", _download_hint(name, root))
    for folder in (dataset.image_folder, dataset.mask_folder):
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            _fail(path, "folder not found",
                  fix if name == "coco" and folder == dataset.mask_folder else download)
    lists = _read_lists(dataset, root, list_dir, splits, fix)
    rows = _read_labels(list_dir, lists, num_fg, fix, read_params(root))
    _check_files(_Place(dataset, root, list_dir, num_fg, fix, download), lists, rows, max_masks)


@dataclass(frozen=True)
class _Place:
    """A VOC / COCO dataset on disk and what to tell its user: `fix`, the command that rebuilds
    lists and labels; `download`, how to get missing images."""
    dataset: Any   # the dataset class: image_path / mask_path
    root: str
    list_dir: str
    num_fg: int
    fix: str
    download: str


def _read_lists(dataset, root: str, list_dir: str, splits: Sequence[str],
                fix: str) -> dict[str, list[str]]:
    """{split: names}; every list present, non-empty, with names the dataset can place."""
    lists: dict[str, list[str]] = {}
    for split in splits:
        path = os.path.join(list_dir, f"{split}.txt")
        if not os.path.isfile(path):
            _fail(path, f"split list {split!r} not found", fix)
        lists[split] = read_name_list(path)
        if not lists[split]:
            _fail(path, "split list is empty", fix)
        for n in lists[split]:
            try:
                dataset.image_path(root, n)
            except ValueError as exc:  # a COCO name that is not COCO_<subset>_<id>
                _fail(path, str(exc), fix)
    return lists


def _read_labels(list_dir: str, lists: dict[str, list[str]], num_fg: int, fix: str,
                 synthetic: bool) -> dict[str, Any]:
    """{name: (K,) labels} of the image-label file, which must cover every labelled split."""
    labelled = [s for s in lists if s != "test"]
    if not labelled:
        return {}
    path = os.path.join(list_dir, LABEL_FILE)
    if not os.path.isfile(path):
        _fail(path, "image-label file not found", fix)
    try:
        names, labels = read_cls_labels(path)
    except ValueError as exc:
        _fail(path, str(exc).replace(f" {path}", ""), fix)
    if labels.shape[1] != num_fg:
        how = f"set data.num_classes={labels.shape[1] + 1} (K + 1)"
        _fail(path, f"labels have {labels.shape[1]} classes but data.num_classes={num_fg + 1} "
                    f"means {num_fg}", how if synthetic else f"{how}, or {fix}")
    rows = dict(zip(names, labels))
    for split in labelled:
        missing = [n for n in lists[split] if n not in rows]
        if missing:
            _fail(path, f"no labels for {len(missing)} of the {len(lists[split])} names in "
                        f"{split}.txt (first: {missing[0]}); the file is stale", fix)
    return rows


class _Listing:
    """Whether a file exists, from one directory listing per folder (cheap even for COCO)."""

    def __init__(self):
        self.folders: dict[str, set[str]] = {}

    def __call__(self, path: str) -> bool:
        folder, base = os.path.split(path)
        if folder not in self.folders:
            self.folders[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return base in self.folders[folder]


def _check_files(place: _Place, lists: dict[str, list[str]], rows: dict[str, Any],
                 max_masks: int | None) -> None:
    """Every listed image (and mask) exists; the first `max_masks` masks of each labelled split
    hold class indices, match their image's size and agree with the image labels."""
    exists = _Listing()
    dataset, root = place.dataset, place.root
    for split, names in lists.items():
        list_path = os.path.join(place.list_dir, f"{split}.txt")
        for n in names:
            image = dataset.image_path(root, n)
            if not exists(image):
                _fail(image, f"image listed in {list_path} not found", place.download)
            if split != "test" and not exists(dataset.mask_path(root, n)):
                _fail(dataset.mask_path(root, n), f"mask listed in {list_path} not found",
                      place.fix)
        if split == "test":
            continue
        for n in names[:max_masks]:
            _check_mask(place, n, rows[n])


def _mask_values(path: str, num_fg: int, fix: str, values_fix: str) -> tuple[np.ndarray, set[int]]:
    """The mask at `path` and the values it holds, which must be 0..num_fg or 255."""
    try:
        mask = read_mask(path)
    except ValueError as exc:
        _fail(path, str(exc).replace(f" {path}", ""), fix)
    values = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist())
    bad = sorted(v for v in values if v > num_fg and v != IGNORE_INDEX)
    if bad:
        _fail(path, f"mask values {bad[:5]} outside 0..{num_fg} and 255", values_fix)
    return mask, values


def _check_size(mask: np.ndarray, path: str, image: str, fix: str, image_fix: str) -> None:
    """The mask at `path` has the size of `image` (read from its header only)."""
    try:
        size = image_size(image)
    except ValueError as exc:
        _fail(image, str(exc), image_fix)
    if mask.shape != size:
        _fail(path, f"mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                    f"{size[0]}x{size[1]}", fix)


def _check_mask(place: _Place, n: str, row) -> None:
    path = place.dataset.mask_path(place.root, n)
    mask, values = _mask_values(
        path, place.num_fg, place.fix,
        f"masks must hold class indices (e.g. SegmentationClassAug, not RGB colour masks) and "
        f"data.num_classes must be K+1; then {place.fix}")
    _check_size(mask, path, place.dataset.image_path(place.root, n), place.fix,
                f"replace the file; {place.download}")
    present = [v for v in range(1, place.num_fg + 1) if v in values]
    labelled_as = [i + 1 for i in range(place.num_fg) if row[i]]
    if present != labelled_as:
        _fail(os.path.join(place.list_dir, LABEL_FILE), f"labels of {n} {labelled_as} differ "
              f"from the classes in its mask {present}; the file is stale", place.fix)


def _check_tags(cfg_data: Any, splits: Sequence[str], max_masks: int | None) -> None:
    """The tag layout (datasets/tags.py): one-line LayoutErrors naming the fix."""
    root = str(cfg_data.root)
    list_dir = getattr(cfg_data, "list_dir", None) or default_list_dir(root)
    fix = ("run: python tools/prepare_tags.py --images DIR --csv FILE --out " + root
           + " (docs/OWN_DATASET.md)")
    meta = os.path.join(root, META_FILE)
    if read_meta(root) is None:
        _fail(meta, "not found or not written by prepare_tags (an import that did not finish)",
              fix)
    images = image_root(root)
    if not os.path.isdir(images):
        _fail(images, f"image folder of {meta} not found (moved?)", f"rerun the import; {fix}")
    path = class_file(cfg_data)
    try:
        k = len(read_class_file(path))
    except (FileNotFoundError, ValueError) as exc:
        _fail(path, str(exc).split(": ", 1)[-1], fix)
    num_fg = int(cfg_data.num_classes) - 1
    if k != num_fg:
        _fail(path, f"lists {k} classes but data.num_classes={num_fg + 1} (a checkpoint's K + 1 "
                    f"when evaluating) means {num_fg}", "train without data.num_classes (it is "
                    "read from this file); evaluate on the data.root the checkpoint was trained on")
    lists = _read_lists(TagDataset, root, list_dir, splits, fix)
    _read_labels(list_dir, lists, num_fg, fix, False)
    exists = _Listing()
    for split, names in lists.items():
        checked = 0
        for n in names:
            image = os.path.join(images, n)
            if not exists(image):
                _fail(image, f"image listed in {split}.txt not found", f"restore it or {fix}")
            mask = TagDataset.mask_path(root, n)
            if (max_masks is None or checked < max_masks) and os.path.isfile(mask):
                checked += 1
                _check_tag_mask(mask, image, num_fg, fix)


def _check_tag_mask(path: str, image: str, num_fg: int, fix: str) -> None:
    mask, _ = _mask_values(path, num_fg, fix, fix)
    _check_size(mask, path, image, f"save the mask at the image's size, then {fix}",
                "replace the file or remove it from the lists")
