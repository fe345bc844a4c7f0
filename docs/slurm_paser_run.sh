#!/bin/bash
# paser run on several nodes under SLURM: one torchrun per node, rendezvous on the first node.
#   sbatch docs/slurm_paser_run.sh run.yaml
# Every rank runs the same pipeline; rank 0 prunes and writes, all ranks score, train (DDP) and evaluate.
# The run folder and PASER_CACHE must be on a file system every node sees (partial score files, checkpoints).
#SBATCH --job-name=paser
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
set -euo pipefail

CONFIG=${1:?usage: sbatch docs/slurm_paser_run.sh CONFIG.yaml}
export PASER_CACHE=${PASER_CACHE:-$PWD/.paser-cache}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$SLURM_GPUS_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" \
  -m paser run "$CONFIG"
