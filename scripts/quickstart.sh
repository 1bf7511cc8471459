#!/usr/bin/env bash
# Set up and run the bundled default job: pre-train a tiny T5 with span corruption on the
# bundled corpus (CPU, a few minutes), then export it to a Hugging Face directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/llmjax train "$@"
