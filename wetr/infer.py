"""Every inference map of the evaluation (METHOD.md §7-8), used by validation and by the tools.

- `seed_maps` / `multi_scale_lam`: multi-scale + flip CAM (`wetr.cam.multi_scale_cam`) or LAM
  seeds, min-max normalised;
- `multi_scale_seg`: multi-scale + flip segmentation logits;
- `validation_maps`: the maps validated during training (multi-scale CAM; LAM, fused, seg and
  classifier of one forward);
- `classifier_first_labels` / `seg_first_labels`: image labels from the network in the
  reference's val / test order (LAM as segmentation, `cam2seg`), both with its first-class quirk
  (`seg_argmax_labels`); `seed_crf_stack`: the CRF input of the seeds.

The multi-scale + flip passes run an image and its mirror image as one batch
(`wetr.cam.flip_pass`, scales in `wetr.cam.reference_scales` order for the seeds); the three kinds
combine the pair and the scales as their reference does (CAM: max, ReLU, sum; LAM: max, sum, no
ReLU; seg: sum, then max over scales).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cam import (flip_pass, fused_map, lam, minmax_normalise, multi_scale_cam, reference_scales,
                  resize_bilinear)

SEED_KINDS = ("cam", "lam")


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
        xs = x if s == 1.0 else resize_bilinear(x, (int(s * h), int(s * w)))
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
        x = resize_bilinear(image, (int(size * s), int(size * s)))
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
    """METHOD.md §7: x (B, 3, S, S) normalised. CAM multi-scale + flip (`multi_scale_cam`); LAM, seg
    and classifier from one forward of x; LAM and CAM upsampled to out_size, LAM then min-max
    normalised; fused = `fused_map(lam, cam)`."""
    out = model(x)
    cam = resize_bilinear(multi_scale_cam(model, x, cam_scales)[0], out_size)
    lam_map = minmax_normalise(resize_bilinear(lam(out.class_tokens, out.patch_map), out_size))
    return ValidationMaps(cam=cam, lam=lam_map, fused=fused_map(lam_map, cam),
                          seg=resize_bilinear(out.seg_logits, out_size), cls_logits=out.cls_logits)


def argmax_pixel_counts(seg_logits: torch.Tensor) -> torch.Tensor:
    """seg_logits: (B, K+1, h, w) -> (B, K+1) long: pixels of each class in the argmax."""
    pred = seg_logits.argmax(1).flatten(1)
    return F.one_hot(pred, seg_logits.shape[1]).sum(1)


def seg_argmax_labels(counts: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """The foreground classes of the seg argmax covering at least `min_pixels` cells, with the
    reference's quirk (both of its cam2seg scripts): the per-class pixel check loops over the
    sorted argmax classes after the first (`cls_idx[1:]`), assuming that one is the background;
    when the argmax has no background cell, the first (lowest) foreground class is therefore kept
    whatever its size.

    counts: (B, K+1) pixels of each class in the argmax (`argmax_pixel_counts`). Returns (B, K)
    bool."""
    fg = counts[:, 1:]
    first = F.one_hot((fg > 0).int().argmax(1), fg.shape[1]).bool()
    return (fg >= min_pixels) | (first & (counts[:, :1] == 0))


def classifier_first_labels(cls_logits: torch.Tensor, seg_logits: torch.Tensor,
                            min_pixels: int = 5) -> torch.Tensor:
    """Image labels from the network, val order (reference infer_lam.py, `cam2seg`, METHOD.md §8): the
    classifier's classes (logits > 0); for an image where it predicts none, the foreground
    classes of the seg argmax covering at least `min_pixels` pixels (`seg_argmax_labels`: with no
    background cell in the argmax, the lowest foreground class is kept whatever its size, as the
    reference keeps it).

    cls_logits: (B, K); seg_logits: (B, K+1, h, w) at the logits' resolution. Returns (B, K)
    float 0/1."""
    cls = cls_logits > 0
    seg = seg_argmax_labels(argmax_pixel_counts(seg_logits), min_pixels)
    return torch.where(cls.any(1, keepdim=True), cls, seg).float()


def seg_first_labels(cls_logits: torch.Tensor, seg_logits: torch.Tensor,
                     min_pixels: int = 4) -> torch.Tensor:
    """Image labels from the network, test order (reference infer_lam_test_75.py, METHOD.md §8): the
    foreground classes of the seg argmax covering at least `min_pixels` pixels
    (`seg_argmax_labels`, quirk included); only for an image whose argmax has no foreground class
    at all, the classifier's (logits > 0). Shapes as `classifier_first_labels`."""
    counts = argmax_pixel_counts(seg_logits)
    seg = seg_argmax_labels(counts, min_pixels)
    return torch.where((counts[:, 1:] > 0).any(1, keepdim=True), seg, cls_logits > 0).float()


def seed_crf_stack(maps: torch.Tensor, cls_label: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """METHOD.md §8 CRF input: (1 − max over present classes, present-class maps).

    maps: (1, K, H, W); cls_label: (1, K). Returns probs (1 + P, H, W) and keys (1 + P,) class
    ids [0, c1 + 1, ...]; no present class gives an empty stack (the CRF then labels all 0).
    """
    keys = cls_label[0].nonzero()[:, 0]
    valid = maps[0, keys]
    if keys.numel() == 0:
        return valid, np.zeros(0, dtype=np.int64)
    probs = torch.cat([1 - valid.amax(0, keepdim=True), valid], dim=0)
    return probs, np.concatenate([[0], keys.cpu().numpy() + 1])
