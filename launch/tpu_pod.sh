#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize() finds the
# topology from the TPU metadata. Run from a machine with gcloud:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/pretrain_t5_tiny.yaml mesh.fsdp=-1
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd ~/llmjax && LLMJAX_DISTRIBUTED=auto .venv/bin/llmjax train --config$args"
