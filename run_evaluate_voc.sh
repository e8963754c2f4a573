#!/usr/bin/env bash
# Evaluate a VOC checkpoint as in the paper (SPEC 8), each step with torchrun over GPU_NUMBER
# processes; one table each, and scores.json under <run>/eval/<checkpoint stem>/ (<run>: the
# folder above checkpoints/).
#
#   bash run_evaluate_voc.sh GPU_DEVICE GPU_NUMBER CHECKPOINT [key=value ...]
#   bash run_evaluate_voc.sh 0 1 logs/train_voc/checkpoints/best.pth
#   bash run_evaluate_voc.sh 0,1 2 logs/train_voc/checkpoints/best.pth crf=true multi_scale=true
#   bash run_evaluate_voc.sh 0 1 best.pth cam2seg=true         # the paper's val figure (76.4)
#   bash run_evaluate_voc.sh 0 1 best.pth infer_set=test       # both test-server submissions
#   bash run_evaluate_voc.sh cpu 2 logs/smoke/checkpoints/last.pth
#
# Routes. Default: CAM seeds and LAM seeds on the train set, then the segmentation head on val.
# cam2seg=true: LAM as segmentation on val (tools.infer_lam cam2seg=true: 7 scales + flip,
# predicted labels, CRF) and the segmentation head on val, then both mIoUs side by side.
# infer_set=test...: a test split has no ground truth; the LAM route (test label order) and the
# segmentation head each write results/VOC2012/Segmentation/comp6_test_cls/ in their own folder
# (cam2seg_<set>, infer_seg_voc_<set>; under out_dir when it is given) and, checked (one PNG per
# listed image, palette mode), its archive results.tar.gz for the evaluation server.
# resume=true: each tool skips the images a killed run completed.
# GPU_DEVICE is a CUDA_VISIBLE_DEVICES list, or `cpu` (gloo). key=value arguments go to every
# tool (see tools/config.py InferConfig).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash run_evaluate_voc.sh GPU_DEVICE GPU_NUMBER CHECKPOINT [key=value ...]" >&2
  exit 2
fi
source "$(dirname "$0")/tools/launch.sh"
checkpoint_launch "$1" "$2" "$3"; shift 3

cam2seg=0; test=0; set=""; out=""; args=()
for arg in "$@"; do
  case "$arg" in
    cam2seg=true|cam2seg=True) cam2seg=1; continue ;;
    cam2seg=false|cam2seg=False) continue ;;
    cam2seg=*) echo "error: cam2seg must be true or false, got '${arg#cam2seg=}'" >&2; exit 2 ;;
    infer_set=*) set=${arg#infer_set=}; [[ "$set" == test* ]] && test=1 ;;
    out_dir=*) out=${arg#out_dir=} ;;
  esac
  args+=("$arg")
done

if [ "$cam2seg" = 0 ] && [ "$test" = 0 ]; then
  echo ">>> CAM seeds"
  launch_tool tools.infer_cam ckpt="$ckpt" "$@"
  echo ">>> LAM seeds"
  launch_tool tools.infer_lam ckpt="$ckpt" "$@"
  echo ">>> segmentation"
  launch_tool tools.infer_seg_voc ckpt="$ckpt" "$@"
  exit 0
fi

# One folder per route, so the two test submissions never overwrite each other; the default
# folders are the tools' own (<run>/eval/<checkpoint stem>/<tool>_<set>).
if [ -n "$out" ]; then
  lam_dir=$out/cam2seg; seg_dir=$out/infer_seg_voc
else
  run=$(dirname "$ckpt"); [ "$(basename "$run")" = checkpoints ] && run=$(dirname "$run")
  stem=$(basename "$ckpt"); stem=${stem%.*}
  lam_dir=$run/eval/$stem/cam2seg_${set:-val}; seg_dir=$run/eval/$stem/infer_seg_voc_${set:-val}
fi
echo ">>> LAM as segmentation (cam2seg)"
launch_tool tools.infer_lam ckpt="$ckpt" "${args[@]}" cam2seg=true out_dir="$lam_dir"
echo ">>> segmentation head"
launch_tool tools.infer_seg_voc ckpt="$ckpt" "${args[@]}" out_dir="$seg_dir"
if [ "$test" = 1 ]; then
  echo "test-server submissions (upload one; the paper's 75.0 is the LAM route):"
  echo "  LAM as segmentation: $lam_dir/results.tar.gz"
  echo "  segmentation head:   $seg_dir/results.tar.gz"
else
  python - "$lam_dir/scores.json" "$seg_dir/scores.json" <<'PY'
import json
import sys

lam, seg = (json.load(open(p))["scores"] for p in sys.argv[1:])
print(f"{'':44s} mIoU")
for name, scores in (("cam2seg: LAM + predicted labels", lam), ("segmentation head", seg)):
    for variant, s in scores.items():
        print(f"{name + ' (' + variant + ')':44s} {100 * s['miou']:.1f}")
print("The paper's VOC val figure (76.4) is cam2seg's lam_crf row.")
PY
fi
