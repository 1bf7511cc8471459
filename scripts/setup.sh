#!/usr/bin/env bash
# Create .venv (if missing) and install llmjax into it. `EXTRAS=test` adds the test tools.
# torch is pinned to the 2.13.0 CPU wheel (see pyproject.toml); plain `torch` would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${EXTRAS:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install -q -e .
fi
