"""CAM seeds on the training images (METHOD.md §8), with optional CRF.

    python -m tools.infer_cam ckpt=logs/voc/checkpoints/best.pth                  # train, scale 1.0
    torchrun --nproc_per_node=2 -m tools.infer_cam ckpt=... multi_scale=true crf=true

CAM of each scale and its flip (max), ReLU, summed, min-max normalised (the reference
`multi_scale_cam2`, `wetr.cam.multi_scale_cam`). Writes under out_dir (default
<run>/eval/infer_cam_<set>[_ms]): cam/<name>.png (palette labels), cam_crf/ with crf=true,
arrays/<name>.npz (keys "cam" (P, H, W) float16 maps of the P present classes, "classes" (P,)
their label ids) with save_arrays=true, jet overlays with save_overlays=true, scores.json and the
printed table. Options: see `tools.config.InferConfig`.
"""
from __future__ import annotations

from collections.abc import Sequence

from tools.config import SEED_SCALES, ToolSpec, parse_tool_config
from tools.evaluation import evaluate
from tools.session import run

TOOL = ToolSpec("infer_cam", "cam", SEED_SCALES, seed_split=True, needs_image_labels=True)


def main(argv: Sequence[str]) -> dict | None:
    """{variant: scores} on rank 0 (empty without ground truth), else None."""
    return evaluate(*parse_tool_config(argv, TOOL))


if __name__ == "__main__":
    run(main)
