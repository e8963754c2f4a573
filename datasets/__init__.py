"""Datasets (VOC, COCO, your own tagged images, synthetic VOC-layout), augmentations and layout
checks."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.checkpoint import CheckpointError

from . import coco, voc
from .coco import COCODataset
from .sampler import ResumableSampler, SeededDataset
from .tags import TagDataset, class_file, read_class_file, resolve_classes
from .transforms import JITTER, RESCALE
from .voc import VOCDataset

DATASETS = {"voc": VOCDataset, "coco": COCODataset, "tags": TagDataset}

__all__ = ["VOCDataset", "COCODataset", "TagDataset", "DATASETS", "build_dataset",
           "build_train_loader", "seed_worker", "class_names", "resolve_classes"]


def build_dataset(cfg_data: Any, split: str, stage: str) -> VOCDataset:
    """Dataset from a config node (attribute access: OmegaConf node or SimpleNamespace) with
    fields name (voc|coco|tags), root, list_dir, num_classes, crop_size, rescale, jitter_p, jitter,
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
        rescale=tuple(getattr(cfg_data, "rescale", RESCALE)),
        jitter_p=getattr(cfg_data, "jitter_p", None),
        jitter=tuple(getattr(cfg_data, "jitter", JITTER)),
    )


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy / python seeds from the worker's torch seed
    (which the DataLoader already sets to base_seed + worker_id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(cfg: Any, dist: Any, start_step: int) -> DataLoader:
    """The training loader of a run config: `cfg.data`'s train split, `cfg.batch_size` images
    per process, this rank's share of a seeded permutation resumable at `start_step`
    (`ResumableSampler`); dist: `utils.dist.DistInfo`."""
    dataset = build_dataset(cfg.data, cfg.data.train_split, "train")
    sampler = ResumableSampler(len(dataset), cfg.batch_size, dist.rank, dist.world_size,
                               seed=cfg.seed, start_step=start_step)
    d = cfg.data
    workers = d.num_workers
    # The loader's own generator (worker base seeds) keeps it off the global torch stream, which
    # a resumed run restores just before creating the loader's iterator.
    return DataLoader(
        SeededDataset(dataset, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
        num_workers=workers, pin_memory=d.pin_memory and dist.device.type == "cuda",
        drop_last=True, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed + dist.rank),
        persistent_workers=d.persistent_workers and workers > 0,
        prefetch_factor=d.prefetch_factor if workers > 0 else None)


def class_names(data: Any) -> list[str]:
    """Names of the K + 1 classes (background first) of a dataset config (name, root, list_dir,
    num_classes): VOC's / COCO's, a tag dataset's class_names.txt, the synthetic set's, or
    generic ones (a tag dataset no longer on disk, e.g. predicting elsewhere). A tag dataset
    whose file disagrees with num_classes (a checkpoint's K) raises CheckpointError naming
    both."""
    from . import synthetic   # imports cv2: only when names are asked for

    if data.name == "tags" and os.path.isfile(class_file(data)):
        path = class_file(data)
        names = ["background"] + read_class_file(path)
        if len(names) != int(data.num_classes):
            raise CheckpointError(
                f"{path} lists {len(names) - 1} classes but the checkpoint has K = "
                f"{int(data.num_classes) - 1}; evaluate with the data.root / data.list_dir the "
                f"checkpoint was trained on")
        return names
    names = {"voc": voc.CLASS_NAMES, "coco": coco.CLASS_NAMES}.get(data.name)
    if names is None or len(names) != data.num_classes:
        names = (synthetic.read_params(data.root) or {}).get("class_names")
    if names is None or len(names) != data.num_classes:
        names = ["background"] + [f"class_{c}" for c in range(1, data.num_classes)]
    return list(names)
