#!/usr/bin/env bash
#SBATCH --job-name=megatron-vlm
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
# Multi-node FP8 pretraining with srun (one task per GPU). The runtime reads SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID; rank 0's host is the rendezvous.
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # needed by TP/SP communication overlap
DATA=${DATA:?set DATA to a dataset folder with train/ and val/ shards}
RUN=${RUN:-runs/llama3_8b_vitl_fp8}
srun python pretrain_vlm.py --config examples/configs/llama3_8b_vitl_fp8.yaml \
  --data-path "$DATA" --save "$RUN/ckpt" --load "$RUN/ckpt" --log-dir "$RUN/logs" "$@"
