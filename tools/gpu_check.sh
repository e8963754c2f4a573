#!/usr/bin/env bash
# The GPU check of issue 23, at most 8 minutes on one H100 / H200 (the sum of the timeouts below):
#   1. the CUDA tests (tests/test_cuda.py: CUDA against CPU, no host syncs, bf16, regional compile);
#   2. tools.benchmark at the paper's setting (ViT-B/16, crop 448, batch 4, K=20) in fp32, bf16 and
#      bf16 + compile: records logs/benchmarks/cuda_base_c448_b4_k20_{fp32,bf16,bf16_compile}.{json,md};
#   3. a 200-step run_train.sh smoke run on a synthetic VOC-layout dataset, one process per listed
#      GPU (DDP over NCCL from two GPUs on; one GPU: a single process, no process group);
#   4. run_evaluate_voc.sh on its last checkpoint (same processes).
# Each piece has its own timeout and the script goes on past a failure; every log and a summary
# (one line per piece: status, exit code, seconds) go to logs/benchmarks/gpu_check/.
#
#   bash tools/gpu_check.sh [GPU_DEVICE]      # GPU ids as for run_train.sh (0, or 0,1), default 0;
#                                             # tests and benchmarks use the first
#   bash tools/gpu_check.sh --dry-run         # print the pieces and their commands, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
gpus=${1:-0}
nproc=$(( $(tr -cd , <<<"$gpus" | wc -c) + 1 ))
out=logs/benchmarks/gpu_check
data=data/gpu_check_synthetic
summary=$out/summary.md
port=29517
paper="device=cuda data.crop_size=448 batch_size=4 data.num_classes=21 bench.infer=false"
smoke_args=(data.root="$data" data.num_classes=5 model.pretrained=false data.crop_size=256
            max_iters=200 eval_every=200 save_every=200 val.max_images=16 amp=bf16 log_every=20
            data.num_workers=4 work_dir="$out/runs" overwrite=true)

if [ "$dry" = 0 ]; then
  [ -x .venv/bin/python ] || { echo "error: .venv/ missing: source tools/venv.sh first" >&2; exit 2; }
  export PATH="$PWD/.venv/bin:$PATH"
  mkdir -p "$out"
  {
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
    echo
    echo "| piece | status | exit | seconds |"
    echo "|---|---|---:|---:|"
  } > "$summary"
fi
export CUDA_VISIBLE_DEVICES=${gpus%%,*}  # run_train.sh / run_evaluate_voc.sh set their own

# piece NAME TIMEOUT_S COMMAND...: runs COMMAND under `timeout`, its output to $out/NAME.log.
piece() {
  local name=$1 limit=$2
  shift 2
  if [ "$dry" = 1 ]; then
    printf '%-16s %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  echo ">>> $name (at most ${limit}s): $*"
  local start rc status
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "| $name | $status | $rc | $(( $(date +%s) - start )) |" >> "$summary"
  echo "    $status (exit $rc); log $out/$name.log"
  tail -n 3 "$out/$name.log" | sed 's/^/    /'
}

piece cuda_tests 75 python -m pytest -q -x tests/test_cuda.py
# shellcheck disable=SC2086  # $paper is a list of key=value words
piece bench_fp32 50 python -m tools.benchmark $paper amp=none
# shellcheck disable=SC2086
piece bench_bf16 40 python -m tools.benchmark $paper amp=bf16
# shellcheck disable=SC2086
piece bench_bf16_compile 120 python -m tools.benchmark $paper amp=bf16 compile=true bench.warmup=3
piece synthetic_data 25 python -m datasets.synthetic --out "$data" --num-classes 4 --train 400 \
    --val 16 --size 256
piece train_smoke 100 bash run_train.sh scripts/train_voc.py "$gpus" "$nproc" "$port" gpu_smoke \
    "${smoke_args[@]}"
piece evaluate 70 bash run_evaluate_voc.sh "$gpus" "$nproc" "$out/runs/gpu_smoke/checkpoints/last.pth" \
    size=256 infer_set=val max_images=16

if [ "$dry" = 0 ]; then
  cat "$summary"
  echo "benchmark records: logs/benchmarks/cuda_base_c448_b4_k20_*.md"
fi
