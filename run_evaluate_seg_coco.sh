#!/usr/bin/env bash
# COCO segmentation inference and mIoU (METHOD.md §8) with torchrun over GPU_NUMBER processes; the
# table is printed and written as scores.json under <run>/eval/<checkpoint stem>/infer_seg_coco_<set>.
#
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py GPU_DEVICE GPU_NUMBER [INFER_SET] CHECKPOINT [key=value ...]
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0,1,2,3 4 logs/train_coco/checkpoints/best.pth
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py cpu 2 val_part logs/smoke/checkpoints/last.pth crf=true
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0 1 best.pth crf=true resume=true   # after a kill
#
# INFER_SET: val, the default (the full val2014 list: 40 137 images, the paper's COCO figure), or
# val_part (its first 5000, as validated during training: not the paper's protocol). The progress
# bar (rank 0) shows the ETA; resume=true skips the images a killed run completed. GPU_DEVICE is
# a CUDA_VISIBLE_DEVICES list, or `cpu` (gloo). key=value arguments: tools/config.py InferConfig.
set -euo pipefail
usage="usage: bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py GPU_DEVICE GPU_NUMBER [INFER_SET] CHECKPOINT [key=value ...]"
if [ $# -lt 4 ]; then
  echo "$usage" >&2
  exit 2
fi
script=$1; gpus=$2; nproc=$3; shift 3
if [ -f "$1" ] || [[ "$1" == *.pth ]]; then   # no INFER_SET: the full val list
  infer_set=val; ckpt=$1; shift
else
  [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
  infer_set=$1; ckpt=$2; shift 2
fi
[ -f "$ckpt" ] || { echo "error: checkpoint not found: $ckpt" >&2; exit 2; }
ckpt=$(realpath "$ckpt")
cd "$(dirname "$0")"
source tools/launch.sh
module=$(script_module "$script")
select_device "$gpus" "$nproc"

launch_tool "$module" ckpt="$ckpt" infer_set="$infer_set" "$@"
