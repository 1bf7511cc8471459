#!/usr/bin/env bash
# Set up (with the test, seqio and judge extras) and run the default test suite on CPU with 8 fake devices:
# every test but the long end-to-end runs marked `slow` (`-m ''` adds them back, as CI does: .ci/run).
# The seqio extra (TensorFlow included, ~1 min to install) makes the seqio Task/Mixture tests run, not skip;
# the judge extra (alt-profanity-check) the toxicity-judge tests.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,seqio,judge} bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
