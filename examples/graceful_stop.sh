#!/usr/bin/env bash
# Run a launcher (mpirun, srun, torchrun ...) so that SIGTERM, SIGINT (Ctrl-C) and SIGHUP to THIS
# script end the training with a saved checkpoint and exit code 0:
#   bash examples/graceful_stop.sh mpirun -np 8 python pretrain_vlm.py ... --save DIR --load DIR
# Open MPI 5's mpirun kills the ranks a fraction of a second after forwarding SIGTERM/SIGINT (too
# soon to save) but forwards SIGUSR1 untouched, and srun forwards SIGUSR1 to every task; the ranks
# of pretrain_vlm.py treat SIGUSR1 like SIGTERM (save at the end of the iteration, exit 0). So the
# launcher runs in its own session (Ctrl-C in a terminal reaches only this script) and the signals
# this script gets are passed on as SIGUSR1. Exit code: the launcher's.
set -uo pipefail
[ $# -ge 1 ] || { echo "graceful_stop.sh: usage: graceful_stop.sh LAUNCHER [ARGS...]" >&2; exit 2; }
setsid "$@" &
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null' TERM INT HUP
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break   # wait returned because of a trapped signal: keep waiting
done
exit "$rc"
