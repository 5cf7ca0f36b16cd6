#!/usr/bin/env bash
# Create .venv with Python 3.12 and install carve_jax with its dev extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/3.12"*/bin/python3.12; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}
if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || { echo "carve_jax needs Python 3.12 (jax 0.11.2 wheels): install it (e.g. 'pyenv install 3.12') and put python3.12 on PATH." >&2; exit 1; }
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.carve_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing carve_jax[dev] into .venv (first time: ~1 minute)"
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
