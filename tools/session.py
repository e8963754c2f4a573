"""One inference tool run: config, processes, model, data shard, output folder and logger, then
the per-image loop (`evaluate`); `run` turns user errors into one line and exit status 2.

Images are sharded by global rank (rank::world_size); see `tools.evaluation` for the metrics.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from datasets.sampler import SampleError
from utils import dist as udist
from utils.checkpoint import CheckpointError
from utils.config import ConfigError, to_container
from utils.crf import CRFMissingError
from utils.dist import DeviceError
from utils.errors import user_errors
from utils.logger import git_revision, setup_logger
from wetr.factory import model_from_checkpoint

from .config import InferError, ToolSpec, parse_config, resolve_scales
from .data import build_dataset_for, class_names, default_out_dir, resolve_data, seed_split
from .evaluation import Evaluation

Item = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]


class InferRun:
    """The resolved run of a tool: `cfg`, `dist`, `device`, `model` (eval mode), `info` (the
    checkpoint's), `data`, `split`, `has_labels`, `scales`, `dataset`, `out_dir`, `names`, `log`,
    and its `Evaluation` (`ev`)."""

    def __init__(self, spec: ToolSpec, argv: Sequence[str]):
        self.spec = spec
        self.t0 = time.time()
        self.cfg = cfg = parse_config(argv, spec.defaults)
        self.dist = udist.init_distributed(cfg.device)
        self.device = self.dist.device
        self.model, self.info = model_from_checkpoint(cfg.ckpt, self.device, cfg.data.num_classes,
                                                       cfg.model)
        self.data = resolve_data(cfg, self.info)
        self.split = cfg.infer_set or (seed_split(self.data) if spec.seed_split else self.data.val_split)
        self.has_labels = not self.split.startswith("test")
        if spec.needs_image_labels and not self.has_labels and cfg.cls_labels == "gt":
            raise InferError(f"split {self.split!r} has no image labels: use cls_labels=pred")
        self.scales = resolve_scales(cfg, spec)
        self.dataset = build_dataset_for(self.data, self.split, check=self.dist.is_main)
        if cfg.crf:
            from utils.crf import check_available
            check_available()
        if os.environ.get("MORE_PREFLIGHT"):   # launcher scripts: checks only, once, no torchrun
            raise SystemExit(0)
        self.out_dir = self._out_dir()
        self.names = class_names(self.data)
        self.ev = Evaluation(self.out_dir, spec.variant, self.data.num_classes, self.has_labels,
                             self.device, cfg.save_labels, self._crf_workers() if cfg.crf else None,
                             server_layout=not self.has_labels and self.data.name == "voc")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        udist.barrier()
        self.log = setup_logger(self.out_dir / f"{spec.name}.log", self.dist.is_main)
        self.log.info(f"{spec.name} | git {git_revision()} | {self.dist.world_size} process(es) on "
                      f"{self.device} | checkpoint {cfg.ckpt} (step {self.info['step']})")
        self.log.info(f"data {self.data.name} {self.data.root} split {self.split} "
                      f"({len(self.dataset)} images) | scales {list(self.scales)} | crf {cfg.crf}"
                      f" | out {self.out_dir}")

    def _out_dir(self) -> Path:
        cfg = self.cfg
        if cfg.out_dir:
            return Path(cfg.out_dir)
        suffix = ""   # a scale setting other than the tool's default is named in the folder
        if not cfg.scales and cfg.multi_scale != bool(self.spec.defaults.get("multi_scale")):
            suffix = "_ms" if cfg.multi_scale else "_ss"
        return default_out_dir(cfg.ckpt, self.spec.name, self.split, suffix)

    def _crf_workers(self) -> int:
        if self.cfg.crf_workers >= 0:
            return self.cfg.crf_workers
        # The reference uses 60% of the cores for CRF; share them between the local ranks.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        return max(1, int(0.6 * (os.cpu_count() or 1)) // max(1, local))

    def num_images(self) -> int:
        """Images of the split evaluated (before sharding)."""
        n = len(self.dataset)
        return min(n, self.cfg.max_images) if self.cfg.max_images > 0 else n

    def items(self) -> Iterator[Item]:
        """This rank's images: (name, image (1, 3, H, W), label (1, H, W) long,
        cls_label (1, K) float), on the device."""
        ranks = range(self.dist.rank, self.num_images(), self.dist.world_size)
        shard = Subset(self.dataset, ranks)
        loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=self.cfg.num_workers,
                            pin_memory=self.device.type == "cuda")
        it = loader
        if self.dist.is_main:
            from tqdm import tqdm
            it = tqdm(loader, desc=f"{self.spec.name} (rank 0)", dynamic_ncols=True)
        for name, image, label, cls_label in it:
            yield (name[0], image.to(self.device, non_blocking=True),
                   label.to(self.device, non_blocking=True),
                   cls_label.to(self.device, non_blocking=True).float())

    def record(self, result: dict) -> dict:
        """The scores.json record of this run."""
        return {
            "tool": self.spec.name, "checkpoint": str(self.cfg.ckpt), "step": self.info.get("step"),
            "dataset": self.data.name, "root": self.data.root, "split": self.split,
            "images": self.num_images(), "scales": list(self.scales), "class_names": self.names,
            "processes": self.dist.world_size, "seconds": round(time.time() - self.t0, 1),
            "scores": result, "config": to_container(self.cfg),
        }


PerImage = Callable[[InferRun, Item], None]


def evaluate(spec: ToolSpec, argv: Sequence[str], per_image: PerImage) -> dict | None:
    """Set up the run, call `per_image(run, item)` for each image of this rank's shard (it adds
    its predictions to `run.ev`), then all-reduce and report. Returns {variant: scores} on rank
    0, None elsewhere."""
    run = InferRun(spec, argv)
    with torch.no_grad():
        for item in run.items():
            per_image(run, item)
            run.ev.poll()
    return run.ev.finish(run.log, spec.name, run.split, run.names, run.record,
                         run.dist.is_main)


def run(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Entry point wrapper: user errors become one line on stderr and exit status 2."""
    with user_errors((ConfigError, CheckpointError, InferError, DeviceError, SampleError,
                      CRFMissingError)):
        return main(sys.argv[1:] if argv is None else argv)
