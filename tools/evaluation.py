"""Evaluation bookkeeping of one tool run: confusion matrices, the CRF pool, the written
predictions (palette PNGs, .npz arrays, overlays) and scores.json.

Confusion matrices are all-reduced over the ranks in `finish`, so N processes report exactly the
numbers of one. CRF runs on the rank that owns the image, in a process pool.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import Logger
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils import dist as udist
from utils.metrics import confusion_matrix, format_table, scores
from utils.io import write_atomic, write_text_atomic
from utils.palette import colorize, save_label_png, save_rgb


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) -> (H, W, 3) uint8, rounded: recovers the decoded pixels
    (the reference CRF reads the JPEG itself)."""
    from wetr.cam import denormalise_255

    rgb = denormalise_255(image[None].double())[0].round().clamp(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _json_clean(v: Any) -> Any:
    """NaN (a class absent from the split) -> null, recursively."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def write_json_atomic(path: Path, record: dict) -> None:
    write_text_atomic(path, json.dumps(_json_clean(record), indent=1, allow_nan=False) + "\n")


@dataclass
class _Pending:
    variant: str
    name: str
    future: Any
    label: np.ndarray | None


class Evaluation:
    """Outputs and metric accumulators of one tool run on this rank.

    out_dir: output folder; variant: the prediction's name ("cam", ...; CRF output goes to
    "<variant>_crf"); has_labels: the split has masks (else nothing is counted); crf_workers:
    CRF processes (None: no CRF); server_layout: also write the PASCAL VOC test-server layout.
    Usage: per image `add(...)` (and `add_crf(...)`), then `poll()`; at the end `finish(...)`.
    """

    def __init__(self, out_dir: Path, variant: str, num_classes: int, has_labels: bool,
                 device: torch.device, save_labels: bool, crf_workers: int | None,
                 server_layout: bool):
        self.out_dir = out_dir
        self.variant = variant
        self.num_classes = num_classes
        self.has_labels = has_labels
        self.device = device
        self.save_labels = save_labels
        self.server_layout = server_layout
        self.variants = (variant, f"{variant}_crf") if crf_workers is not None else (variant,)
        self.conf: dict[str, torch.Tensor] = {}
        self.crf_conf: dict[str, torch.Tensor] = {}
        self.pending: list[_Pending] = []
        self.crf_workers = crf_workers
        self.crf_pool = None
        if crf_workers is not None:
            from utils.crf import CRFPool
            self.crf_pool = CRFPool(crf_workers)

    def path(self, *parts: str) -> Path:
        return self.out_dir.joinpath(*parts)

    def _count(self, table: dict, variant: str, pred: torch.Tensor, label: torch.Tensor) -> None:
        if not self.has_labels:
            return
        c = confusion_matrix(pred, label, self.num_classes)
        table[variant] = table[variant] + c if variant in table else c

    def _save_label(self, variant: str, name: str, pred: np.ndarray) -> None:
        if self.save_labels:
            save_label_png(self.path(variant, f"{name}.png"), pred)
        if self.server_layout and variant == self.variants[-1]:
            # PASCAL VOC evaluation server layout (CRF output when crf=true), ready to zip
            save_label_png(self.path("results", "VOC2012", "Segmentation", "comp6_test_cls",
                                     f"{name}.png"), pred)

    def add(self, name: str, pred: torch.Tensor, label: torch.Tensor) -> np.ndarray:
        """pred, label: (1, H, W) long on the device. Counts and saves; returns pred (H, W) uint8."""
        self._count(self.conf, self.variant, pred, label)
        out = pred[0].to(torch.uint8).cpu().numpy()
        self._save_label(self.variant, name, out)
        return out

    def add_crf(self, name: str, rgb: np.ndarray, probs: torch.Tensor, keys: np.ndarray,
                label: torch.Tensor) -> None:
        """Queue a CRF job: rgb (H, W, 3) uint8, probs (C, H, W), keys (C,) class id per channel."""
        gt = label[0].cpu().numpy() if self.has_labels else None
        probs = np.ascontiguousarray(probs.float().cpu().numpy())
        fut = self.crf_pool.submit(rgb, probs, np.asarray(keys, dtype=np.int64))
        self.pending.append(_Pending(f"{self.variant}_crf", name, fut, gt))
        # bound the memory held by queued probability stacks
        self.poll(block=len(self.pending) > 4 * max(1, self.crf_workers))

    def poll(self, block: bool = False) -> None:
        """Count and save the finished CRF jobs; block: wait for the oldest one at least."""
        keep = []
        for p in self.pending:
            if not (block or p.future.done()):
                keep.append(p)
                continue
            pred = p.future.result()
            block = False   # wait for the oldest one only
            if p.label is not None:
                self._count(self.crf_conf, p.variant, torch.from_numpy(pred),
                            torch.from_numpy(p.label))
            self._save_label(p.variant, p.name, pred)
        self.pending = keep

    def save_npz(self, name: str, **arrays: np.ndarray) -> None:
        write_atomic(self.path("arrays", f"{name}.npz"), lambda f: np.savez(f, **arrays),
                     durable=False)

    def save_image(self, rel: str, rgb: np.ndarray) -> None:
        save_rgb(self.path(rel), rgb)

    def save_blend(self, name: str, rgb: np.ndarray, pred: np.ndarray) -> None:
        """Segmentation overlay: half image, half palette colours."""
        blend = (0.5 * rgb.astype(np.float64) + 0.5 * colorize(pred)).astype(np.uint8)
        self.save_image(f"overlays/{name}.jpg", blend)

    def _reduced(self) -> dict[str, torch.Tensor]:
        """{variant: confusion matrix summed over the ranks} ({} without labels)."""
        table = {}
        if self.has_labels:
            # same variants on every rank, even one that got no images
            counted = {**self.conf, **self.crf_conf}
            for variant in self.variants:
                c = counted.get(variant)
                if c is None:
                    c = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
                table[variant] = udist.all_reduce_sum(c.to(self.device))
        return table

    def finish(self, log: Logger, tool: str, split: str, names: Sequence[str],
               record: Callable[[dict], dict], is_main: bool) -> dict | None:
        """Wait for CRF, all-reduce the confusion matrices, log the table and write scores.json
        (`record(scores)`, rank 0). Returns {variant: scores} on rank 0, None elsewhere."""
        while self.pending:
            self.poll(block=True)
        if self.crf_pool is not None:
            self.crf_pool.close()
        table = self._reduced()
        udist.barrier()
        result = None
        if is_main:
            result = {v: scores(c) for v, c in table.items()}
            if result:
                log.info(f"{tool} on {split}:\n" + format_table(result, names))
            else:
                log.info(f"{split} has no ground truth: predictions written, no scores")
            path = self.path("scores.json")
            write_json_atomic(path, record(result))
            log.info(f"scores written to {path}")
        udist.barrier()
        udist.cleanup()
        return result
