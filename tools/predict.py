"""Segment your own images with a checkpoint: a file or a folder of JPEG / PNG, any size.

    python tools/predict.py ckpt=logs/train_voc/checkpoints/best.pth input=photos/
    python tools/predict.py ckpt=best.pth input=cat.jpg multi_scale=true crf=true save_cam=true
    torchrun --nproc_per_node=2 tools/predict.py ckpt=best.pth input=photos/ out_dir=preds

Each image (grey, palette and RGBA converted to RGB) is resized to size x size (METHOD.md §8; any
aspect), segmented at scale 1.0 with its flip (multi_scale=true: scales 1.0, 1.25, 1.5 with
flip, max over scales), the logits upsampled to the original size, optionally refined by
DenseCRF (crf=true; crf_backend=auto|torch|pydensecrf, see tools/config.py). Writes under
out_dir (default <run>/eval/<checkpoint>/predict_<input>):
seg/<name>.png (palette PNG of class indices, the image's size), overlay/<name>.jpg (palette
colours over the image) and, with save_cam=true, cam/ and lam/<name>_<class>.jpg (jet overlays of
the CAM and LAM of every predicted class). Class names are those of the checkpoint's dataset.
A file that cannot be read is reported on one line naming it and skipped; the exit status is
then 1 (bad arguments: 2). Images are sharded by rank under torchrun.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from datasets.transforms import normalise
from tools.cli import parse_cli
from tools.config import (CRF_BACKEND_HELP, CRF_BACKENDS, SEED_SCALES, SEG_SCALES, InferData,
                          InferModel, ToolSpec, crf_backend_alias)
from tools.data import class_names, output_dir, resolve_data
from tools.evaluation import run_images
from tools.outputs import PredictWriter
from tools.routes import Item, Output, RouteParams
from tools.session import Source, open_context, run
from utils import dist as udist
from utils.config import ConfigError, option
from utils.dist import DistInfo
from utils.errors import first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TOOL = ToolSpec("predict", "seg", SEG_SCALES, route="predict")


@dataclass
class PredictConfig:
    ckpt: str = option("", "checkpoint path (required)")
    input: str = option("", "an image (jpg, jpeg, png) or a folder of them (required)")
    out_dir: str = option("", '"" = <run folder>/eval/<checkpoint>/predict_<input name>')
    multi_scale: bool = option(False, "segmentation scales 1.0, 1.25, 1.5 (with flip); false: 1.0")
    size: int = option(448, "images are resized to size x size (whatever the aspect)")
    crf: bool = option(False, "DenseCRF on the segmentation, with crf_backend")
    crf_backend: str = option("auto", CRF_BACKEND_HELP, choices=CRF_BACKENDS)
    crf_workers: int = option(0, "pydensecrf processes per rank; 0 in-process, -1 auto (the "
                                 "torch backend always runs in-process)")
    save_cam: bool = option(False, "also CAM and LAM overlays of each predicted class")
    device: str = option("auto", "auto | cpu | cuda")
    data: InferData = field(default_factory=InferData)
    model: InferModel = field(default_factory=InferModel)


def list_images(path: str) -> list[Path]:
    """An image file -> [it]; a folder -> its jpg / jpeg / png files (sorted, not recursive)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"input={path}: no such file or folder")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"input={path}: no .jpg, .jpeg or .png files in the folder")
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """File stems; where two files share a stem (a.jpg, a.png) the suffix is kept (a_jpg)."""
    stems = [f.stem for f in files]
    return [f.name.replace(".", "_") if stems.count(f.stem) > 1 else f.stem for f in files]


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any PIL-readable image (grey, palette, RGBA, CMYK converted).
    Raises ValueError with a one-line reason."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(first_line(exc)) from None


def _names_of(cfg, info: dict) -> list[str]:
    try:
        return class_names(resolve_data(cfg, info))
    except ConfigError:  # a bare state_dict of an unknown dataset: generic names
        return ["background"] + [f"class_{c}" for c in range(1, info["num_classes"])]


def open_images(spec: ToolSpec, cfg: DictConfig, dist: DistInfo, info: dict, model: torch.nn.Module
                ) -> Source:
    """predict's `tools.session.Source`: the input's image files as (path, output name) pairs,
    the checkpoint's class names, the segmentation route's parameters (save_cam: CAM / LAM
    maps too) and the output folder (<run>/eval/<checkpoint>/predict_<input name> by default)."""
    files = list_images(cfg.input)
    names = _names_of(cfg, info)
    seeds = SEED_SCALES if cfg.multi_scale else (1.0,)
    params = RouteParams(model, "seg", cfg.size, SEG_SCALES if cfg.multi_scale else (1.0,),
                         seed_scales=seeds, has_labels=False, with_gcr=cfg.model.with_gcr,
                         crf=cfg.crf, overlays=cfg.save_cam)
    stem = Path(cfg.input).stem or "input"
    return Source(None, stem, list(zip(files, output_names(files))), names, params,
                  output_dir(cfg.out_dir, cfg.ckpt, spec.name, stem, ""))


def _items(shard: Sequence[tuple[Path, str]], device: torch.device, skipped: list[Path]):
    """Item(name, image (1, 3, H, W), rgb) of each readable file; unreadable ones are reported on
    one line and appended to `skipped`."""
    for path, name in shard:
        try:
            rgb = read_rgb(path)
        except ValueError as exc:
            print(f"skipped {path}: cannot read image ({exc})", file=sys.stderr, flush=True)
            skipped.append(path)
            continue
        yield Item(name, normalise(rgb)[None].to(device), rgb=rgb)


def main(argv: Sequence[str]) -> int:
    """-> the number of images skipped (over all ranks)."""
    cfg = parse_cli(crf_backend_alias(argv), PredictConfig)
    if not cfg.ckpt or not cfg.input:
        raise ConfigError("ckpt=<checkpoint .pth> and input=<image or folder> are required")
    ctx = None
    try:
        ctx = open_context(TOOL, cfg, open_images)
        dist, source = ctx.dist, ctx.source
        names = source.names
        if cfg.crf and dist.is_main:
            print(f"crf: {ctx.crf.backend} backend on {dist.device}", file=sys.stderr)
        writer = PredictWriter(source.out_dir, names)
        paths = {name: path for path, name in source.dataset}

        def say(o: Output) -> None:
            found = [names[c] for c in writer.present(o)]
            print(f"{paths[o.name]}: {', '.join(found) or 'background only'}", flush=True)

        skipped: list[Path] = []
        shard = [source.dataset[i] for i in udist.rank_shard(len(source.dataset), dist)]
        run_images(ctx, _items(shard, dist.device, skipped), (writer.write, say))
        total = int(udist.all_reduce_sum(torch.tensor([len(skipped)], device=dist.device)).item())
        if dist.is_main:
            done = len(source.dataset) - total
            print(f"wrote {done} prediction(s) to {source.out_dir}" + (f"; skipped {total} "
                  f"unreadable file(s)" if total else ""), file=sys.stderr)
        return total
    finally:
        if ctx is not None:
            ctx.crf.close()
        udist.cleanup()


if __name__ == "__main__":
    sys.exit(1 if run(main) else 0)
