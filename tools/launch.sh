# Shared by the run_*.sh scripts (sourced, not run), from any folder.

_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$_repo/.venv/bin/python" ] && export PATH="$_repo/.venv/bin:$PATH"

# script_module PATH: tools/infer_seg_coco.py -> tools.infer_seg_coco (error if missing).
script_module() {
  [ -f "$1" ] || { echo "error: no such script: $1" >&2; exit 2; }
  local m=${1%.py}; m=${m#./}; echo "${m//\//.}"
}

# select_device GPU_DEVICE GPU_NUMBER: sets CUDA_VISIBLE_DEVICES and `device` (cpu|cuda).
# `cpu`: CPU processes (gloo). GPU ids: that many GPUs must be listed and visible; a single
# process with no GPU visible falls back to the CPU with a warning.
select_device() {
  local gpus=$1 nproc=$2
  if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: GPU_NUMBER must be a positive integer, got '$nproc'" >&2; exit 2
  fi
  if [ "$gpus" = "cpu" ]; then
    export CUDA_VISIBLE_DEVICES=""
    device=cpu
    return
  fi
  if ! [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "error: GPU_DEVICE must be GPU ids like 0 or 0,1 (or cpu), got '$gpus'" >&2; exit 2
  fi
  local listed=$(( $(tr -cd , <<<"$gpus" | wc -c) + 1 ))
  if [ "$nproc" -gt "$listed" ]; then
    echo "error: GPU_NUMBER=$nproc but GPU_DEVICE=$gpus lists $listed GPU(s); list $nproc ids or lower GPU_NUMBER" >&2; exit 2
  fi
  export CUDA_VISIBLE_DEVICES="$gpus"
  local visible
  visible=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$visible" = "0" ] && [ "$nproc" -eq 1 ]; then
    echo "warning: no GPU visible for GPU_DEVICE=$gpus; running on the CPU (GPU_DEVICE=cpu says so explicitly)" >&2
    device=cpu
  elif [ "$nproc" -gt "$visible" ]; then
    echo "error: GPU_NUMBER=$nproc but only $visible GPU(s) visible for GPU_DEVICE=$gpus; lower GPU_NUMBER, or use GPU_DEVICE=cpu for $nproc CPU processes" >&2; exit 2
  else
    device=cuda
  fi
}

# checkpoint_launch GPU_DEVICE GPU_NUMBER CHECKPOINT: the evaluation scripts' first three
# arguments. Sets gpus, nproc, ckpt (absolute: the file must exist) and device (select_device),
# then moves to the repository root, where the tools run.
checkpoint_launch() {
  gpus=$1; nproc=$2; ckpt=$3
  [ -f "$ckpt" ] || { echo "error: checkpoint not found: $ckpt" >&2; exit 2; }
  ckpt=$(realpath "$ckpt")
  cd "$_repo"
  select_device "$gpus" "$nproc"
}

# launch_tool MODULE key=value ...: torchrun on a free port (--standalone) through `python -m
# utils.dist`, which leaves out torchrun's report after a one-line error. The tools check config,
# checkpoint and data once, inside the run: every rank stops on the first error and rank 0
# prints it (tools/session.py open_context).
launch_tool() {
  local module=$1; shift
  python -m utils.dist --standalone --nproc_per_node="$nproc" -m "$module" device="$device" "$@"
}
