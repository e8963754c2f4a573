"""COCO segmentation inference: `tools.infer_seg_voc` with COCO defaults (METHOD.md §8).

    python -m tools.infer_seg_coco ckpt=logs/coco/checkpoints/best.pth infer_set=val
    torchrun --nproc_per_node=8 -m tools.infer_seg_coco ckpt=... infer_set=val_part crf=true

infer_set: val, the default (the full val2014 list, 40 137 images: the paper's protocol) or
val_part (its first 5000 images, as validated during training). Outputs under
<run>/eval/<checkpoint stem>/infer_seg_coco_<set>; resume=true after a kill; see
`tools.infer_seg_voc`.
"""
from __future__ import annotations

from collections.abc import Sequence

from tools.config import SEG_SCALES, ToolSpec, parse_tool_config
from tools.evaluation import evaluate
from tools.session import run

TOOL = ToolSpec("infer_seg_coco", "seg", SEG_SCALES, defaults={"multi_scale": True, "infer_set": "val"})


def main(argv: Sequence[str]) -> dict | None:
    """{variant: scores} on rank 0 (empty without ground truth), else None."""
    return evaluate(*parse_tool_config(argv, TOOL))


if __name__ == "__main__":
    run(main)
