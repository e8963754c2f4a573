"""Which data an inference tool reads: the user's data.* over the checkpoint's training data
config, the split's dataset (with one-line layout errors), class names, the output folder."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig

from utils.config import ConfigError
from utils.errors import first_line

from .config import InferError

DEFAULT_ROOTS = {"voc": "data/VOCdevkit/VOC2012", "coco": "data/COCO"}


def resolve_data(cfg: DictConfig, info: dict) -> SimpleNamespace:
    """Dataset config: the user's data.* over the checkpoint's training data config."""
    trained = info["config"].get("data", {}) if isinstance(info["config"], dict) else {}
    num_classes = info["num_classes"]
    name = cfg.data.name or trained.get("name")
    if name is None:
        name = {21: "voc", 81: "coco"}.get(num_classes)
        if name is None:
            raise ConfigError(f"checkpoint has K={num_classes - 1} classes and no training config: "
                              f"set data.name and data.root")
    if cfg.data.root:   # a new root: its own lists unless list_dir is given too
        root, list_dir = cfg.data.root, cfg.data.list_dir
    else:
        root = trained.get("root") or DEFAULT_ROOTS.get(name, "")
        list_dir = cfg.data.list_dir or trained.get("list_dir")
    return SimpleNamespace(name=name, root=root, list_dir=list_dir, num_classes=num_classes,
                           train_split=trained.get("train_split", "train_aug"),
                           val_split=trained.get("val_split", "val"))


def list_dir_of(data: SimpleNamespace) -> str:
    return data.list_dir or os.path.join(data.root, "ImageSets", "Segmentation")


def seed_split(data: SimpleNamespace) -> str:
    """VOC seeds are reported on `train` (1464 images) when that list exists, else on the
    training split of the checkpoint."""
    return "train" if os.path.isfile(os.path.join(list_dir_of(data), "train.txt")) else data.train_split


def is_labelled(split: str) -> bool:
    """Whether a split has masks and image labels: every split but those named test*."""
    return not split.startswith("test")


def build_dataset_for(data: SimpleNamespace, split: str, check: bool):
    """Stage "val" (image at original size, mask, image labels); a split without labels
    (`is_labelled`) uses stage "test" (label all ignore, image labels all 0). `check`: verify
    the layout of a labelled split first (folders, lists, image labels, masks), one-line
    errors."""
    from datasets import build_dataset
    from datasets.layout import LayoutError, check_layout

    stage = "val" if is_labelled(split) else "test"
    lists = list_dir_of(data)
    have = sorted(p.stem for p in Path(lists).glob("*.txt")) if os.path.isdir(lists) else []
    if have and split not in have:   # a mistyped infer_set, most likely
        raise InferError(f"no split list {split}.txt in {lists}; infer_set can be: {', '.join(have)}")
    if check and stage == "val":
        try:
            check_layout(data, [split])
        except LayoutError as exc:
            raise InferError(str(exc)) from None
    try:
        return build_dataset(data, split, stage)
    except (FileNotFoundError, ValueError) as exc:
        raise InferError(first_line(exc)) from None


def class_names(data: SimpleNamespace) -> list[str]:
    """Names of the K+1 classes (`datasets.class_names`: VOC / COCO / tags / synthetic / generic)."""
    from datasets import class_names as dataset_class_names
    return dataset_class_names(data)


def output_dir(out_dir: str, ckpt: str, tool: str, split: str, suffix: str) -> Path:
    """`out_dir` when given, else <run>/eval/<checkpoint stem>/<tool>_<split><suffix>, <run>
    being the folder above checkpoints/ (so evaluating best.pth and last.pth keeps both)."""
    if out_dir:
        return Path(out_dir)
    path = Path(ckpt).resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / "eval" / path.stem / f"{tool}_{split}{suffix}"
