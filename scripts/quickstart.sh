#!/usr/bin/env bash
# Set up and run the whole lifecycle on the bundled data (CPU, minutes): pre-train a small T5, SFT, LoRA,
# reward model, PPO, int8 quantization and Hugging Face export, with one report in runs/lifecycle/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-judge} bash scripts/setup.sh  # judge: the toxicity judge of the PPO row (scikit-learn)
exec .venv/bin/llmjax lifecycle "$@"
