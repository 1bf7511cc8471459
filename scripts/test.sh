#!/usr/bin/env bash
# Set up (with the test and seqio extras) and run the whole test suite on CPU with 8 fake devices.
# The seqio extra (TensorFlow included, ~1 min to install) makes the seqio Task/Mixture tests run, not skip.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,seqio} bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
