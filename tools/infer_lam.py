"""LAM seeds on the training images (METHOD.md §3, 8), with optional CRF; LAM as segmentation.

    python -m tools.infer_lam ckpt=logs/voc/checkpoints/best.pth                  # train, scale 1.0
    torchrun --nproc_per_node=2 -m tools.infer_lam ckpt=... multi_scale=true crf=true
    python -m tools.infer_lam ckpt=... cam2seg=true                    # val: the paper's 76.4 route
    python -m tools.infer_lam ckpt=... cam2seg=true infer_set=test     # test: the 75.0 route

LAM = class tokens (after GCR; model.with_gcr=false: before) · patch map, at every scale and its
flip (max), summed without ReLU, min-max normalised (the reference `multi_scale_lam2`,
`wetr.infer.multi_scale_lam`). Outputs as `tools.infer_cam`, with "lam" for "cam".

cam2seg=true (the reference's switch): LAM seeds as the segmentation, by default on the val split,
at the 7 seed scales with flip, background 0.5, DenseCRF, and image labels predicted by the
network (`CAM2SEG.defaults`; explicit keys win). The label order follows the split: a labelled
split takes `wetr.infer.classifier_first_labels` (the reference infer_lam.py), a test split
`seg_first_labels` (infer_lam_test_75.py). Output folder <run>/eval/<ckpt stem>/cam2seg_<set>; a
test split gets the server layout results/VOC2012/Segmentation/comp6_test_cls/ (CRF output), so
it never overwrites the segmentation head's submission (infer_seg_voc_<set>).
"""
from __future__ import annotations

from collections.abc import Sequence

from tools.config import SEED_SCALES, ToolSpec, parse_tool_config
from tools.evaluation import evaluate
from tools.session import run

CAM2SEG = ToolSpec("cam2seg", "lam", SEED_SCALES, route="cam2seg",
                   defaults={"multi_scale": True, "crf": True, "cls_labels": "pred"})
TOOL = ToolSpec("infer_lam", "lam", SEED_SCALES, seed_split=True, needs_image_labels=True,
                modes={"cam2seg": CAM2SEG})


def main(argv: Sequence[str]) -> dict | None:
    """{variant: scores} on rank 0 (empty without ground truth), else None."""
    return evaluate(*parse_tool_config(argv, TOOL))


if __name__ == "__main__":
    run(main)
