#!/usr/bin/env bash
# Evaluate a VOC checkpoint as in the paper (SPEC 8): CAM seeds and LAM seeds on the train set,
# then segmentation on val, each with torchrun over GPU_NUMBER processes; one table each, and
# scores.json under <run>/eval/<checkpoint stem>/ (<run>: the folder above checkpoints/).
#
#   bash run_evaluate_voc.sh GPU_DEVICE GPU_NUMBER CHECKPOINT [key=value ...]
#   bash run_evaluate_voc.sh 0 1 logs/train_voc/checkpoints/best.pth
#   bash run_evaluate_voc.sh 0,1 2 logs/train_voc/checkpoints/best.pth crf=true multi_scale=true
#   bash run_evaluate_voc.sh 0 1 model_iter_20000.pth infer_set=test crf=true data.root=<VOC test>
#   bash run_evaluate_voc.sh cpu 2 logs/smoke/checkpoints/last.pth
#
# GPU_DEVICE is a CUDA_VISIBLE_DEVICES list, or `cpu` (gloo). key=value arguments go to every
# tool (see tools/config.py InferConfig). A test split (infer_set=test...) has no image labels,
# so only the segmentation step runs, writing results/VOC2012/Segmentation/comp6_test_cls/.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash run_evaluate_voc.sh GPU_DEVICE GPU_NUMBER CHECKPOINT [key=value ...]" >&2
  exit 2
fi
gpus=$1; nproc=$2; ckpt=$3; shift 3
[ -f "$ckpt" ] || { echo "error: checkpoint not found: $ckpt" >&2; exit 2; }
ckpt=$(realpath "$ckpt")
cd "$(dirname "$0")"
source tools/launch.sh
select_device "$gpus" "$nproc"

seeds=1
for arg in "$@"; do
  [[ "$arg" == infer_set=test* ]] && seeds=0
done
if [ "$seeds" = 1 ]; then
  echo ">>> CAM seeds"
  launch_tool tools.infer_cam ckpt="$ckpt" "$@"
  echo ">>> LAM seeds"
  launch_tool tools.infer_lam ckpt="$ckpt" "$@"
else
  echo ">>> seeds skipped: a test split has no image labels"
fi
echo ">>> segmentation"
launch_tool tools.infer_seg_voc ckpt="$ckpt" "$@"
