#!/usr/bin/env bash
# Set up .venv (Python 3.12) and run the main demo: train a small CARVE LM on the bundled corpus,
# checkpoint, evaluate and sample (CPU by default). Extra arguments go to `python -m carve_jax.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m carve_jax.demo "$@"
