#!/usr/bin/env bash
# One seed of both reproduction tasks with the full budget on one GPU (target: one H100, < 10 min):
# Fashion-MNIST and fashion-mnist-1k, ResNet-18 (small-image stem, D=512), 12 epochs each, MRL,
# MRL-E, FF at every prefix and the plain model; then the results tables, last.
#   bash benchmarks/gpu.sh            # OUT=results/gpu SEED=0 by default
# Needs Fashion-MNIST (Debian package dataset-fashion-mnist, or MRL_FASHION_MNIST=folder).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/gpu}
SEED=${SEED:-0}
mkdir -p "$OUT"
start=$(date +%s)
for task in fashion-mnist fashion-mnist-1k; do
    "$PY" -m mrl.cli reproduce "$task" --budget full --seed "$SEED" --out "$OUT/$task" \
        --no-progress > "$OUT-$task.log" 2>&1 || { tail -30 "$OUT-$task.log"; exit 1; }
done
echo "total: $(( $(date +%s) - start )) s on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
for task in fashion-mnist fashion-mnist-1k; do
    echo; echo "## $task (full budget, seed $SEED)"; echo
    sed -n '/^### top1/,$p' "$OUT-$task.log"
done
