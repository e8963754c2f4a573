"""What a tool resolves once before its image loop: `open_context(spec, cfg) -> Context`
(processes, model, what the run reads, output folder, route parameters, the CRF step), and
this rank's images (`Context.items`). The evaluation tools read a dataset split
(`open_split`); tools/predict.py reads image files through the same `open_context`. `run`
turns user errors into one line and exit status 2.

Images are sharded by global rank (`utils.dist.rank_shard`); `tools.evaluation` runs the
loop.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from logging import Logger
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from utils import dist as udist
from utils.config import ConfigError, to_container
from utils.crf import CRFParams
from utils.dist import DistInfo
from utils.errors import user_errors
from utils.logger import git_revision, setup_logger
from wetr.factory import model_from_checkpoint

from .config import InferError, ToolSpec, resolve_scales
from .data import (build_dataset_for, class_names, is_labelled, output_dir, resolve_data,
                   seed_split)
from .crf_step import CRFStep, crf_workers
from .outputs import write_json_atomic
from .routes import Item, RouteParams

SETTINGS_FILE = "settings.json"   # the settings that shaped an output folder's files


@dataclass(frozen=True)
class Source:
    """What a run reads, where it writes, and how each image is routed (`open_split` for the
    evaluation tools, tools/predict.py's for image files).

    data: the dataset config (None: no dataset); split: the split's name (predict: the input's);
    dataset: the split's dataset (predict: its (path, output name) pairs); names: the K + 1
    class names; settings: what shapes the files of out_dir (`output_settings`; None: not
    resumable, nothing stamped)."""
    data: SimpleNamespace | None
    split: str
    dataset: Any
    names: list[str]
    params: RouteParams
    out_dir: Path
    settings: dict | None = None


Opener = Callable[[ToolSpec, DictConfig, DistInfo, dict, torch.nn.Module], Source]


@dataclass(frozen=True)
class Context:
    """One tool run, resolved: config, processes, checkpoint info, what it reads (`Source`), the
    CRF step (its backend resolved once; cfg.crf_backend names it) and the log."""
    spec: ToolSpec
    cfg: DictConfig
    dist: DistInfo
    info: dict
    source: Source
    crf: CRFStep
    log: Logger | None = None
    t0: float = 0.0

    @property
    def has_labels(self) -> bool:
        return self.source.params.has_labels

    def num_images(self) -> int:
        """Images of the split evaluated (before sharding)."""
        n = len(self.source.dataset)
        return min(n, self.cfg.max_images) if self.cfg.max_images > 0 else n

    def shard(self) -> list[int]:
        """This rank's dataset indices."""
        return list(udist.rank_shard(self.num_images(), self.dist))

    def items(self, indices: Sequence[int]) -> Iterator[Item]:
        """Item(name, image (1, 3, H, W), label (1, H, W) long, cls_label (1, K) float) of each
        index, on the device, loaded by `num_workers` DataLoader workers."""
        device = self.dist.device
        loader = DataLoader(Subset(self.source.dataset, indices), batch_size=1,
                            shuffle=False, num_workers=self.cfg.num_workers,
                            pin_memory=device.type == "cuda")
        for name, image, label, cls_label in loader:
            yield Item(name[0], image.to(device, non_blocking=True),
                       label.to(device, non_blocking=True),
                       cls_label.to(device, non_blocking=True).float())


def default_split(spec: ToolSpec, data: SimpleNamespace) -> str:
    """The split a tool reads without infer_set: the training split (export), the seed split
    (infer_cam / infer_lam) or the validation split."""
    if spec.train_split:
        return data.train_split
    return seed_split(data) if spec.seed_split else data.val_split


def open_split(spec: ToolSpec, cfg: DictConfig, dist: DistInfo, info: dict,
               model: torch.nn.Module) -> Source:
    """The evaluation tools' `Source`: the data (data.* over the checkpoint's), the split
    (infer_set or the tool's default) and its dataset (layout checked on rank 0), the output
    folder (a scale setting other than the tool's default is named in the default one) and,
    with resume=true, the check that its files were made with the same settings."""
    data = resolve_data(cfg, info)
    split = cfg.infer_set or default_split(spec, data)
    has_labels = is_labelled(split)
    if spec.needs_image_labels and not has_labels and cfg.cls_labels == "gt":
        raise InferError(f"split {split!r} has no image labels: use cls_labels=pred")
    if cfg.resume and not cfg.save_labels and has_labels:
        raise ConfigError("resume=true rebuilds the scores from the saved label PNGs: "
                          "keep save_labels=true")
    dataset = build_dataset_for(data, split, check=dist.is_main)
    names = class_names(data)
    params = RouteParams(model, spec.variant, cfg.size, resolve_scales(cfg, spec), bkg=cfg.bkg,
                         predicted_labels=cfg.cls_labels == "pred", has_labels=has_labels,
                         with_gcr=cfg.model.with_gcr, crf=cfg.crf, arrays=cfg.save_arrays,
                         overlays=cfg.save_overlays, names=tuple(names))
    suffix = ""
    if not cfg.scales and cfg.multi_scale != bool(spec.defaults.get("multi_scale")):
        suffix = "_ms" if cfg.multi_scale else "_ss"
    out_dir = output_dir(cfg.out_dir, cfg.ckpt, spec.name, split, suffix)
    settings = output_settings(spec, cfg, info, data, split, params)
    if cfg.resume:
        check_settings(out_dir, settings)
    return Source(data, split, dataset, names, params, out_dir, settings)


