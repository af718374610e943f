#!/usr/bin/env bash
# One srun task = one DeepSpeed rank. deepspeed.init_distributed() reads RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT and never looks at SLURM_*, so this wrapper translates, then runs
# its arguments:
#
#   srun launchers/slurm/task.sh python pretrain/run.py --config ...    (job.sh does this)
#
#   RANK             <- SLURM_PROCID
#   WORLD_SIZE       <- SLURM_NTASKS
#   LOCAL_RANK       <- SLURM_LOCALID                  (the GPU this rank uses on its node)
#   LOCAL_WORLD_SIZE <- this node's entry of SLURM_STEP_TASKS_PER_NODE, e.g. "8(x3),4"
#   LOCAL_SIZE       <- the same, DeepSpeed's name: on CPUs its shared-memory all-reduce runs only when
#                       LOCAL_SIZE equals WORLD_SIZE (every rank on one node), as under its own launcher
#   MASTER_ADDR      <- first node of SLURM_STEP_NODELIST (where rank 0 runs): its name, or where that
#                       name is no host name (NodeName=n1 NodeAddr=10.0.0.1, local-cluster.sh's nodes)
#                       its NodeAddr from `scontrol show node`
#   MASTER_PORT      <- 15000 + SLURM_JOB_ID % 15000, or LONGVL_MASTER_PORT (below the ephemeral range)
#
# Exit status: the command's, except 3 ("stopped early, checkpoint saved, rerun with --resume") when
# job.sh set LONGVL_STOPPED_DIR: then the rank leaves a marker there (the folder exists on the batch
# node only) and exits 0. srun --kill-on-bad-exit treats any non-zero exit as a crash and kills the
# ranks that are still shutting down, so a clean stop must look like success to srun.
set -uo pipefail
: "${SLURM_PROCID:?task.sh runs inside an srun step}"

# tasks_on_node SPEC INDEX: SLURM's compressed per-node task counts ("2(x3),1") -> count of node INDEX
tasks_on_node() {
  local part count start=0
  local -a parts
  IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    count=1
    [[ $part == *"(x"* ]] && { count=${part#*(x}; count=${count%)}; }
    if (( $2 < start + count )); then echo "${part%%(*}"; return; fi
    start=$((start + count))
  done
  echo "task.sh: node $2 not in SLURM_STEP_TASKS_PER_NODE=$1" >&2
  return 1
}

export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
LOCAL_WORLD_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-$SLURM_TASKS_PER_NODE}" "$SLURM_NODEID") || exit 1
first_node=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n 1)
[ -n "$first_node" ] || { echo "task.sh: no node in the step's node list" >&2; exit 1; }
MASTER_ADDR=$first_node
if ! getent hosts "$first_node" >/dev/null 2>&1; then  # a node name that no resolver knows
  addr=$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
  MASTER_ADDR=${addr:-$first_node}
fi
LOCAL_SIZE=$LOCAL_WORLD_SIZE
export LOCAL_WORLD_SIZE LOCAL_SIZE MASTER_ADDR
export MASTER_PORT=${LONGVL_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
if [ "$LOCAL_RANK" = 0 ]; then  # one line per node: which node (and host) holds which ranks
  echo "task.sh: node ${SLURMD_NODENAME:-?} ($SLURM_NODEID of ${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-?}}," \
       "host $(hostname -s)): ranks $RANK.. ($LOCAL_WORLD_SIZE here) of $WORLD_SIZE," \
       "master $MASTER_ADDR:$MASTER_PORT" >&2
fi

# SLURM signals every process of the step (the python ranks and this shell). The ranks handle
# SIGUSR1/SIGTERM themselves; this shell only has to outlive them to report their exit status.
# A trap with a command (not '') is reset to the default in the child, so the ranks see the signal.
trap : USR1 TERM
"$@"
rc=$?
if [ "$rc" = 3 ] && [ -n "${LONGVL_STOPPED_DIR:-}" ]; then
  if [ -d "$LONGVL_STOPPED_DIR" ]; then : >"$LONGVL_STOPPED_DIR/rank$RANK"; fi
  exit 0
fi
exit "$rc"
