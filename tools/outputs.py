"""What the tools write for each image, and how a resumed run finds what is already done.

`EvalWriter` (the evaluation tools) and `PredictWriter` (tools/predict.py) take a finished
`tools.routes.Output` and write its files, each atomically (utils.io), in an order that ends with
the label PNGs: an image whose label PNGs all exist is complete (`EvalWriter.done`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from utils.io import write_atomic, write_text_atomic
from utils.palette import jet_overlay, save_label_png, save_rgb

from .routes import Output, colour_blend

SERVER_DIR = ("results", "VOC2012", "Segmentation", "comp6_test_cls")   # PASCAL VOC test server


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
