"""CAM seeds on the training images (SPEC 8), with optional CRF.

    python -m tools.infer_cam ckpt=logs/voc/checkpoints/best.pth                  # train, scale 1.0
    torchrun --nproc_per_node=2 -m tools.infer_cam ckpt=... multi_scale=true crf=true

Writes under out_dir (default <run>/eval/infer_cam_<set>[_ms]): cam/<name>.png (palette
labels), cam_crf/ with crf=true, arrays/<name>.npz (keys "cam" (P, H, W) float16 maps of the
P present classes, "classes" (P,) their label ids) with save_arrays=true, jet overlays with
save_overlays=true, scores.json and the printed table. Options: see `tools.common.InferConfig`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tools.common import run, run_seeds


def cam_maps(model: torch.nn.Module, x: torch.Tensor, scales: Sequence[float], cfg=None) -> torch.Tensor:
    """x: (B, 3, S, S) normalised -> (B, K, S, S): CAM of each scale and its flip (max), ReLU,
    summed, min-max normalised (the reference `multi_scale_cam2`)."""
    from wetr.cam import multi_scale_cam

    return multi_scale_cam(model, x, scales)[0]


def main(argv: Sequence[str]) -> dict | None:
    return run_seeds("infer_cam", "cam", cam_maps, argv)


if __name__ == "__main__":
    run(main)
