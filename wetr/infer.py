"""Every inference map of the evaluation (SPEC 7-8), used by validation and by the tools.

- `seed_maps` / `multi_scale_lam`: multi-scale + flip CAM (`wetr.cam.multi_scale_cam`) or LAM
  seeds, min-max normalised;
- `multi_scale_seg`: multi-scale + flip segmentation logits;
- `validation_maps`: the single-pass CAM / LAM / fused / seg maps validated during training;
- `predicted_cls_label`, `seed_crf_stack`: image labels from the network and the CRF input of
  the seeds.

The multi-scale + flip passes run an image and its mirror image as one batch (`flip_pass`); the
three kinds combine the pair and the scales as their reference does (CAM: max, ReLU, sum; LAM:
max, sum, no ReLU; seg: sum, then max over scales).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .cam import fused_map, lam, minmax_normalise, multi_scale_cam, resize_cam

SEED_KINDS = ("cam", "lam")


def reference_scales(scales: Sequence[float]) -> list[float]:
    """Seed scales in the reference's order: 1.0 first, other entries equal to 1.0 skipped."""
    return [1.0] + [s for s in scales if s != 1.0]


def flip_pass(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              out_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`fn` on x (B, 3, h, w) and its mirror image in one batch of 2B.

    Returns (maps of x, maps of the mirror image flipped back), both (B, C, *out_size): `fn`'s
    (2B, C, h', w') output resized bilinearly (align_corners=False) before the flip is undone.
    """
    b = x.shape[0]
    maps = resize_cam(fn(torch.cat([x, x.flip(-1)], dim=0)), out_size)
    return maps[:b], maps[b:].flip(-1)


@torch.no_grad()
def multi_scale_lam(model: nn.Module, x: torch.Tensor, scales: Sequence[float],
                    with_gcr: bool) -> torch.Tensor:
    """x: (B, 3, H, W) normalised -> LAM (B, K, H, W) in [0, 1) (reference `multi_scale_lam2`).

    Per scale (`reference_scales` order) the element-wise max of the LAM and its flip, summed
    over scales without a ReLU (unlike CAMs), min-max normalised. with_gcr: class tokens after
    GCR (True) or before it.
    """
    def lam_of(v: torch.Tensor) -> torch.Tensor:
        out = model(v, with_gcr=with_gcr)
        return lam(out.class_tokens, out.patch_map)

    h, w = x.shape[-2:]
    maps = []
    for s in reference_scales(scales):
        xs = x if s == 1.0 else resize_cam(x, (int(s * h), int(s * w)))
        own, flipped = flip_pass(lam_of, xs, (h, w))
        maps.append(torch.maximum(own, flipped))
    return minmax_normalise(torch.stack(maps, dim=0).sum(dim=0))


@torch.no_grad()
def seed_maps(kind: str, model: nn.Module, x: torch.Tensor, scales: Sequence[float],
              with_gcr: bool) -> torch.Tensor:
    """Seeds of `kind` ("cam" | "lam"): x (B, 3, S, S) normalised -> (B, K, S, S) in [0, 1).

    "cam": `multi_scale_cam` (ReLU per scale; with_gcr unused: CAMs do not read class tokens);
    "lam": `multi_scale_lam`.
    """
    if kind == "cam":
        return multi_scale_cam(model, x, scales)[0]
    if kind == "lam":
        return multi_scale_lam(model, x, scales, with_gcr=with_gcr)
    raise ValueError(f"seed kind must be one of {', '.join(SEED_KINDS)}; got {kind!r}")


@torch.no_grad()
def multi_scale_seg(model: nn.Module, image: torch.Tensor, size: int, scales: Sequence[float],
                    out_size: Sequence[int]) -> torch.Tensor:
    """image: (1, 3, H, W) normalised at its original size -> logits (1, K+1, *out_size).

    Per scale s the image resized to int(size s) squared, logits(x) + flip(logits(flip(x))) at
    out_size; then the max over scales (in the order given).
    """
    def seg_of(v: torch.Tensor) -> torch.Tensor:
        # GCR does not feed the decoder; skipping it saves its top-k on large inputs
        return model(v, with_gcr=False).seg_logits

    segs = []
    for s in scales:
        x = resize_cam(image, (int(size * s), int(size * s)))
        own, flipped = flip_pass(seg_of, x, out_size)
        segs.append(own + flipped)
    return torch.stack(segs, dim=0).amax(dim=0)


@dataclass
class ValidationMaps:
    """Maps of one validation batch at the label size (H, W): cam, lam, fused (B, K, H, W) in
    [0, 1); seg (B, K+1, H, W) logits; cls_logits (B, K) of the single-scale forward."""
    cam: torch.Tensor
    lam: torch.Tensor
    fused: torch.Tensor
    seg: torch.Tensor
    cls_logits: torch.Tensor


@torch.no_grad()
def validation_maps(model: nn.Module, x: torch.Tensor, cam_scales: Sequence[float],
                    out_size: Sequence[int]) -> ValidationMaps:
    """SPEC 7: x (B, 3, S, S) normalised. CAM multi-scale + flip (`multi_scale_cam`); LAM, seg
    and classifier from one forward of x; LAM and CAM upsampled to out_size, LAM then min-max
    normalised; fused = `fused_map(lam, cam)`."""
    out = model(x)
    cam = resize_cam(multi_scale_cam(model, x, cam_scales)[0], out_size)
    lam_map = minmax_normalise(resize_cam(lam(out.class_tokens, out.patch_map), out_size))
    return ValidationMaps(cam=cam, lam=lam_map, fused=fused_map(lam_map, cam),
                          seg=resize_cam(out.seg_logits, out_size), cls_logits=out.cls_logits)


def predicted_cls_label(out, min_pixels: int = 5) -> torch.Tensor:
    """Image labels from the network (reference `cam2seg`): classifier logits > 0; if no class
    is predicted, the foreground classes of the segmentation argmax (at token resolution) with at
    least `min_pixels` pixels. out: MoReOutput of one image. Returns (1, K) float."""
    cls = (out.cls_logits[:1] > 0).float()
    if cls.sum() > 0:
        return cls
    k = cls.shape[1]
    counts = torch.bincount(out.seg_logits[:1].argmax(1).flatten(), minlength=k + 1)[1:]
    return (counts >= min_pixels).float()[None]


def seed_crf_stack(maps: torch.Tensor, cls_label: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """SPEC 8 CRF input: (1 − max over present classes, present-class maps).

    maps: (1, K, H, W); cls_label: (1, K). Returns probs (1 + P, H, W) and keys (1 + P,) class
    ids [0, c1 + 1, ...]; no present class gives an empty stack (the CRF then labels all 0).
    """
    keys = cls_label[0].nonzero()[:, 0]
    valid = maps[0, keys]
    if keys.numel() == 0:
        return valid, np.zeros(0, dtype=np.int64)
    probs = torch.cat([1 - valid.amax(0, keepdim=True), valid], dim=0)
    return probs, np.concatenate([[0], keys.cpu().numpy() + 1])
