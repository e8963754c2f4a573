"""Pseudo labels from CAMs and LAMs (METHOD.md §4 and §7).

Pure tensor functions: they never move tensors between devices and never synchronise with the
host, so they can run inside the training step. Labels are long tensors with 0 = background,
1..K = classes, 255 = ignore.
"""
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.metrics import IGNORE_INDEX
from wetr.par import PAR

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def denormalise_255(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images (B, 3, H, W) -> float RGB in 0..255 (not rounded)."""
    # Filled on the device (no host->device copy, which would wait for the device on CUDA).
    std = torch.stack([images.new_full((), v) for v in IMAGENET_STD_255]).view(1, 3, 1, 1)
    mean = torch.stack([images.new_full((), v) for v in IMAGENET_MEAN_255]).view(1, 3, 1, 1)
    return images * std + mean


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images (B, 3, H, W) -> float in 0..1, truncated to uint8 levels first.

    The reference casts to uint8 (truncation) before dividing by 255; the clamp makes the
    out-of-range case (where a uint8 cast wraps around) well defined and changes nothing else.
    """
    return denormalise_255(images).clamp(0, 255).floor() / 255.0


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Images or maps: x (B, C, H, W) -> (B, C, *size), bilinear, align_corners=False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def minmax_normalise(maps: torch.Tensor) -> torch.Tensor:
    """maps: (B, K, H, W) -> per image and class m - min, then / (max + 1e-5)."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def reference_scales(scales: Sequence[float]) -> list[float]:
    """Seed scales in the reference's order: 1.0 first, other entries equal to 1.0 skipped."""
    return [1.0] + [s for s in scales if s != 1.0]


def unflip(maps: torch.Tensor, out_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """maps: (2B, C, h, w) of [images; mirrored images] -> (maps of the images, maps of the
    mirrored ones flipped back), both (B, C, *out_size): resized bilinearly
    (align_corners=False) before the flip is undone. The first is a view of the resized buffer."""
    b = maps.shape[0] // 2
    maps = resize_bilinear(maps, out_size)
    return maps[:b], maps[b:].flip(-1)


def flip_pass(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              out_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`fn` on x (B, 3, h, w) and its mirror image in one batch of 2B, then `unflip`: (maps of
    x, maps of the mirror image flipped back), both (B, C, *out_size)."""
    return unflip(fn(torch.cat([x, x.flip(-1)], dim=0)), out_size)


def cam_pass(model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x (B, 3, H, W) -> (cam, aux_cam) at token resolution: MoRe's `cams`, or for a network
    with only the reference's forward contract, `model(x, cam_only=True) -> (aux_cam, cam)`
    reordered (METHOD.md §11: the reference network and ours are interchangeable here)."""
    if hasattr(model, "cams"):
        return model.cams
    return lambda x: model(x, cam_only=True)[::-1]


@torch.no_grad()
def multi_scale_cam(model: nn.Module, images: torch.Tensor, scales: Sequence[float],
                    first: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale, flip-augmented CAM and aux CAM, min-max normalised (METHOD.md §4).

    images: (B, 3, H, W) normalised; model: a MoRe or the reference network (see `cam_pass`).
    Returns (cam, aux_cam), both (B, K, H, W) float32 in [0, 1).
    As in the reference, scale 1.0 is always evaluated, first, and other entries equal to 1.0 are
    skipped; the per-scale maps are summed in that order.
    first: (cam, aux_cam) of `images` themselves at scale 1.0 when the caller already has them
    (the training forward, same weights): then only their flips go through the network there.
    """
    h, w = images.shape[-2:]
    cams = cam_pass(model)
    total = None
    for s in reference_scales(scales):
        size = (int(s * h), int(s * w))
        x = images if size == (h, w) else resize_bilinear(images, size)
        if first is not None and size == (h, w):
            mirrored = cams(x.flip(-1))
            cam, aux_cam = (torch.cat([a, m], dim=0) for a, m in zip(first, mirrored))
        else:
            cam, aux_cam = cams(torch.cat([x, x.flip(-1)], dim=0))
        # One resize for both maps (channels are independent), in float32 even under autocast:
        # half-precision sums would quantise the maps the thresholds act on.
        own, flipped = unflip(torch.cat([cam, aux_cam], dim=1).float(), (h, w))
        # Max and ReLU in place on the upsampled maps: one (2B, 2K, H, W) buffer for the chain.
        both = torch.maximum(own, flipped, out=own).clamp_(min=0)
        total = both if total is None else total.add_(both)
    # minmax_normalise in place, both stacks at once (it is per image and channel); the two
    # results are views of that one buffer.
    total = total.sub_(total.amin(dim=(-2, -1), keepdim=True))
    total = total.div_(total.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    k = total.shape[1] // 2
    return total[:, :k], total[:, k:]


def cam_to_label(cam: torch.Tensor, cls_label: torch.Tensor, bkg: float = 0.5, high: float = 0.7,
                 low: float = 0.25, ignore_mid: bool = True) -> torch.Tensor:
    """cam: (B, K, H, W); cls_label: (B, K) 0/1 -> label (B, H, W) long.

    Best present class + 1; with ignore_mid: 255 where its score <= high, 0 where <= low;
    without: 0 where its score <= bkg.
    """
    value, index = (cam * cls_label[:, :, None, None]).max(dim=1)
    label = index + 1
    if ignore_mid:
        label = label.masked_fill(value <= high, IGNORE_INDEX)
        return label.masked_fill(value <= low, 0)
    return label.masked_fill(value <= bkg, 0)


def maps_to_label(maps: torch.Tensor, cls_label: torch.Tensor, bkg: float = 0.5) -> torch.Tensor:
    """Validation labels (METHOD.md §7): maps (B, K, H, W) -> (B, H, W) long, background where <= bkg."""
    return cam_to_label(maps, cls_label, bkg=bkg, ignore_mid=False)


def refine_label(par: PAR, images: torch.Tensor, cam: torch.Tensor, cls_label: torch.Tensor,
                 high: float = 0.7, low: float = 0.25, num_present: int | None = None) -> torch.Tensor:
    """PAR-refined pixel label (METHOD.md §4, reference `refine_cams_with_bkg_v2`).

    images: (B, 3, H, W) denormalised to 0..1; cam: (B, K, H, W) already multiplied by the
    labels; cls_label: (B, K) 0/1. Returns (B, H, W) long.
    num_present: an upper bound P on the number of present classes of any image of the batch;
    only P class channels (plus background) per image go through PAR. Default: counted from
    `cls_label` when it is a CPU tensor (no device sync), else K (every channel). A training
    loop on a GPU gets it for free from the loader's CPU labels.

    The reference loops over images and keeps only background + present classes. Here one
    batched PAR call takes, per image, background + the first P class channels in the order
    "present classes ascending, then absent ones"; absent channels are masked to -inf before
    the channel softmax, so they are exact zeros, stay zero through PAR (linear per channel)
    and never win the argmax against the positive background. The argmax position maps back
    to the class id through the gathered channel order.
    """
    b, k, h, w = cam.shape
    if num_present is None:
        num_present = int((cls_label != 0).sum(dim=1).max()) if cls_label.device.type == "cpu" and b else k
    p = min(max(int(num_present), 0), k)
    # Present classes first (ascending), then absent ones: a stable sort on "is absent".
    order = torch.sort((cls_label == 0).to(torch.uint8), dim=1, stable=True).indices[:, :p]  # (B, P)
    present = torch.cat([cls_label.new_ones(b, 1), cls_label.gather(1, order)], dim=1) != 0
    absent = ~present[:, :, None, None]  # (B, P+1, 1, 1)
    cam = cam.gather(1, order[:, :, None, None].expand(-1, -1, h, w))

    half = (h // 2, w // 2)
    small_images = resize_bilinear(images, half)
    # Background planes are added at full size and downsampled with the CAMs, as the reference does.
    planes = torch.stack([cam.new_full((), high), cam.new_full((), low)]).view(1, 2, 1, 1)
    planes = planes.expand(b, 2, h, w)  # filled on the device: no host->device copy
    stack = resize_bilinear(torch.cat([planes, cam], dim=1), half)
    logits = torch.cat([stack[:, 0:1], stack[:, 2:], stack[:, 1:2], stack[:, 2:]], dim=1)
    probs = torch.cat([
        logits[:, :p + 1].masked_fill(absent, float("-inf")).softmax(dim=1),
        logits[:, p + 1:].masked_fill(absent, float("-inf")).softmax(dim=1),
    ], dim=1)
    refined = resize_bilinear(par(small_images, probs), (h, w))
    class_ids = torch.cat([order.new_zeros(b, 1), order + 1], dim=1)  # (B, P+1)
    label_high = class_ids.gather(1, refined[:, :p + 1].argmax(dim=1).flatten(1)).view(b, h, w)
    label_low = class_ids.gather(1, refined[:, p + 1:].argmax(dim=1).flatten(1)).view(b, h, w)
    label = label_high.masked_fill(label_high == 0, IGNORE_INDEX)
    return label.masked_fill((label_high + label_low) == 0, 0)


def lam(class_tokens: torch.Tensor, patch_map: torch.Tensor) -> torch.Tensor:
    """Localisation attention map (METHOD.md §3): class_tokens (B, K, D), patch_map (B, D, h, w) -> (B, K, h, w)."""
    return torch.einsum("bkd,bdhw->bkhw", class_tokens, patch_map)


def fused_map(lam_n: torch.Tensor, cam_n: torch.Tensor) -> torch.Tensor:
    """Validation fused map (METHOD.md §7): normalised LAM * normalised CAM, min-max normalised again."""
    return minmax_normalise(lam_n * cam_n)
