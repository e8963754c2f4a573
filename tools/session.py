"""What an evaluation tool resolves once before its image loop: `open_context(spec, cfg) ->
Context` (processes, model, data split, output folder, logger, route parameters), and this
rank's images (`Context.items`). `run` turns user errors into one line and exit status 2.

Images are sharded by global rank (`utils.dist.rank_shard`); `tools.evaluation` runs the
loop.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from logging import Logger
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from utils import dist as udist
from utils.config import ConfigError
from utils.dist import DistInfo
from utils.errors import user_errors
from utils.logger import git_revision, setup_logger
from wetr.densecrf import resolve_backend
from wetr.factory import model_from_checkpoint

from .config import InferError, ToolSpec, resolve_scales
from .data import build_dataset_for, class_names, default_out_dir, resolve_data, seed_split
from .routes import Item, RouteParams

@dataclass(frozen=True)
class Context:
    """One tool run, resolved: config, processes, checkpoint info, data, split, dataset, output
    folder, class names, route parameters (which hold the model) and the log."""
    spec: ToolSpec
    cfg: DictConfig
    dist: DistInfo
    info: dict
    data: SimpleNamespace
    split: str
    dataset: Any
    out_dir: Path
    names: list[str]
    params: RouteParams
    log: Logger | None = None
    t0: float = 0.0

    @property
    def has_labels(self) -> bool:
        return not self.split.startswith("test")

    def num_images(self) -> int:
        """Images of the split evaluated (before sharding)."""
        n = len(self.dataset)
        return min(n, self.cfg.max_images) if self.cfg.max_images > 0 else n

    def shard(self) -> list[int]:
        """This rank's dataset indices."""
        return list(udist.rank_shard(self.num_images(), self.dist))

    def items(self, indices: Sequence[int]) -> Iterator[Item]:
        """Item(name, image (1, 3, H, W), label (1, H, W) long, cls_label (1, K) float) of each
        index, on the device, loaded by `num_workers` DataLoader workers."""
        device = self.dist.device
        loader = DataLoader(Subset(self.dataset, indices), batch_size=1,
                            shuffle=False, num_workers=self.cfg.num_workers,
                            pin_memory=device.type == "cuda")
        for name, image, label, cls_label in loader:
            yield Item(name[0], image.to(device, non_blocking=True),
                       label.to(device, non_blocking=True),
                       cls_label.to(device, non_blocking=True).float())


def _out_dir(spec: ToolSpec, cfg: DictConfig, split: str) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    suffix = ""   # a scale setting other than the tool's default is named in the folder
    if not cfg.scales and cfg.multi_scale != bool(spec.defaults.get("multi_scale")):
        suffix = "_ms" if cfg.multi_scale else "_ss"
    return default_out_dir(cfg.ckpt, spec.name, split, suffix)


def route_params(spec: ToolSpec, cfg: DictConfig, model: torch.nn.Module, names: list[str],
                 has_labels: bool) -> RouteParams:
    return RouteParams(model, spec.variant, cfg.size, resolve_scales(cfg, spec), bkg=cfg.bkg,
                       predicted_labels=cfg.cls_labels == "pred", has_labels=has_labels,
                       with_gcr=cfg.model.with_gcr, crf=cfg.crf, arrays=cfg.save_arrays,
                       overlays=cfg.save_overlays, names=tuple(names))


def default_split(spec: ToolSpec, data: SimpleNamespace) -> str:
    """The split a tool reads without infer_set: the training split (export), the seed split
    (infer_cam / infer_lam) or the validation split."""
    if spec.train_split:
        return data.train_split
    return seed_split(data) if spec.seed_split else data.val_split


def open_context(spec: ToolSpec, cfg: DictConfig) -> Context:
    """Start the processes (torchrun environment), load the model, resolve and check the data
    (the layout on rank 0); every user error here is one line. Under torchrun every rank stops
    together on the first error any rank found (`utils.dist.GroupError`, printed by rank 0
    alone), so the launchers need no check of their own before torchrun. The output folder is
    created by the caller."""
    t0 = time.time()
    dist = udist.init_distributed(cfg.device)
    with udist.group_errors():
        return _resolve(spec, cfg, dist, t0)


def _resolve(spec: ToolSpec, cfg: DictConfig, dist: DistInfo, t0: float) -> Context:
    model, info = model_from_checkpoint(cfg.ckpt, dist.device, cfg.data.num_classes, cfg.model)
    data = resolve_data(cfg, info)
    split = cfg.infer_set or default_split(spec, data)
    has_labels = not split.startswith("test")
    if spec.needs_image_labels and not has_labels and cfg.cls_labels == "gt":
        raise InferError(f"split {split!r} has no image labels: use cls_labels=pred")
    if cfg.resume and not cfg.save_labels and has_labels:
        raise ConfigError("resume=true rebuilds the scores from the saved label PNGs: "
                          "keep save_labels=true")
    dataset = build_dataset_for(data, split, check=dist.is_main)
    if cfg.crf:   # once per run: auto -> torch | pydensecrf; pydensecrf2 missing is one line
        cfg.crf_backend = resolve_backend(cfg.crf_backend, dist.device)
    names = class_names(data)
    return Context(spec, cfg, dist, info, data, split, dataset, _out_dir(spec, cfg, split), names,
                   route_params(spec, cfg, model, names, has_labels), t0=t0)


def with_log(ctx: Context) -> Context:
    """Create the output folder (rank 0) and its log file; log the run's header."""
    if ctx.dist.is_main:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
    udist.barrier()
    log = setup_logger(ctx.out_dir / f"{ctx.spec.name}.log", ctx.dist.is_main)
    log.info(f"{ctx.spec.name} | git {git_revision()} | {ctx.dist.world_size} process(es) on "
             f"{ctx.dist.device} | checkpoint {ctx.cfg.ckpt} (step {ctx.info['step']})")
    backend = f" ({ctx.cfg.crf_backend} backend)" if ctx.cfg.crf else ""
    log.info(f"data {ctx.data.name} {ctx.data.root} split {ctx.split} ({len(ctx.dataset)} images)"
             f" | scales {list(ctx.params.scales)} | crf {ctx.cfg.crf}{backend} | out {ctx.out_dir}")
    return replace(ctx, log=log)


def run(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """A tool's entry: `main(argv)` under the entries' rule (utils.errors.user_errors: a user
    error is one line, printed once for all ranks, and exit status 2)."""
    with user_errors(cleanup=udist.cleanup):
        return main(sys.argv[1:] if argv is None else argv)
