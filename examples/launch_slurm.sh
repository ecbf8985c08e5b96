#!/usr/bin/env bash
#SBATCH --job-name=megatron-vlm
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=B:TERM@300
# Multi-node FP8 pretraining with srun (one task per GPU). The runtime reads SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID; rank 0's host is the rendezvous.
# Preemption and the time limit: Slurm sends SIGTERM to this batch script 300 s before the limit
# (--signal=B:TERM@300); graceful_stop.sh passes it to srun as SIGUSR1, which srun forwards to every
# task: the ranks save a checkpoint at the end of the iteration and exit 0. scancel/preemption
# signal the tasks directly with SIGTERM, which they handle the same way within the cluster's
# KillWait. Resubmitting the script resumes (--save = --load). --kill-on-bad-exit: a dead rank
# ends the step at once instead of leaving its peers waiting in a collective.
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # needed by TP/SP communication overlap
DATA=${DATA:?set DATA to a dataset folder with train/ and val/ shards}
RUN=${RUN:-runs/llama3_8b_vitl_fp8}
exec bash examples/graceful_stop.sh \
  srun --kill-on-bad-exit=1 python pretrain_vlm.py --config examples/configs/llama3_8b_vitl_fp8.yaml \
  --data-path "$DATA" --save "$RUN/ckpt" --load "$RUN/ckpt" --log-dir "$RUN/logs" "$@"
