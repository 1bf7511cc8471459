#!/usr/bin/env bash
# Set up (with the test extra) and run the whole test suite on CPU with 8 fake devices.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
