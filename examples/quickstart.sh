#!/usr/bin/env bash
# Quickstart: set up .venv, build the synthetic shapes dataset, train a tiny cross-attention VLM
# on CPU with `mpirun -np 2` (data parallel, gloo), then report validation accuracy vs chance and the
# generative (greedy decoding) accuracy from tools/evaluate.py.
#   bash examples/quickstart.sh                       # cross_attention (Llama-3.2-Vision style)
#   ARCH=joint_decoder bash examples/quickstart.sh    # LLaVA style
#   ARCH=moma bash examples/quickstart.sh             # MoMa experts, expert parallel EP=2
#   ARCH=mot bash examples/quickstart.sh              # MoT: per-modality weights, one global attention
#   ARCH=mmca bash examples/quickstart.sh             # MMCA: multi-modal causal attention
#   QUICKSTART=fusion bash examples/quickstart.sh     # two vision encoders fused by cross-attention
# Extra arguments go to pretrain_vlm.py, e.g. `--train-iters 300`.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-cross_attention}
QUICKSTART=${QUICKSTART:-$ARCH}
DATA=${DATA:-data/shapes}
RUN=${RUN:-runs/quickstart_${QUICKSTART}_$(date +%Y%m%d_%H%M%S)}
CONFIG=examples/configs/quickstart_${QUICKSTART}.yaml
[ -f "$CONFIG" ] || { echo "quickstart.sh: ARCH/QUICKSTART=$QUICKSTART has no $CONFIG; allowed: cross_attention, joint_decoder, moma, mot, mmca, fusion" >&2; exit 2; }

bash scripts/setup_env.sh
. .venv/bin/activate

if [ ! -f "$DATA/summary.json" ]; then
  echo "== building the synthetic dataset in $DATA"
  python tools/make_synthetic_dataset.py --output "$DATA" --overwrite
fi

MPI_FLAGS=(--oversubscribe)
[ "$(id -u)" = 0 ] && MPI_FLAGS+=(--allow-run-as-root)
echo "== training ($CONFIG, 2 ranks) -> $RUN"
start=$(date +%s)
# Ctrl-C / SIGTERM: the ranks save a checkpoint in $RUN/ckpt and stop (see examples/graceful_stop.sh)
bash examples/graceful_stop.sh mpirun "${MPI_FLAGS[@]}" -np 2 -x OMP_NUM_THREADS=1 \
  python pretrain_vlm.py --config "$CONFIG" --data-path "$DATA" \
  --save "$RUN/ckpt" --log-dir "$RUN" "$@"
echo "== trained in $(( $(date +%s) - start )) s; metrics: $RUN/metrics.jsonl, checkpoint: $RUN/ckpt"

python - "$RUN/metrics.jsonl" "$DATA/summary.json" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "eval_accuracy" in r]
chance = json.load(open(sys.argv[2]))["chance"]["overall"]
if not evals:
    sys.exit("quickstart: no evaluation ran (raise --train-iters or lower --eval-interval)")
for r in evals:
    print(f"   iteration {r['iteration']:>5}: val loss {r['eval_loss']:.3f}  val accuracy {100 * r['eval_accuracy']:5.1f}%")
print(f"== val answer accuracy {100 * evals[-1]['eval_accuracy']:.1f}% | chance {100 * chance['chance']:.1f}% "
      f"| text-only baseline {100 * chance['text_only']:.1f}%")
PY

echo "== generative evaluation: tools/evaluate.py (greedy answers, exact match, KV-cached) on $DATA/val"
mpirun "${MPI_FLAGS[@]}" -np 2 -x OMP_NUM_THREADS=1 \
  python tools/evaluate.py --load "$RUN/ckpt" --data-path "$DATA" --output "$RUN/evaluate.json"
echo "== ask the model yourself: python tools/generate.py --load $RUN/ckpt --image $DATA/images/val/000000.jpg --prompt \"how many shapes?\""
