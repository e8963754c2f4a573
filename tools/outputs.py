"""What the tools write for each image, and how a resumed run finds what is already done.

`EvalWriter` (the evaluation tools), `PseudoMaskWriter` (tools/export_pseudo_masks.py) and
`PredictWriter` (tools/predict.py) take a finished `tools.routes.Output` and write its files, each
atomically (utils.io), in an order that ends with the label PNGs: an image whose label PNGs all
exist is complete (`EvalWriter.done`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from utils.io import remove_stale_tmp, write_atomic, write_text_atomic
from utils.palette import jet_overlay, save_label_png, save_rgb

from .routes import Output, colour_blend

SERVER_DIR = ("results", "VOC2012", "Segmentation", "comp6_test_cls")   # PASCAL VOC test server
PSEUDO_DIR = "SegmentationClassPseudo"   # the export's masks, named as VOC's SegmentationClass


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


class EvalWriter:
    """Files of the evaluation tools under out_dir: <variant>/<name>.png for each label map
    (save_labels), arrays/<name>.npz, overlays, and on a VOC test split the final label map in the
    test-server layout (results/VOC2012/Segmentation/comp6_test_cls/<name>.png).

    variants: the label maps every image gets, in writing order (e.g. ("seg", "seg_crf")).
    """

    def __init__(self, out_dir: Path, variants: tuple[str, ...], save_labels: bool,
                 save_arrays: bool, server_layout: bool):
        self.out_dir = out_dir
        self.variants = variants
        self.save_labels = save_labels
        self.save_arrays = save_arrays
        self.server_layout = server_layout

    def label_path(self, variant: str, name: str) -> Path:
        return self.out_dir / variant / f"{name}.png"

    def server_path(self, name: str) -> Path:
        return self.out_dir.joinpath(*SERVER_DIR, f"{name}.png")

    def write(self, out: Output) -> None:
        """Arrays and overlays first, label PNGs last (see `done`)."""
        if out.arrays is not None:
            write_atomic(self.out_dir / "arrays" / f"{out.name}.npz",
                         lambda f: np.savez(f, **out.arrays), durable=False)
        for rel, rgb in out.images:
            save_rgb(self.out_dir / rel, rgb)
        if self.save_labels:
            for variant in self.variants:
                save_label_png(self.label_path(variant, out.name), out.labels[variant])
        if self.server_layout:
            save_label_png(self.server_path(out.name), out.final)

    def done(self, name: str) -> bool:
        """Whether a killed run completed this image: every file written last exists."""
        paths = [self.label_path(v, name) for v in self.variants] if self.save_labels else []
        if self.server_layout:
            paths.append(self.server_path(name))
        if self.save_arrays:
            paths.append(self.out_dir / "arrays" / f"{name}.npz")
        return bool(paths) and all(p.is_file() for p in paths)

    def remove_stale_tmp(self) -> None:
        """Delete the temp files a killed run left in this writer's folders (resume)."""
        for sub in (*self.variants, "arrays", "overlays", "overlays_class", "",
                    "/".join(SERVER_DIR)):
            remove_stale_tmp(self.out_dir / sub)

    def finish(self, names: list[str], split: str) -> str | None:
        """Rank 0, once every rank is done: files that cover the whole split, and the line to
        log about them. The evaluation tools have none (the VOC test archive is packed by the
        report)."""
        return None


class PseudoMaskWriter(EvalWriter):
    """The pseudo-mask export: the final label map (the CRF output with crf=true) of each image
    as <out>/SegmentationClassPseudo/<name>.png (palette PNG, values 0..K; nested names keep their
    sub-folders) and, after the loop, <out>/<split>.txt listing the images exported: the
    img_dir + ann_dir + split layout that mmsegmentation and DeepLab-style loaders read. With
    crf=true the seeds before CRF are kept under <out>/<variant>/ too (their mIoU row, resume).

    image_path: name -> the image file (the mmsegmentation hint of `finish`)."""

    def __init__(self, out_dir: Path, variants: tuple[str, ...], image_path: Callable[[str], str]):
        super().__init__(out_dir, variants, save_labels=True, save_arrays=False,
                         server_layout=False)
        self.image_path = image_path

    def label_path(self, variant: str, name: str) -> Path:
        if variant == self.variants[-1]:
            return self.out_dir / PSEUDO_DIR / f"{name}.png"
        return super().label_path(variant, name)

    def remove_stale_tmp(self) -> None:
        """Nested names write in sub-folders: those are cleaned too."""
        super().remove_stale_tmp()
        for folder in (self.out_dir / PSEUDO_DIR, self.out_dir / self.variants[0]):
            for sub in (folder, *(p for p in folder.rglob("*") if p.is_dir())):
                remove_stale_tmp(sub)

    def finish(self, names: list[str], split: str) -> str | None:
        """Write <out>/<split>.txt (the names whose mask exists, in split order); the line says
        where, and how mmsegmentation reads it (absolute paths, to paste into its config)."""
        done = [n for n in names if self.done(n)]
        write_text_atomic(self.out_dir / f"{split}.txt", "".join(f"{n}\n" for n in done))
        out = self.out_dir.absolute()
        line = (f"pseudo masks: {len(done)} of {len(names)} images in {out / PSEUDO_DIR}, "
                f"list {out / f'{split}.txt'}")
        if done:
            path, name = os.path.abspath(self.image_path(done[0])), done[0]
            at = path.rfind(name)
            img_dir, suffix = (path[:at].rstrip("/\\"), path[at + len(name):]) if at >= 0 else (
                os.path.dirname(path), "")
            line += (f"\nmmsegmentation: data_prefix=dict(img_path='{img_dir}', seg_map_path="
                     f"'{out / PSEUDO_DIR}'), ann_file='{out / f'{split}.txt'}'"
                     f", img_suffix='{suffix}', seg_map_suffix='.png' (0.x: img_dir, ann_dir, "
                     f"split; docs/OWN_DATASET.md)")
        return line


class PredictWriter:
    """tools/predict.py's files: seg/<name>.png (the final label map), overlay/<name>.jpg (palette
    colours over the image) and, when the route kept CAM / LAM maps, cam/ and lam/
    <name>_<class>.jpg jet overlays of every predicted class."""

    def __init__(self, out_dir: Path, names: list[str]):
        self.out_dir = out_dir
        self.names = names

    def present(self, out: Output) -> list[int]:
        return [int(c) for c in np.unique(out.final) if 0 < c < len(self.names)]

    def write(self, out: Output) -> None:
        label = out.final
        save_label_png(self.out_dir / "seg" / f"{out.name}.png", label)
        save_rgb(self.out_dir / "overlay" / f"{out.name}.jpg", colour_blend(out.rgb, label))
        for kind, maps in out.maps.items():
            for c in self.present(out):
                tag = self.names[c].replace(" ", "_")
                save_rgb(self.out_dir / kind / f"{out.name}_{tag}.jpg",
                         jet_overlay(out.rgb, maps[c - 1], 0.5))
