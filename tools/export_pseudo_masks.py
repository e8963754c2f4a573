"""Pseudo masks for a second, fully supervised stage: CAM or LAM seeds (METHOD.md §8) of the training
images as palette PNGs that mmsegmentation and DeepLab-style code read directly.

    python tools/export_pseudo_masks.py ckpt=logs/mytag/checkpoints/best.pth multi_scale=true crf=true
    torchrun --nproc_per_node=2 tools/export_pseudo_masks.py ckpt=... route=lam resume=true
    bash run_export_pseudo_masks.sh 0,1 2 logs/train_voc/checkpoints/best.pth multi_scale=true crf=true

The same per-image loop as tools/infer_cam.py / infer_lam.py (`tools.evaluation.run_images`:
seed route -> CRF step -> metrics + writer) over the checkpoint's training split (`infer_set`
for another list): the image resized to size x size, the seeds of scale 1.0 (multi_scale=true:
the 7 seed scales), each with its flip, labelled with background threshold `bkg` (0.5, the
paper's) and the ground-truth image labels (tags), optionally DenseCRF (crf=true). The PNGs
equal infer_cam's / infer_lam's label PNGs of the same settings.

Writes under out_dir (default <run>/eval/<checkpoint stem>/pseudo_<route>[_crf]_<split>[_ms]):
SegmentationClassPseudo/<name>.png (values 0..K, the VOC palette; nested image names keep their
sub-folders), <split>.txt (the names exported, one a line: mmsegmentation's ann_file), with
crf=true <route>/<name>.png (the seeds before CRF), pseudo_<route>[_crf].log and scores.json.
Where the split has masks (VOC, COCO) the mIoU of the pseudo masks is printed; a tag dataset's
training split has none, which the log says once. Sharded over the processes of torchrun;
resume=true skips the images whose PNGs exist (out_dir's settings.json must name the same
settings). Reading the result in mmsegmentation / DeepLab: docs/OWN_DATASET.md, "Export pseudo
masks".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from omegaconf import DictConfig

from tools.config import SEED_SCALES, InferConfig, ToolSpec, parse_tool_config
from tools.evaluation import evaluate
from tools.outputs import PseudoMaskWriter
from tools.session import Context, run
from utils.config import ConfigError, option


@dataclass
class ExportConfig(InferConfig):
    route: str = option("cam", "seeds exported: cam | lam (class tokens after GCR)",
                        choices=("cam", "lam"))


TOOL = ToolSpec("export_pseudo_masks", "cam", SEED_SCALES, train_split=True,
                needs_image_labels=True, schema=ExportConfig)


def pseudo_writer(ctx: Context, variants: tuple[str, ...]) -> PseudoMaskWriter:
    ds = ctx.source.dataset
    return PseudoMaskWriter(ctx.source.out_dir, variants, lambda name: ds.image_path(ds.root, name))


def tool_spec(spec: ToolSpec, cfg: DictConfig) -> ToolSpec:
    """The run's spec: the route's seeds, named by route and CRF (log, default out_dir), so
    exports of other settings never share a folder (resume would take their PNGs)."""
    return replace(spec, name=f"pseudo_{cfg.route}{'_crf' if cfg.crf else ''}",
                   variant=cfg.route)


def main(argv: Sequence[str]) -> dict | None:
    """Returns {variant: scores} on rank 0 (empty where the split has no masks), else None."""
    spec, cfg = parse_tool_config(argv, TOOL)
    if not cfg.save_labels:
        raise ConfigError("save_labels=false: the export writes label PNGs; leave it true")
    return evaluate(tool_spec(spec, cfg), cfg, pseudo_writer)


if __name__ == "__main__":
    run(main)
