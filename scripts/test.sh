#!/usr/bin/env bash
# Set up (with the test, seqio and judge extras) and run the default test suite on CPU with 8 fake devices:
# every test but the long end-to-end runs marked `slow` (`-m ''` adds them back, as CI does: .ci/run).
# The seqio extra (TensorFlow included, ~1 min to install) makes the seqio Task/Mixture tests run, not skip;
# the judge extra (alt-profanity-check) the toxicity-judge tests.
# Tests run in one pytest-xdist worker per core, at most 4 (TEST_WORKERS=N to choose, 0 for one process):
# a test spends much of its time in XLA's single-threaded compiler, so a second worker on a 2-core machine
# overlaps one test's compile with another's run (README, "Tests and benchmarks").
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,seqio,judge} bash scripts/setup.sh
cores=$(nproc 2>/dev/null || echo 1)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -q -m "not slow" -n "$workers" --dist worksteal "$@"
