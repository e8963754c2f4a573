#!/usr/bin/env bash
# Export pseudo masks of the training split for a second, fully supervised stage
# (tools/export_pseudo_masks.py), with torchrun over GPU_NUMBER processes: palette PNGs under
# SegmentationClassPseudo/ plus the split list, in <run>/eval/<checkpoint stem>/pseudo_<route>...
# (or out_dir); their mIoU where the split has masks.
#
#   bash run_export_pseudo_masks.sh GPU_DEVICE GPU_NUMBER CHECKPOINT [key=value ...]
#   bash run_export_pseudo_masks.sh 0 1 logs/train_voc/checkpoints/best.pth multi_scale=true crf=true
#   bash run_export_pseudo_masks.sh 0,1 2 logs/mytag/checkpoints/best.pth route=lam resume=true
#   bash run_export_pseudo_masks.sh cpu 2 logs/mytag/checkpoints/last.pth
#
# GPU_DEVICE is a CUDA_VISIBLE_DEVICES list, or `cpu` (gloo). key=value arguments: see
# `python tools/export_pseudo_masks.py --help`; docs/OWN_DATASET.md shows the whole route.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash run_export_pseudo_masks.sh GPU_DEVICE GPU_NUMBER CHECKPOINT [key=value ...]" >&2
  exit 2
fi
source "$(dirname "$0")/tools/launch.sh"
checkpoint_launch "$1" "$2" "$3"; shift 3
launch_tool tools.export_pseudo_masks ckpt="$ckpt" "$@"
