"""LAM seeds on the training images (SPEC 3, 8), with optional CRF; LAM as segmentation.

    python -m tools.infer_lam ckpt=logs/voc/checkpoints/best.pth                  # train, scale 1.0
    torchrun --nproc_per_node=2 -m tools.infer_lam ckpt=... multi_scale=true crf=true
    python -m tools.infer_lam ckpt=... cam2seg=true                    # val: the paper's 76.4 route
    python -m tools.infer_lam ckpt=... cam2seg=true infer_set=test     # test: the 75.0 route

LAM = class tokens (after GCR; model.with_gcr=false: before) · patch map, at every scale and its
flip (max), summed without ReLU, min-max normalised (the reference `multi_scale_lam2`). Outputs as
`tools.infer_cam`, with "lam" for "cam".

cam2seg=true (the reference's switch): LAM seeds as the segmentation, by default on the val split,
at the 7 seed scales with flip, background 0.5, DenseCRF, and image labels predicted by the
network (defaults `CAM2SEG_DEFAULTS`; explicit keys win). The label order follows the split: a
labelled split takes `classifier_first_labels` (the reference infer_lam.py), a test split
`seg_first_labels` (infer_lam_test_75.py). Output folder <run>/eval/<ckpt stem>/cam2seg_<set>, a
test split with the server layout results/VOC2012/Segmentation/comp6_test_cls/ (CRF output), so
it never overwrites the segmentation head's submission (infer_seg_voc_<set>).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tools.common import (SEED_SCALES, Evaluation, parse_config, resize, run, run_seeds,
                          seed_crf_stack, seed_prediction, to_uint8_rgb)

CAM2SEG_DEFAULTS = {"multi_scale": True, "crf": True, "cls_labels": "pred"}


@torch.no_grad()
def multi_scale_lam(model: torch.nn.Module, x: torch.Tensor, scales: Sequence[float],
                    with_gcr: bool = True) -> torch.Tensor:
    """x: (B, 3, H, W) normalised -> LAM (B, K, H, W) in [0, 1).

    As in the reference, scale 1.0 comes first whatever `scales` says and other 1.0 entries are
    skipped; unlike CAMs, LAMs are summed without a ReLU.
    """
    from wetr.cam import lam, minmax_normalise

    b, _, h, w = x.shape
    maps = []
    for s in [1.0] + [s for s in scales if s != 1.0]:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear",
                                              align_corners=False)
        out = model(torch.cat([xs, xs.flip(-1)], dim=0), with_gcr=with_gcr)
        m = F.interpolate(lam(out.class_tokens, out.patch_map), size=(h, w), mode="bilinear",
                          align_corners=False)
        maps.append(torch.maximum(m[:b], m[b:].flip(-1)))
    return minmax_normalise(torch.stack(maps, dim=0).sum(dim=0))


def lam_maps(model: torch.nn.Module, x: torch.Tensor, scales: Sequence[float], cfg) -> torch.Tensor:
    return multi_scale_lam(model, x, scales, with_gcr=cfg.model.with_gcr)


# ----------------------------------------------------------------------------- predicted labels
def argmax_pixel_counts(seg_logits: torch.Tensor) -> torch.Tensor:
    """seg_logits: (B, K+1, h, w) -> (B, K+1) long: pixels of each class in the argmax."""
    pred = seg_logits.argmax(1).flatten(1)
    return F.one_hot(pred, seg_logits.shape[1]).sum(1)


def classifier_first_labels(cls_logits: torch.Tensor, seg_logits: torch.Tensor,
                            min_pixels: int = 5) -> torch.Tensor:
    """Val route (reference infer_lam.py with cam2seg): the classifier's classes (logits > 0);
    for an image where it predicts none, the foreground classes of the seg argmax covering at
    least `min_pixels` pixels. cls_logits: (B, K); seg_logits: (B, K+1, h, w) at the logits'
    resolution. Returns (B, K) float 0/1 (as `tools.common.predicted_cls_label`, batched)."""
    cls = cls_logits > 0
    seg = argmax_pixel_counts(seg_logits)[:, 1:] >= min_pixels
    return torch.where(cls.any(1, keepdim=True), cls, seg).float()


def seg_first_labels(cls_logits: torch.Tensor, seg_logits: torch.Tensor,
                     min_pixels: int = 4) -> torch.Tensor:
    """Test route (reference infer_lam_test_75.py): the foreground classes of the seg argmax
    covering at least `min_pixels` pixels; only for an image whose argmax has no foreground class
    at all, the classifier's (logits > 0). Shapes as `classifier_first_labels`."""
    counts = argmax_pixel_counts(seg_logits)
    fg = counts[:, 1:]
    seg = fg >= min_pixels
    # Reproduced quirk: the reference's per-class pixel check starts after the first class of the
    # sorted argmax classes, assuming that one is the background; when the argmax has no
    # background, the first (lowest) foreground class is therefore kept whatever its size.
    first = F.one_hot((fg > 0).int().argmax(1), fg.shape[1]).bool()
    seg = seg | (first & (counts[:, :1] == 0))
    return torch.where((fg > 0).any(1, keepdim=True), seg, cls_logits > 0).float()


def run_cam2seg(argv: Sequence[str]) -> dict | None:
    """LAM as segmentation (SPEC 8): predicted labels in the split's order, LAM seeds labelled
    with bkg, CRF on (1 - max, present-class maps). Returns {"lam", "lam_crf": scores} (rank 0)."""
    ev = Evaluation("cam2seg", "lam", argv, CAM2SEG_DEFAULTS, default_scales=(1.0,),
                    multi_scales=SEED_SCALES, needs_image_labels=True)
    cfg = ev.cfg
    order = classifier_first_labels if ev.has_labels else seg_first_labels
    if cfg.cls_labels == "pred":
        ev.log.info(f"cam2seg: image labels by {order.__name__}")
    with torch.no_grad():
        for name, image, label, cls_label in ev.items():
            x = resize(image, (cfg.size, cfg.size))
            if cfg.cls_labels == "pred":
                out = ev.model(x, with_gcr=cfg.model.with_gcr)
                cls_label = order(out.cls_logits, out.seg_logits)
            maps = resize(multi_scale_lam(ev.model, x, ev.scales, cfg.model.with_gcr),
                          label.shape[-2:])
            ev.add(name, seed_prediction(maps, cls_label, cfg.bkg), label)
            if cfg.crf:
                probs, keys = seed_crf_stack(maps, cls_label)
                ev.add_crf(name, to_uint8_rgb(image[0]), probs, keys, label)
    return ev.finish()


def main(argv: Sequence[str]) -> dict | None:
    if parse_config(argv).cam2seg:
        return run_cam2seg(argv)
    return run_seeds("infer_lam", "lam", lam_maps, argv)


if __name__ == "__main__":
    run(main)
