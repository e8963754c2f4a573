"""Label PNGs with the VOC palette, colour images and jet overlays (METHOD.md §8).

A label PNG is a palette ("P" mode) image whose pixel values are the class indices (uint8,
255 = ignore stays 255); the palette only changes how viewers show it, so the file reads back
as the index map. This is also the PASCAL VOC test-server format.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from utils.io import write_atomic


def _voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: bits of the index spread over R, G, B from the high bit down."""
    idx = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for ch in range(3):
            rgb[:, ch] |= ((idx >> (3 * shift + ch)) & 1) << (7 - shift)
    return rgb.astype(np.uint8)


VOC_PALETTE: np.ndarray = _voc_palette()   # (256, 3) uint8; 0 black, 255 = (224, 224, 192)


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """label: (H, W) integer map with values in 0..255 -> palette PNG at `path` (atomic)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    im = Image.fromarray(label)
    im.putpalette(VOC_PALETTE.reshape(-1).tolist())   # turns the "L" image into "P"
    write_atomic(path, lambda f: im.save(f, format="PNG"), durable=False)


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 index map of a palette or grayscale PNG."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette or grayscale label PNG, got mode {im.mode}")
        return np.array(im, dtype=np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) index map -> (H, W, 3) uint8 RGB with the VOC palette."""
    return VOC_PALETTE[np.asarray(label).astype(np.int64) & 255]


def jet_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map over an image, as the reference seed tools do.

    image: (H, W, 3) uint8 RGB; heat: (H, W) float in [0, 1].
    Returns (H, W, 3) uint8 = trunc(alpha · jet(heat) · 255 + (1 − alpha) · image).
    """
    from matplotlib import colormaps   # matplotlib is slow to import; only overlays need it

    rgb = colormaps["jet"](np.asarray(heat, dtype=np.float64))[..., :3] * 255
    return (alpha * rgb + (1 - alpha) * image.astype(np.float64)).astype(np.uint8)


def save_rgb(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """(H, W, 3) uint8 -> image file (format from the suffix: .jpg, .png), atomic."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[Path(path).suffix.lower()]
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    write_atomic(path, lambda f: im.save(f, format=fmt, **kwargs), durable=False)
