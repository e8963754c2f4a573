#!/usr/bin/env bash
# Set up .venv/ (reused when present) and run the test suite on CPU.
#   bash run_tests.sh [pytest args ...]        e.g. -m "not slow", tests/test_losses.py, -n 0
# With pytest-xdist installed the tests run in TEST_WORKERS processes (default: 2, or the core
# count when smaller), each with one OpenMP thread: most of the suite's time is Python and process
# start-up that one thread per test cannot overlap, while oversubscribed OpenMP threads slow the
# tiny models down many times over. `-n 0` runs them in this one process.
set -euo pipefail
cd "$(dirname "$0")"
source tools/venv.sh
if python -c "import xdist" 2>/dev/null; then
  cores=$(nproc)
  workers=${TEST_WORKERS:-$(( cores < 2 ? 1 : 2 ))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # loadfile: a module's tests share one worker, so its module fixtures (a tiny training run,
  # a tiny checkpoint) are built once
  python -m pytest -q -n "$workers" --dist loadfile "$@"
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  python -m pytest -q "$@"
fi
