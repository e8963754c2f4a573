"""The per-image routes of evaluation and prediction (METHOD.md §8): one image in, its predictions out.

    route(params, item) -> Output

Routes: "cam" / "lam" (seeds), "cam2seg" (LAM as segmentation: the lam route with predicted
image labels), "seg" (segmentation head) and "predict" (the seg route on the user's images, with
the CAM / LAM maps its overlays need). A route computes maps (`wetr.infer`) and returns plain
arrays; it writes nothing and counts nothing: the CRF step (`tools.crf_step.CRFStep`), the
metrics and the writers (`tools.outputs`) take the `Output` from there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from utils.palette import colorize, jet_overlay
from wetr.cam import denormalise_255, maps_to_label, resize_bilinear
from wetr.infer import (classifier_first_labels, multi_scale_seg, seed_crf_stack, seed_maps,
                        seg_first_labels)


@dataclass(frozen=True)
class Item:
    """One image: image (1, 3, H, W) normalised on the device; label (1, H, W) long or None (no
    mask); cls_label (1, K) float or None; rgb (H, W, 3) uint8 when the caller has the decoded
    pixels (predict), else recovered from `image`."""
    name: str
    image: torch.Tensor
    label: torch.Tensor | None = None
    cls_label: torch.Tensor | None = None
    rgb: np.ndarray | None = None


@dataclass(frozen=True)
class RouteParams:
    """What a route reads, resolved once per run."""
    model: nn.Module
    variant: str                        # "cam" | "lam" | "seg": the prediction's name
    size: int                           # images resized to size x size
    scales: tuple[float, ...]
    seed_scales: tuple[float, ...] = (1.0,)   # predict: scales of its CAM / LAM overlays
    bkg: float = 0.5
    predicted_labels: bool = False      # seeds: image labels from the network (cam2seg)
    has_labels: bool = True             # the split has masks (val label order) or not (test)
    with_gcr: bool = True
    crf: bool = False
    arrays: bool = False                # .npz maps
    overlays: bool = False
    names: tuple[str, ...] = ()         # K + 1 class names (overlay file names)


@dataclass
class Output:
    """One image's predictions.

    labels: variant -> (H, W) uint8 label map (the CRF step adds "<variant>_crf"); gt: (H, W)
    int64 ground truth or None; rgb: (H, W, 3) uint8 when CRF or overlays need it; crf: the CRF
    input (probs (C, H, W) float32 tensor on the model's device, keys (C,) class id per channel)
    until the CRF step has run;
    arrays: the .npz payload; images: (relative path, (H, W, 3) uint8) overlays; maps: predict's
    CAM / LAM (K, H, W) in [0, 1] for the overlays of the classes it finally predicts."""
    name: str
    labels: dict[str, np.ndarray]
    gt: np.ndarray | None = None
    rgb: np.ndarray | None = None
    crf: tuple[torch.Tensor, np.ndarray] | None = None
    arrays: dict[str, np.ndarray] | None = None
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def final(self) -> np.ndarray:
        """The last label map added (the CRF output when there is one)."""
        return next(reversed(self.labels.values()))


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) -> (H, W, 3) uint8, rounded: recovers the decoded pixels
    (the reference CRF reads the JPEG itself)."""
    rgb = denormalise_255(image[None].double())[0].round().clamp(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _uint8(label: torch.Tensor) -> np.ndarray:
    return label[0].to(torch.uint8).cpu().numpy()


def _start(p: RouteParams, item: Item) -> Output:
    gt = item.label[0].cpu().numpy() if p.has_labels and item.label is not None else None
    rgb = item.rgb
    if rgb is None and (p.crf or p.overlays):
        rgb = to_uint8_rgb(item.image[0])
    return Output(item.name, {}, gt=gt, rgb=rgb)


def seed_route(p: RouteParams, item: Item) -> Output:
    """CAM / LAM seeds (p.variant): the image resized to size x size, multi-scale + flip maps in
    [0, 1] upsampled to the label size, labelled with bkg using the ground-truth (or predicted)
    image labels; CRF input (METHOD.md §8), arrays and jet overlays when asked."""
    out = _start(p, item)
    x = resize_bilinear(item.image, (p.size, p.size))
    cls_label = item.cls_label
    if p.predicted_labels:
        # the reference's label order: classifier first on a labelled split (infer_lam.py),
        # segmentation head first on the test split (infer_lam_test_75.py)
        order = classifier_first_labels if p.has_labels else seg_first_labels
        net = p.model(x, with_gcr=p.with_gcr)
        cls_label = order(net.cls_logits, net.seg_logits)
    maps = seed_maps(p.variant, p.model, x, p.scales, with_gcr=p.with_gcr)
    maps = resize_bilinear(maps, item.image.shape[-2:])
    out.labels[p.variant] = _uint8(maps_to_label(maps, cls_label, bkg=p.bkg))
    if p.crf:
        probs, keys = seed_crf_stack(maps, cls_label)
        out.crf = (probs.float(), keys.astype(np.int64))
    present = cls_label[0].nonzero()[:, 0]
    if p.arrays:
        out.arrays = {p.variant: maps[0, present].half().cpu().numpy(),
                      "classes": (present + 1).cpu().numpy()}
    if p.overlays:
        heat = (maps * cls_label[:, :, None, None]).amax(1)[0].cpu().numpy()
        out.images.append((f"overlays/{item.name}.jpg", jet_overlay(out.rgb, heat, 0.5)))
        for c in present.tolist():
            out.images.append((f"overlays_class/{item.name}_{p.names[c + 1].replace(' ', '_')}.jpg",
                               jet_overlay(out.rgb, maps[0, c].cpu().numpy(), 0.6)))
    return out


def colour_blend(rgb: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Half image, half palette colours: (H, W, 3) uint8."""
    return (0.5 * rgb.astype(np.float64) + 0.5 * colorize(label)).astype(np.uint8)


def seg_route(p: RouteParams, item: Item) -> Output:
    """Segmentation: multi-scale + flip logits at the image size, argmax; CRF input (the
    softmax), arrays (logits) and the colour blend when asked."""
    out = _start(p, item)
    seg = multi_scale_seg(p.model, item.image, p.size, p.scales, item.image.shape[-2:])
    out.labels["seg"] = _uint8(seg.argmax(1))
    if p.crf:
        out.crf = (seg[0].softmax(0).float(), np.arange(seg.shape[1], dtype=np.int64))
    if p.arrays:
        out.arrays = {"seg": seg[0].half().cpu().numpy()}
    if p.overlays:
        out.images.append((f"overlays/{item.name}.jpg", colour_blend(out.rgb, out.labels["seg"])))
    return out


def predict_route(p: RouteParams, item: Item) -> Output:
    """The seg route on a user's image; with p.overlays also its CAM and LAM (K, H, W) in [0, 1]
    at p.seed_scales, kept for the overlays of the classes finally predicted (after CRF)."""
    out = seg_route(RouteParams(p.model, "seg", p.size, p.scales, crf=p.crf), item)
    if p.overlays:
        x = resize_bilinear(item.image, (p.size, p.size))
        for kind in ("cam", "lam"):
            maps = seed_maps(kind, p.model, x, p.seed_scales, with_gcr=p.with_gcr)
            out.maps[kind] = resize_bilinear(maps, item.image.shape[-2:])[0].clamp(0, 1).cpu().numpy()
    return out


Route = Callable[[RouteParams, Item], Output]
ROUTES: dict[str, Route] = {"cam": seed_route, "lam": seed_route, "cam2seg": seed_route,
                            "seg": seg_route, "predict": predict_route}
