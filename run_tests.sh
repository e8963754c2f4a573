#!/usr/bin/env bash
# Set up .venv/ (reused when present) and run the test suite on CPU.
#   bash run_tests.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")"
source tools/venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q "$@"
