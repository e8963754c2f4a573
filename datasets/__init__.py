"""Datasets (VOC, COCO, synthetic VOC-layout), augmentations and layout checks."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .coco import COCODataset
from .transforms import JITTER
from .voc import VOCDataset

DATASETS = {"voc": VOCDataset, "coco": COCODataset}

__all__ = ["VOCDataset", "COCODataset", "DATASETS", "build_dataset", "seed_worker"]


def build_dataset(cfg_data: Any, split: str, stage: str) -> VOCDataset:
    """Dataset from a config node (attribute access: OmegaConf node or SimpleNamespace) with
    fields name (voc|coco), root, list_dir, num_classes, crop_size, rescale, jitter_p, jitter,
    aug."""
    name = cfg_data.name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name](
        cfg_data.root, split, stage,
        num_classes=int(cfg_data.num_classes),
        list_dir=getattr(cfg_data, "list_dir", None) or None,
        crop_size=getattr(cfg_data, "crop_size", None),
        aug=getattr(cfg_data, "aug", None) or None,
        rescale=tuple(getattr(cfg_data, "rescale", (0.32, 1.0))),
        jitter_p=getattr(cfg_data, "jitter_p", None),
        jitter=tuple(getattr(cfg_data, "jitter", JITTER)),
    )


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy / python seeds from the worker's torch seed
    (which the DataLoader already sets to base_seed + worker_id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
