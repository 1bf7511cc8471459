#!/usr/bin/env bash
# Set up (with the test, seqio and judge extras) and run the whole test suite on CPU with 8 fake devices.
# The seqio extra (TensorFlow included, ~1 min to install) makes the seqio Task/Mixture tests run, not skip;
# the judge extra (alt-profanity-check) the toxicity-judge tests.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,seqio,judge} bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
