#!/usr/bin/env bash
# Train MoRe with torchrun (DDP: NCCL on GPUs, gloo on CPU).
#
#   bash run_train.sh SCRIPT GPU_DEVICE GPU_NUMBER MASTER_PORT TAG [key=value ...]
#   bash run_train.sh scripts/train_voc.py 0 1 29500 train_voc
#   bash run_train.sh scripts/train_coco.py 0,1 2 29501 train_coco data.root=/datasets/COCO
#   bash run_train.sh scripts/train_voc.py cpu 2 29500 smoke data.root=data/synthetic ...
#
# GPU_DEVICE is a CUDA_VISIBLE_DEVICES list, or `cpu` (GPU_NUMBER processes on the CPU, gloo).
# Extra torchrun flags (multi-node, elastic restarts) go in TORCHRUN_ARGS, e.g.
#   TORCHRUN_ARGS="--nnodes=2 --node_rank=0 --master_addr=node0" bash run_train.sh ...
#   TORCHRUN_ARGS="--max-restarts=3" bash run_train.sh ... resume=auto   # restart from last.pth
# torchrun is started as `python -m utils.dist` (same arguments, one-line failure report).
# Bad launcher arguments are caught here; bad inputs (config, log folder, dataset layout, resume
# checkpoint) by rank 0 before training starts, one line for all ranks; see
# docs/TROUBLESHOOTING.md.
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: bash run_train.sh SCRIPT GPU_DEVICE GPU_NUMBER MASTER_PORT TAG [key=value ...]" >&2
  exit 2
fi
script=$1; gpus=$2; nproc=$3; port=$4; tag=$5; shift 5
cd "$(dirname "$0")"
source tools/launch.sh
module=$(script_module "$script")
if ! [[ "$port" =~ ^[0-9]+$ ]]; then echo "error: MASTER_PORT must be a number, got '$port'" >&2; exit 2; fi
select_device "$gpus" "$nproc"

# A single-node run needs a free master port; multi-node runs are checked by torchrun itself.
if [[ "${TORCHRUN_ARGS:-}" != *--nnodes* ]]; then
  if ! python - "$port" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torchrun's store: TIME_WAIT is free
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
  then echo "error: MASTER_PORT $port is in use; pick another port" >&2; exit 2; fi
fi

# What torchrun would set for several processes per node, without its 4-line banner.
if [ "$nproc" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

exec python -m utils.dist --nproc_per_node="$nproc" --master_port="$port" ${TORCHRUN_ARGS:-} \
  -m "$module" tag="$tag" device="$device" "$@"
