#!/usr/bin/env bash
# One host, one process: CPU, one GPU, or all GPUs of one machine (JAX sees them all).
#   launch/single_host.sh configs/pretrain_t5_tiny.yaml mesh.data=8
set -euo pipefail
config=${1:?usage: launch/single_host.sh CONFIG [KEY=VALUE ...]}; shift
exec llmjax train --config "$config" "$@"
