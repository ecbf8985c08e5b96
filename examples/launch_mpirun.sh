#!/usr/bin/env bash
# Multi-node FP8 pretraining with Open MPI: HOSTFILE lists the nodes ("node1 slots=8").
# The runtime reads OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; MASTER_ADDR must name rank 0's host.
# Preemption: SIGTERM/SIGINT/SIGHUP to this script save a checkpoint and exit 0 (graceful_stop.sh
# turns them into SIGUSR1 for mpirun, which forwards it; a signal to mpirun itself kills the ranks).
# Relaunching the same command resumes from --save (the auto-resume idiom: --save = --load).
set -euo pipefail
HOSTFILE=${HOSTFILE:?set HOSTFILE}
NP=${NP:-64}
export MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 "$HOSTFILE" | awk '{print $1}')}
DATA=${DATA:?set DATA to a dataset folder with train/ and val/ shards}
RUN=${RUN:-runs/llama3_8b_vitl_fp8}
exec bash "$(dirname "$0")/graceful_stop.sh" \
  mpirun -np "$NP" --hostfile "$HOSTFILE" --map-by ppr:8:node --bind-to none \
  -x MASTER_ADDR -x PATH -x LD_LIBRARY_PATH -x CUDA_DEVICE_MAX_CONNECTIONS=1 \
  python pretrain_vlm.py --config examples/configs/llama3_8b_vitl_fp8.yaml \
  --data-path "$DATA" --save "$RUN/ckpt" --load "$RUN/ckpt" --log-dir "$RUN/logs" "$@"
