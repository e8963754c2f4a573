"""Segmentation inference (SPEC 8): multi-scale + flip logits, optional CRF.

    python -m tools.infer_seg_voc ckpt=logs/voc/checkpoints/best.pth              # val, 3 scales
    torchrun --nproc_per_node=2 -m tools.infer_seg_voc ckpt=... crf=true
    python -m tools.infer_seg_voc ckpt=... infer_set=test crf=true data.root=<VOC2012 test folder>

For each scale s of (1.0, 1.25, 1.5) (multi_scale=false: 1.0) the image at its original size is
resized to int(448 s) squared, run with its flip, the logits upsampled to the label size and the
flipped ones flipped back and added; max over scales, argmax. CRF (crf=true) on the softmax.
Writes under out_dir (default <run>/eval/infer_seg_voc_<set>): seg/<name>.png, seg_crf/, for
infer_set=test results/VOC2012/Segmentation/comp6_test_cls/<name>.png (CRF output with crf=true),
arrays/<name>.npz (key "seg" (K+1, H, W) float16 logits) with save_arrays=true, colour blends with
save_overlays=true, scores.json and the printed table.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tools.common import SEG_SCALES, Evaluation, resize, run, to_uint8_rgb

DEFAULTS = {"multi_scale": True}


@torch.no_grad()
def multi_scale_seg(model: torch.nn.Module, image: torch.Tensor, size: int,
                    scales: Sequence[float], out_size: Sequence[int]) -> torch.Tensor:
    """image: (1, 3, H, W) normalised, original size -> logits (1, K+1, *out_size): per scale
    logits(x) + flip(logits(flip(x))) at out_size, then the max over scales."""
    segs = []
    for s in scales:
        x = resize(image, (int(size * s), int(size * s)))
        # GCR does not feed the decoder; skipping it saves its top-k on large inputs
        logits = resize(model(torch.cat([x, x.flip(-1)], dim=0), with_gcr=False).seg_logits, out_size)
        segs.append(logits[:1] + logits[1:].flip(-1))
    return torch.stack(segs, dim=0).amax(dim=0)


def main(argv: Sequence[str], tool: str = "infer_seg_voc", defaults: dict = DEFAULTS) -> dict | None:
    ev = Evaluation(tool, "seg", argv, defaults, default_scales=(1.0,), multi_scales=SEG_SCALES)
    cfg = ev.cfg
    with torch.no_grad():
        for name, image, label, _ in ev.items():
            seg = multi_scale_seg(ev.model, image, cfg.size, ev.scales, label.shape[-2:])
            pred = ev.add(name, seg.argmax(1), label)
            rgb = to_uint8_rgb(image[0]) if cfg.crf or cfg.save_overlays else None
            if cfg.crf:
                ev.add_crf(name, rgb, seg[0].softmax(0), np.arange(seg.shape[1]), label)
            if cfg.save_arrays:
                ev.save_npz(name, seg=seg[0].half().cpu().numpy())
            if cfg.save_overlays:
                ev.save_blend(name, rgb, pred)
    return ev.finish()


if __name__ == "__main__":
    run(main)
