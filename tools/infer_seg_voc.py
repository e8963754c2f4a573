"""Segmentation inference (METHOD.md §8): multi-scale + flip logits, optional CRF.

    python -m tools.infer_seg_voc ckpt=logs/voc/checkpoints/best.pth              # val, 3 scales
    torchrun --nproc_per_node=2 -m tools.infer_seg_voc ckpt=... crf=true
    python -m tools.infer_seg_voc ckpt=... infer_set=test crf=true data.root=<VOC2012 test folder>

For each scale s of (1.0, 1.25, 1.5) (multi_scale=false: 1.0) the image at its original size is
resized to int(size s) squared, run with its flip, the logits upsampled to the label size and the
flipped ones flipped back and added; max over scales, argmax (`wetr.infer.multi_scale_seg`). CRF
(crf=true) on the softmax. Writes under out_dir (default <run>/eval/infer_seg_voc_<set>):
seg/<name>.png, seg_crf/, for infer_set=test results/VOC2012/Segmentation/comp6_test_cls/<name>.png
(CRF output with crf=true), arrays/<name>.npz (key "seg" (K+1, H, W) float16 logits) with
save_arrays=true, colour blends with save_overlays=true, scores.json and the printed table. On
a VOC test split the server folder is also packed, checked, as results.tar.gz (one line says what
to upload). resume=true (every tool) skips the images whose label PNGs a killed run wrote; out_dir's
settings.json must then name the same settings (route, scales, size, CRF, checkpoint, split...).
"""
from __future__ import annotations

from collections.abc import Sequence

from tools.config import SEG_SCALES, ToolSpec, parse_tool_config
from tools.evaluation import evaluate
from tools.session import run

TOOL = ToolSpec("infer_seg_voc", "seg", SEG_SCALES, defaults={"multi_scale": True})


def main(argv: Sequence[str]) -> dict | None:
    """{variant: scores} on rank 0 (empty without ground truth), else None."""
    return evaluate(*parse_tool_config(argv, TOOL))


if __name__ == "__main__":
    run(main)
