"""LAM seeds on the training images (SPEC 3, 8), with optional CRF.

    python -m tools.infer_lam ckpt=logs/voc/checkpoints/best.pth                  # train, scale 1.0
    torchrun --nproc_per_node=2 -m tools.infer_lam ckpt=... multi_scale=true crf=true

LAM = class tokens (after GCR; model.with_gcr=false: before) · patch map, at every scale and its
flip (max), summed without ReLU, min-max normalised (the reference `multi_scale_lam2`,
`wetr.infer.multi_scale_lam`). Outputs as `tools.infer_cam`, with "lam" for "cam".
"""
from __future__ import annotations

from collections.abc import Sequence

from tools.config import SEED_SCALES, ToolSpec
from tools.pipelines import seed_image
from tools.session import evaluate, run

SPEC = ToolSpec("infer_lam", "lam", SEED_SCALES, seed_split=True, needs_image_labels=True)


def main(argv: Sequence[str]) -> dict | None:
    return evaluate(SPEC, argv, seed_image)


if __name__ == "__main__":
    run(main)
