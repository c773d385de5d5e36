#!/usr/bin/env bash
# One seed of the reproduction tasks with the full budget on one GPU (target: one H100): MRL, MRL-E,
# FF at every prefix and the plain model, ResNet-18 (small-image stem, D=512), 12 epochs each.
# Each task's table is printed as soon as it finishes; a failed or timed-out task does not hide the
# other's table, and the script exits non-zero at the end if any failed.
#
#   bash benchmarks/gpu.sh                              # both tasks; RESULTS=results/gpu SEED=0
#   TASKS=fashion-mnist TASK_TIMEOUT=540 bash benchmarks/gpu.sh   # one task
#   REPRODUCE_ARGS="--only mrl,plain" TASKS=fashion-mnist bash benchmarks/gpu.sh  # fewer models
#
# On the device machine (mrl not installed there; data travel in .gpu/, see
# benchmarks/prepare_gpu_carry.py):
#   MRL_FASHION_MNIST=.gpu/vision/fashion-mnist TASKS=fashion-mnist bash benchmarks/gpu.sh
# Runs stay under RESULTS (git-ignored runs/gpu: kept between calls to a warm machine, so a
# rerun resumes from the cached runs; with REPRODUCE_ARGS, runs/gpu-<hash of them>: a short call's
# runs do not block the full recipe's folder). When $OUT is set (the device's returned folder) each
# task's log is written straight into $OUT/<task>/ (so a killed call still returns it), and its
# results.md, claims.md and results.json are copied there as soon as the task ends; the tasks
# then share TOTAL_TIMEOUT (default 550 s, under the device's 600 s per call): each gets the time
# left (at most TASK_TIMEOUT), and a task with under 30 s left is not started (reported as
# failed; a rerun on the warm machine resumes from the cached runs). The issue's goal is both
# tasks in under 10 minutes on one H100. REPRODUCE_ARGS: more options for `mrl reproduce` (split
# on spaces), e.g. "--only mrl,plain" or "--set epochs=6" for a short call.
# A preflight refuses to start when CUDA is unusable (no silent CPU fall-back: --set device=cuda).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # mrl from this checkout, installed or not
export PYTHONUNBUFFERED=1  # progress lines reach the log as they happen, even if killed
if [ -z "${RESULTS:-}" ]; then
    RESULTS=runs/gpu
    if [ -n "${REPRODUCE_ARGS:-}" ]; then  # another recipe: `reproduce` refuses a mixed folder
        RESULTS=runs/gpu-$(printf '%s' "$REPRODUCE_ARGS" | cksum | cut -d' ' -f1)
    fi
fi
SEED=${SEED:-0}
TASKS=${TASKS:-fashion-mnist fashion-mnist-1k}
DEVICE=${DEVICE:-cuda}
if [ -n "${OUT:-}" ]; then
    TASK_TIMEOUT=${TASK_TIMEOUT:-540}
    deadline=$(( $(date +%s) + ${TOTAL_TIMEOUT:-550} ))  # the device call's 600 s, with a margin
else
    TASK_TIMEOUT=${TASK_TIMEOUT:-1800}
    deadline=${TOTAL_TIMEOUT:+$(( $(date +%s) + TOTAL_TIMEOUT ))}
fi
read -r -a tasks <<< "$TASKS"
read -r -a extra <<< "${REPRODUCE_ARGS:-}"
mkdir -p "$RESULTS"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# preflight: torch's version and the device, before any data is read or a run starts
if ! "$PY" -c "
import sys, torch
dev = sys.argv[1]
print(f'torch {torch.__version__}, python {sys.version.split()[0]}, device {dev}', end='')
if dev.startswith('cuda'):
    if not torch.cuda.is_available():
        sys.exit(': CUDA is not available to this torch (set DEVICE=cpu to run on the CPU)')
    print(f' ({torch.cuda.get_device_name(0)})', end='')
print()
" "$DEVICE"; then
    exit 1
fi
failed=()
for task in "${tasks[@]}"; do
    log="$RESULTS/$task.log"
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/$task"; log="$OUT/$task/$task.log"; fi
    start=$(date +%s)
    limit=$TASK_TIMEOUT
    if [ -n "${deadline:-}" ] && [ $(( deadline - start )) -lt "$limit" ]; then
        limit=$(( deadline - start ))
    fi
    if [ "$limit" -lt 30 ]; then
        failed+=("$task (not started: ${limit} s left of TOTAL_TIMEOUT)")
        echo "## $task not started: ${limit} s left of TOTAL_TIMEOUT (rerun to continue)"
        continue
    fi
    echo "[$task] reproduce --budget full --seed $SEED (timeout ${limit} s; log $log)"
    # tee: progress reaches the caller while it runs, and the log keeps it
    touch "$RESULTS/.start-$task"  # results older than this are an earlier call's: not copied
    # -k: a process stuck in a C call ignores SIGTERM; SIGKILL 15 s later keeps the call alive
    timeout -k 15 "$limit" "$PY" -m mrl.cli reproduce "$task" --budget full --seed "$SEED" \
        --out "$RESULTS/$task" --set "device=$DEVICE" --no-progress "${extra[@]}" 2>&1 \
        | tee "$log" | grep --line-buffered '^\['
    status=("${PIPESTATUS[@]}")
    rc=${status[0]}
    took=$(( $(date +%s) - start ))
    if [ -n "${OUT:-}" ]; then
        for f in results.md claims.md results.json; do
            [ "$RESULTS/$task/$f" -nt "$RESULTS/.start-$task" ] && cp "$RESULTS/$task/$f" "$OUT/$task/"
        done
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
