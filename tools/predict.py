"""Segment your own images with a checkpoint: a file or a folder of JPEG / PNG, any size.

    python tools/predict.py ckpt=logs/train_voc/checkpoints/best.pth input=photos/
    python tools/predict.py ckpt=best.pth input=cat.jpg multi_scale=true crf=true save_cam=true
    torchrun --nproc_per_node=2 tools/predict.py ckpt=best.pth input=photos/ out_dir=preds

Each image (grey, palette and RGBA converted to RGB) is resized to size x size (SPEC 8; any
aspect), segmented at scale 1.0 with its flip (multi_scale=true: scales 1.0, 1.25, 1.5 with
flip, max over scales), the logits upsampled to the original size, optionally refined by
DenseCRF (crf=true). Writes under out_dir (default <run>/eval/<checkpoint>/predict_<input>):
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
import torch.nn.functional as F
from PIL import Image

from datasets.transforms import normalise
from tools.config import SEED_SCALES, SEG_SCALES, InferData, InferModel
from tools.cli import parse_cli
from tools.data import class_names, default_out_dir, resolve_data
from tools.session import run
from utils import dist as udist
from utils.config import ConfigError, option
from utils.palette import colorize, jet_overlay, save_label_png, save_rgb
from wetr.cam import multi_scale_cam
from wetr.factory import model_from_checkpoint
from wetr.infer import multi_scale_lam, multi_scale_seg

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class PredictConfig:
    ckpt: str = option("", "checkpoint path (required)")
    input: str = option("", "an image (jpg, jpeg, png) or a folder of them (required)")
    out_dir: str = option("", '"" = <run folder>/eval/<checkpoint>/predict_<input name>')
    multi_scale: bool = option(False, "segmentation scales 1.0, 1.25, 1.5 (with flip); false: 1.0")
    size: int = option(448, "images are resized to size x size (whatever the aspect)")
    crf: bool = option(False, "DenseCRF on the segmentation (needs pydensecrf2)")
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
        raise ValueError((str(exc).strip().splitlines() or [type(exc).__name__])[0]) from None


def _class_maps(model, x: torch.Tensor, scales: Sequence[float], out_size, with_gcr: bool):
    """x: (1, 3, S, S) -> CAM, LAM (K, H, W) each, at out_size, in [0, 1]."""
    cam = multi_scale_cam(model, x, scales)[0]
    lam = multi_scale_lam(model, x, scales, with_gcr=with_gcr)
    up = [F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)[0]
          for m in (cam, lam)]
    return up[0].clamp(0, 1).cpu().numpy(), up[1].clamp(0, 1).cpu().numpy()


@torch.no_grad()
def predict_one(model, rgb: np.ndarray, cfg, device: torch.device):
    """rgb (H, W, 3) uint8 -> (label (H, W) uint8, CAM and LAM (K, H, W) or None)."""
    h, w = rgb.shape[:2]
    image = normalise(rgb)[None].to(device)
    seg = multi_scale_seg(model, image, cfg.size, SEG_SCALES if cfg.multi_scale else (1.0,), (h, w))
    if cfg.crf:
        from utils.crf import crf_label
        label = crf_label(rgb, seg[0].softmax(0).cpu().numpy(), np.arange(seg.shape[1]))
    else:
        label = seg[0].argmax(0).to(torch.uint8).cpu().numpy()
    maps = None
    if cfg.save_cam:
        x = F.interpolate(image, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)
        maps = _class_maps(model, x, SEED_SCALES if cfg.multi_scale else (1.0,), (h, w),
                           cfg.model.with_gcr)
    return label, maps


def _names_of(cfg, info: dict) -> list[str]:
    try:
        return class_names(resolve_data(cfg, info))
    except ConfigError:  # a bare state_dict of an unknown dataset: generic names
        return ["background"] + [f"class_{c}" for c in range(1, info["num_classes"])]


def write_outputs(out: Path, name: str, rgb: np.ndarray, label: np.ndarray, maps, names) -> list[str]:
    """The files of one image; returns the names of its predicted classes."""
    save_label_png(out / "seg" / f"{name}.png", label)
    blend = (0.5 * rgb.astype(np.float64) + 0.5 * colorize(label)).astype(np.uint8)
    save_rgb(out / "overlay" / f"{name}.jpg", blend)
    present = [int(c) for c in np.unique(label) if 0 < c < len(names)]
    if maps is not None:
        for kind, m in zip(("cam", "lam"), maps):
            for c in present:
                tag = names[c].replace(" ", "_")
                save_rgb(out / kind / f"{name}_{tag}.jpg", jet_overlay(rgb, m[c - 1], 0.5))
    return [names[c] for c in present]


def main(argv: Sequence[str]) -> int:
    """-> the number of images skipped (over all ranks)."""
    cfg = parse_cli(argv, PredictConfig)
    if not cfg.ckpt or not cfg.input:
        raise ConfigError("ckpt=<checkpoint .pth> and input=<image or folder> are required")
    files = list_images(cfg.input)
    if cfg.crf:
        from utils.crf import check_available
        check_available()
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(
        cfg.ckpt, "predict", Path(cfg.input).stem or "input")
    dist = udist.init_distributed(cfg.device)
    try:
        model, info = model_from_checkpoint(cfg.ckpt, dist.device, cfg.data.num_classes, cfg.model)
        names = _names_of(cfg, info)
        skipped = 0
        shard = list(zip(files, output_names(files)))[dist.rank::dist.world_size]
        for path, name in shard:
            try:
                rgb = read_rgb(path)
            except ValueError as exc:
                print(f"skipped {path}: cannot read image ({exc})", file=sys.stderr, flush=True)
                skipped += 1
                continue
            label, maps = predict_one(model, rgb, cfg, dist.device)
            found = write_outputs(out, name, rgb, label, maps, names)
            print(f"{path}: {', '.join(found) or 'background only'}", flush=True)
        total = int(udist.all_reduce_sum(torch.tensor([skipped], device=dist.device)).item())
        if dist.is_main:
            done = len(files) - total
            print(f"wrote {done} prediction(s) to {out}" + (f"; skipped {total} unreadable "
                  f"file(s)" if total else ""), file=sys.stderr)
        return total
    finally:
        udist.cleanup()


if __name__ == "__main__":
    sys.exit(1 if run(main) else 0)
