#!/usr/bin/env bash
# COCO segmentation inference and mIoU (SPEC 8) with torchrun over GPU_NUMBER processes; the
# table is printed and written as scores.json under <run>/eval/infer_seg_coco_<set>.
#
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py GPU_DEVICE GPU_NUMBER INFER_SET CHECKPOINT [key=value ...]
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0,1,2,3 4 val logs/train_coco/checkpoints/best.pth
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py cpu 2 val_part logs/smoke/checkpoints/last.pth crf=true
#
# INFER_SET: val (all val2014 images listed) or val_part (the first 5000); GPU_DEVICE is a
# CUDA_VISIBLE_DEVICES list, or `cpu` (gloo). key=value arguments: tools/config.py InferConfig.
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py GPU_DEVICE GPU_NUMBER INFER_SET CHECKPOINT [key=value ...]" >&2
  exit 2
fi
script=$1; gpus=$2; nproc=$3; infer_set=$4; ckpt=$5; shift 5
[ -f "$ckpt" ] || { echo "error: checkpoint not found: $ckpt" >&2; exit 2; }
ckpt=$(realpath "$ckpt")
cd "$(dirname "$0")"
source tools/launch.sh
module=$(script_module "$script")
select_device "$gpus" "$nproc"

launch_tool "$module" ckpt="$ckpt" infer_set="$infer_set" "$@"
