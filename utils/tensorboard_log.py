"""TensorBoard events of a training run: scalars and overlay images, rank 0 only.

(Not named tensorboard.py: run as a file from utils/, it would shadow the tensorboard package.)

    tb = TBWriter(run_dir, enabled=cfg.log.tensorboard and dist.is_main, start_step=start_step)
    tb.scalars(step, {"lr": lr, "loss/total": 0.9, "speed/images_per_s": 31.0})
    tb.scalars(step, {"val/cam_miou": 0.61, "val/seg_miou": 0.58, "val/f1": 0.88})
    tb.images(step, "val", [val_overlay(rgb, cam, lam, seg) for ...])
    tb.close()

Events go to `<run_dir>/tb/` (`tensorboard --logdir logs` shows every run). A resumed run passes
the step it resumes from as `start_step`: the writer then purges the events the interrupted run
wrote at or after that step (TensorBoard's `purge_step`), so each step appears once. A disabled
writer (log.tensorboard=false, or a rank other than 0) accepts every call and writes nothing,
so callers need no branches.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from utils.logger import JsonlWriter
from utils.metrics import IGNORE_INDEX
from utils.palette import colorize, jet_overlay


class TBWriter:
    """A SummaryWriter under <run_dir>/tb/, or nothing when `enabled` is false."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, start_step: int = 0):
        self.log_dir = Path(run_dir) / "tb"
        self._writer = None
        if enabled:
            # imported here: tensorboard is only needed when events are written
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir),
                                         purge_step=start_step if start_step > 0 else None)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per key (the key is the tag: "loss/cls", "lr", "val/seg_miou");
        non-numbers and non-finite values are skipped (a NaN would hide the rest of the curve)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            if math.isfinite(float(value)):
                self._writer.add_scalar(tag, float(value), global_step=step)

    def images(self, step: int, tag: str, images: Sequence[np.ndarray]) -> None:
        """images: (H, W, 3) uint8 RGB each (sizes may differ), written as `<tag>/<index>`.
        Checked even when disabled, so a wrong call shows up in runs without TensorBoard too."""
        images = [np.asarray(image) for image in images]
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i} of {tag!r} must be (H, W, 3) uint8, got "
                                 f"{image.shape} {image.dtype}")
        if self._writer is None:
            return
        for i, image in enumerate(images):
            self._writer.add_image(f"{tag}/{i}", image, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ScalarLog:
    """Scalars of a run to metrics.jsonl (`JsonlWriter`) and to TensorBoard alike:
    `write(step=..., **values)`, the record keys being the TensorBoard tags."""

    def __init__(self, jsonl: JsonlWriter, tb: TBWriter):
        self.jsonl, self.tb = jsonl, tb

    def write(self, step: int, **values: float) -> None:
        self.jsonl.write(step=step, **values)
        self.tb.scalars(step, values)


def _heat(maps: np.ndarray) -> np.ndarray:
    """(H, W) or (K, H, W) maps in [0, 1] -> (H, W): the max over the classes given."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 3:
        maps = maps.max(axis=0) if len(maps) else np.zeros(maps.shape[1:])
    return np.clip(maps, 0.0, 1.0)


def seg_blend(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image (H, W, 3) uint8, label (H, W) class indices -> (H, W, 3) uint8: the VOC-palette
    colours blended over the image; background (0) and ignore (255) leave the image as it is."""
    colours = colorize(label).astype(np.float64)
    out = image.astype(np.float64)
    fg = (label > 0) & (label != IGNORE_INDEX)
    out[fg] = alpha * colours[fg] + (1 - alpha) * out[fg]
    return out.round().astype(np.uint8)


def val_overlay(image: np.ndarray, cam: np.ndarray, lam: np.ndarray, seg: np.ndarray,
                gt: np.ndarray | None = None) -> np.ndarray:
    """One panel row: image | CAM | LAM | segmentation [| ground truth].

    image: (H, W, 3) uint8; cam, lam: (H, W) or (K, H, W) maps in [0, 1] (pass the image's
    classes; the max over them is shown, jet colours); seg, gt: (H, W) class indices.
    Returns (H, W * (4 or 5), 3) uint8.
    """
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    for name, m in (("cam", cam), ("lam", lam), ("seg", seg), ("gt", gt)):
        if m is not None and np.asarray(m).shape[-2:] != (h, w):
            raise ValueError(f"{name} is {np.asarray(m).shape[-2:]} but the image is {(h, w)}")
    panels = [image, jet_overlay(image, _heat(cam)), jet_overlay(image, _heat(lam)),
              seg_blend(image, np.asarray(seg))]
    if gt is not None:
        panels.append(seg_blend(image, np.asarray(gt)))
    return np.concatenate(panels, axis=1)
