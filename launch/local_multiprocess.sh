#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own fake CPU devices: the local
# stand-in for a multi-host pod. Every process runs the same command; jax.distributed
# connects them through a coordinator on localhost.
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh CONFIG [KEY=VALUE ...]
set -euo pipefail
config=${1:?usage: launch/local_multiprocess.sh CONFIG [KEY=VALUE ...]}; shift
n=${NUM_PROCESSES:-2}
per=${DEVICES_PER_PROCESS:-4}
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per" \
  JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    llmjax train --config "$config" "$@" > "multiprocess_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || { echo "a process failed; see multiprocess_*.log" >&2; tail -n 20 multiprocess_*.log >&2; }
exit "$status"
