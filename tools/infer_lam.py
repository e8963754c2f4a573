"""LAM seeds on the training images (SPEC 3, 8), with optional CRF.

    python -m tools.infer_lam ckpt=logs/voc/checkpoints/best.pth                  # train, scale 1.0
    torchrun --nproc_per_node=2 -m tools.infer_lam ckpt=... multi_scale=true crf=true

LAM = class tokens (after GCR; model.with_gcr=false: before) · patch map, at every scale and its
flip (max), summed without ReLU, min-max normalised (the reference `multi_scale_lam2`). Outputs as
`tools.infer_cam`, with "lam" for "cam".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tools.common import run, run_seeds


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


def main(argv: Sequence[str]) -> dict | None:
    return run_seeds("infer_lam", "lam", lam_maps, argv)


if __name__ == "__main__":
    run(main)
