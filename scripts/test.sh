#!/usr/bin/env bash
# Set up .venv (Python 3.12) and run the CPU test suite: kernels in interpret mode, GPU-only and
# slow tests skipped. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/python -m pytest -m "not slow and not gpu" -n 2 --durations=15 "$@"
