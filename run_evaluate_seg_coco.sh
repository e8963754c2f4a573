#!/usr/bin/env bash
# COCO segmentation inference and mIoU (SPEC 8) with torchrun over GPU_NUMBER processes; the
# table is printed and written as scores.json under <run>/eval/infer_seg_coco_<set>.
#
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py GPU_DEVICE GPU_NUMBER INFER_SET CHECKPOINT [key=value ...]
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py 0,1,2,3 4 val logs/train_coco/checkpoints/best.pth
#   bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py cpu 2 val_part logs/smoke/checkpoints/last.pth crf=true
#
# INFER_SET: val (all val2014 images listed) or val_part (the first 5000); GPU_DEVICE is a
# CUDA_VISIBLE_DEVICES list, or `cpu` (gloo). key=value arguments: tools/common.py InferConfig.
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: bash run_evaluate_seg_coco.sh tools/infer_seg_coco.py GPU_DEVICE GPU_NUMBER INFER_SET CHECKPOINT [key=value ...]" >&2
  exit 2
fi
script=$1; gpus=$2; nproc=$3; infer_set=$4; ckpt=$5; shift 5
[ -f "$ckpt" ] || { echo "error: checkpoint not found: $ckpt" >&2; exit 2; }
ckpt=$(realpath "$ckpt")
cd "$(dirname "$0")"
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
[ -f "$script" ] || { echo "error: no such tool: $script" >&2; exit 2; }
module=${script%.py}; module=${module#./}; module=${module//\//.}
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: GPU_NUMBER must be a positive integer, got '$nproc'" >&2; exit 2
fi
if [ "$gpus" = "cpu" ]; then
  export CUDA_VISIBLE_DEVICES=""
  device=cpu
else
  export CUDA_VISIBLE_DEVICES="$gpus"
  visible=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$visible" = "0" ]; then
    echo "warning: no GPU visible for GPU_DEVICE=$gpus; running on CPU" >&2
    device=cpu
  elif [ "$nproc" -gt "$visible" ]; then
    echo "error: GPU_NUMBER=$nproc but only $visible GPU(s) visible in GPU_DEVICE=$gpus" >&2; exit 2
  else
    device=cuda
  fi
fi

# launch MODULE key=value ...: a one-process check of config, checkpoint and data first (one
# error line instead of one traceback per rank), then torchrun on a free port (--standalone).
launch() {
  local module=$1; shift
  MORE_PREFLIGHT=1 python -m "$module" device="$device" "$@"
  torchrun --standalone --nproc_per_node="$nproc" -m "$module" device="$device" "$@"
}

launch "$module" ckpt="$ckpt" infer_set="$infer_set" "$@"
