#!/usr/bin/env bash
# srun stand-in for tests/test_multinode.py: "nodes" that are processes of this machine.
#
#   SLURM_JOB_NUM_NODES=2 FAKE_SRUN_LOG=DIR/node fake_srun.sh [srun options ...] COMMAND ...
#
# Starts one copy of COMMAND per node, in parallel, as `srun --ntasks-per-node=1` does on a real
# allocation, with the per-task Slurm variables set; each copy's output goes to FAKE_SRUN_LOG<N>.log.
# Exits with the first non-zero status, after every copy has finished.
set -euo pipefail
while [[ "${1:-}" == --* ]]; do shift; done     # srun's own options (all in --opt=value form)
nodes="${SLURM_JOB_NUM_NODES:-1}"
pids=()
for ((node = 0; node < nodes; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "${FAKE_SRUN_LOG:-/tmp/fake_srun_node}$node.log" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  [[ "$status" -ne 0 ]] || status=$rc
done
exit "$status"
