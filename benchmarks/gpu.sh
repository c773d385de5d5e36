#!/usr/bin/env bash
# One seed of the reproduction tasks with the full budget on one GPU (target: one H100): MRL, MRL-E,
# FF at every prefix and the plain model, ResNet-18 (small-image stem, D=512), 12 epochs each.
# Each task's table is printed as soon as it finishes; a failed or timed-out task does not hide the
# other's table, and the script exits non-zero at the end if any failed.
#
#   bash benchmarks/gpu.sh                              # both tasks; RESULTS=results/gpu SEED=0
#   TASKS=fashion-mnist TASK_TIMEOUT=540 bash benchmarks/gpu.sh   # one task per call
#
# On the device machine (mrl not installed there; data travel in .gpu/, see
# benchmarks/prepare_gpu_carry.sh):
#   MRL_FASHION_MNIST=.gpu/fashion-mnist TASKS=fashion-mnist bash benchmarks/gpu.sh
# Runs and logs stay under RESULTS; when $OUT is set (the device's returned folder) only each
# task's results.md, claims.md, results.json and log are copied into $OUT/<task>/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # mrl from this checkout, installed or not
RESULTS=${RESULTS:-results/gpu}
SEED=${SEED:-0}
TASKS=${TASKS:-fashion-mnist fashion-mnist-1k}
TASK_TIMEOUT=${TASK_TIMEOUT:-1800}  # seconds per task; the device allows 600 s per call
mkdir -p "$RESULTS"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
failed=()
for task in $TASKS; do
    log="$RESULTS/$task.log"
    start=$(date +%s)
    echo "[$task] reproduce --budget full --seed $SEED (timeout ${TASK_TIMEOUT} s; log $log)"
    # tee: progress reaches the caller while it runs, and the log keeps it
    timeout "$TASK_TIMEOUT" "$PY" -m mrl.cli reproduce "$task" --budget full --seed "$SEED" \
        --out "$RESULTS/$task" --no-progress 2>&1 | tee "$log" | grep --line-buffered '^\['
    status=("${PIPESTATUS[@]}")
    rc=${status[0]}
    took=$(( $(date +%s) - start ))
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/$task"
        for f in results.md claims.md results.json; do
            [ -f "$RESULTS/$task/$f" ] && cp "$RESULTS/$task/$f" "$OUT/$task/"
        done
        cp "$log" "$OUT/$task/"
    fi
    echo
    if [ "$rc" -ne 0 ]; then
        failed+=("$task (exit $rc after $took s$([ "$rc" -eq 124 ] && echo ', timed out'))")
        echo "## $task FAILED (exit $rc after $took s); last lines of $log:"
        tail -20 "$log"
        continue
    fi
    echo "## $task (full budget, seed $SEED): $took s on ${gpu:-no GPU}"
    echo
    sed -n '/^### top1/,$p' "$log"
done
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
