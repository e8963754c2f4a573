#!/usr/bin/env bash
# Evaluate a VOC checkpoint as in the paper (METHOD.md §8), each step with torchrun over GPU_NUMBER
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

cam2seg=0; set=""; out=""; args=()
for arg in "$@"; do
  case "$arg" in
    cam2seg=true|cam2seg=True) cam2seg=1; continue ;;
    cam2seg=false|cam2seg=False) continue ;;
    cam2seg=*) echo "error: cam2seg must be true or false, got '${arg#cam2seg=}'" >&2; exit 2 ;;
    infer_set=*) set=${arg#infer_set=} ;;
    out_dir=*) out=${arg#out_dir=}; continue ;;
  esac
  args+=("$arg")
done
test=0   # a split without labels (tools.data.is_labelled) takes the two submission routes
if [ -n "$set" ]; then
  test=$(python -c 'import sys; from tools.data import is_labelled; print(int(not is_labelled(sys.argv[1])))' "$set")
fi

if [ "$cam2seg" = 0 ] && [ "$test" = 0 ]; then
  echo ">>> CAM seeds"
  launch_tool tools.infer_cam ckpt="$ckpt" "$@"
  echo ">>> LAM seeds"
  launch_tool tools.infer_lam ckpt="$ckpt" "$@"
  echo ">>> segmentation"
  launch_tool tools.infer_seg_voc ckpt="$ckpt" "$@"
  exit 0
fi

# One folder per route, so the two test submissions never overwrite each other: the tools'
# own (<run>/eval/<checkpoint stem>/<tool>_<set>), or <out_dir>/cam2seg and <out_dir>/infer_seg_voc.
# Each tool prints where it wrote its scores.json; the summary reads them from there.
lam_out=(); seg_out=(); scores=()
if [ -n "$out" ]; then lam_out=(out_dir="$out/cam2seg"); seg_out=(out_dir="$out/infer_seg_voc"); fi
log=$(mktemp); trap 'rm -f "$log"' EXIT
launch_noted() {   # launch_tool MODULE ARGS..., noting the scores.json it names
  launch_tool "$@" | tee "$log"
  scores+=("$(sed -n 's/.*scores written to //p' "$log" | tail -n 1)")
}
echo ">>> LAM as segmentation (cam2seg)"
launch_noted tools.infer_lam ckpt="$ckpt" "${args[@]}" cam2seg=true "${lam_out[@]}"
echo ">>> segmentation head"
launch_noted tools.infer_seg_voc ckpt="$ckpt" "${args[@]}" "${seg_out[@]}"
python - "${scores[@]}" <<'PY'
import json
import sys
from pathlib import Path

lam, seg = (json.load(open(p))["scores"] for p in sys.argv[1:])
if not lam and not seg:   # a split without ground truth: the test-server archives
    print("test-server submissions (upload one; the paper's 75.0 is the LAM route):")
    for name, path in zip(("LAM as segmentation:", "segmentation head:  "), sys.argv[1:]):
        print(f"  {name} {Path(path).parent / 'results.tar.gz'}")
    sys.exit(0)
print(f"{'':44s} mIoU")
for name, scores in (("cam2seg: LAM + predicted labels", lam), ("segmentation head", seg)):
    for variant, s in scores.items():
        print(f"{name + ' (' + variant + ')':44s} {100 * s['miou']:.1f}")
print("The paper's VOC val figure (76.4) is cam2seg's lam_crf row.")
PY
