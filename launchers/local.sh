#!/usr/bin/env bash
# One node, N processes:  launchers/local.sh N --config pretrain/configs/demo.yaml [run.py args ...]
# On a machine without GPUs DeepSpeed runs on the CPU with gloo (DS_ACCELERATOR=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
nproc_per_node=${1:?usage: launchers/local.sh NPROC run.py-args...}
shift
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
exec deepspeed --num_gpus "$nproc_per_node" --master_port "$port" pretrain/run.py "$@"