def output_settings(spec: ToolSpec, cfg: DictConfig, info: dict, data: SimpleNamespace,
                    split: str, params: RouteParams) -> dict:
    """What shapes the label maps of a run (JSON-ready): tool and route, checkpoint and step,
    data and split, size, scales, the seeds' background and image labels, the model overrides,
    the CRF (backend, parameters)."""
    settings = {"tool": spec.name, "route": spec.route or spec.variant,
                "checkpoint": str(Path(cfg.ckpt).resolve()), "step": info.get("step"),
                "dataset": data.name, "root": os.path.abspath(data.root),
                "list_dir": data.list_dir and os.path.abspath(data.list_dir), "split": split,
                "size": cfg.size, "scales": list(params.scales),
                "model": to_container(cfg.model), "crf": cfg.crf}
    if params.variant != "seg":
        settings.update(bkg=cfg.bkg, cls_labels=cfg.cls_labels)
    if cfg.crf:
        settings.update(crf_backend=cfg.crf_backend, crf_params=asdict(CRFParams()))
    return settings


def check_settings(out_dir: Path, settings: dict) -> None:
    """resume=true: refuse an output folder whose files were made with other settings (its
    settings.json, written by `with_log`), in one line; a folder without one passes."""
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        return
    there = json.loads(path.read_text(encoding="utf-8"))
    differ = [k for k in {**there, **settings} if there.get(k) != settings.get(k)]
    if differ:
        what = "; ".join(f"{k} {there.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:3])
        raise ConfigError(f"resume=true, but {out_dir} holds the outputs of other settings "
                          f"({what}): use another out_dir, or resume=false to redo them")


def open_context(spec: ToolSpec, cfg: DictConfig, open_input: Opener = open_split) -> Context:
    """Start the processes (torchrun environment), load the model, resolve the CRF backend into
    the `CRFStep` (cfg.crf_backend is set to the backend it runs, for the log, settings.json and
    scores.json) and open what the run reads (`open_input`: a dataset split, or predict's files);
    every user error here is one line. Under torchrun every rank stops together on the first
    error any rank found (`utils.dist.GroupError`, printed by rank 0 alone), so the launchers
    need no check of their own before torchrun. The output folder is created by `with_log`."""
    t0 = time.time()
    dist = udist.init_distributed(cfg.device)
    with udist.group_errors():
        model, info = model_from_checkpoint(cfg.ckpt, dist.device, cfg.data.num_classes,
                                            cfg.model)
        crf = CRFStep(cfg.crf_backend if cfg.crf else None, dist.device,
                      crf_workers(cfg.crf_workers, dist.world_size))
        cfg.crf_backend = crf.backend or cfg.crf_backend
        source = open_input(spec, cfg, dist, info, model)
        return Context(spec, cfg, dist, info, source, crf, t0=t0)


def with_log(ctx: Context) -> Context:
    """Create the output folder (rank 0) with its settings.json (`output_settings`) and log
    file; log the run's header."""
    source = ctx.source
    if ctx.dist.is_main:
        source.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(source.out_dir / SETTINGS_FILE, source.settings)
    udist.barrier()
    log = setup_logger(source.out_dir / f"{ctx.spec.name}.log", ctx.dist.is_main)
    log.info(f"{ctx.spec.name} | git {git_revision()} | {ctx.dist.world_size} process(es) on "
             f"{ctx.dist.device} | checkpoint {ctx.cfg.ckpt} (step {ctx.info['step']})")
    backend = f" ({ctx.crf.backend} backend)" if ctx.cfg.crf else ""
    log.info(f"data {source.data.name} {source.data.root} split {source.split} "
             f"({len(source.dataset)} images) | scales {list(source.params.scales)} | crf "
             f"{ctx.cfg.crf}{backend} | out {source.out_dir}")
    return replace(ctx, log=log)


def run(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """A tool's entry: `main(argv)` under the entries' rule (utils.errors.user_errors: a user
    error is one line, printed once for all ranks, and exit status 2)."""
    with user_errors(cleanup=udist.cleanup):
        return main(sys.argv[1:] if argv is None else argv)
