#!/usr/bin/env bash
# The shared body of pretrain.sbatch and finetune.sbatch; the batch shell execs it:
#
#   job.sh ENTRY [ENTRY args ...]      ENTRY: pretrain/run.py or finetune/run.py (repo-relative)
#
# 1. runs `srun --kill-on-bad-exit=1 task.sh $PYTHON ENTRY --resume ARGS` in the repository root:
#    one task per rank, task.sh exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM's variables;
# 2. on SIGUSR1 (sbatch --signal=B:USR1@T: the time limit is T seconds away) forwards it to srun,
#    which signals every process of the step: each rank finishes its step, they save a checkpoint
#    together and exit with 3;
# 3. when srun returns: all ranks finished -> exit 0; the ranks stopped early with a checkpoint (3),
#    or SIGUSR1 came and the step ended badly -> `scontrol requeue`: the job goes back to the queue
#    (SLURM holds a requeued job for about two minutes) and the next run resumes from the latest
#    checkpoint, since --resume is always passed; any other failure -> exit with srun's status.
#
# The entry point's contract: exit 0 when done, exit 3 after saving when stopped early (SIGUSR1,
# SIGTERM), and --resume without a checkpoint starts from step 0.
set -uo pipefail   # not -e: srun's status is examined below

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
entry=${1:?usage: job.sh ENTRY [args ...]}
shift
python=${PYTHON:-python3}
: "${SLURM_JOB_ID:?job.sh runs inside a SLURM batch job: submit pretrain.sbatch or finetune.sbatch with sbatch}"
cd "$root" || exit 1
if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu   # no GPUs: DeepSpeed runs on the CPU with gloo
fi

echo "==== longvl job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST," \
     "${SLURM_NTASKS:-?} ranks, $(date '+%F %T') ===="
echo "==== $python $entry --resume $* (in $root) ===="

# Ranks that stop with exit code 3 leave a marker here (task.sh), so srun itself sees success.
LONGVL_STOPPED_DIR=$(mktemp -d "${TMPDIR:-/tmp}/longvl-$SLURM_JOB_ID.XXXXXX") || exit 1
export LONGVL_STOPPED_DIR

signalled=""
srun_pid=""
# shellcheck disable=SC2317  # called by the trap
on_usr1() {
  signalled=1
  echo "longvl: SIGUSR1 (time limit near): asking every rank to save a checkpoint and stop"
  if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null; fi   # srun forwards it to the step
}
trap on_usr1 USR1

# srun in the background: bash runs a trap only between commands, and `wait` returns as soon as
# a trapped signal arrives, while a foreground srun would delay the trap until it ended.
# (srun no longer inherits --cpus-per-task from sbatch in some SLURM versions: pass it on.)
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  "$here/task.sh" "$python" "$entry" --resume "$@" &
srun_pid=$!
while :; do
  wait "$srun_pid"
  rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break   # still running: wait was interrupted by the trap
done

stopped=$(find "$LONGVL_STOPPED_DIR" -name 'rank*' | wc -l)
rm -rf "$LONGVL_STOPPED_DIR"
if [ "$rc" = 0 ] && [ "$stopped" = 0 ]; then
  echo "==== longvl job $SLURM_JOB_ID: training finished ===="
  exit 0
fi
if [ "$rc" = 0 ]; then
  why="the ranks stopped early with a checkpoint (exit code 3)"
elif [ -n "$signalled" ]; then
  why="the step ended with status $rc after SIGUSR1"
else
  echo "==== longvl job $SLURM_JOB_ID: srun failed with status $rc; not requeueing ====" >&2
  exit "$rc"
fi
echo "==== longvl job $SLURM_JOB_ID: $why; requeueing, the next run resumes from the latest checkpoint ===="
# SLURM ends this batch shell once the job is requeued; the log file is appended to (--open-mode=append).
scontrol requeue "$SLURM_JOB_ID" && exit 0
echo "==== longvl job $SLURM_JOB_ID: scontrol requeue failed (job submitted with --no-requeue?):" \
     "resubmit it, it resumes from the latest checkpoint ====" >&2
exit 3
