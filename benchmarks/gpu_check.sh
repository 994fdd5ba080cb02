#!/usr/bin/env bash
# One GPU check, planned for under 8 minutes on one GPU (not yet timed on one; with one GPU the step
# limits add up to 9.5 minutes, inside the 10 a lent machine gives one command): CUDA tests, quick_test
# on CUDA, the benchmark in fp32, bf16 + channels-last and --compile on, a 5-epoch default run in fp32
# and in bf16 (same seed, final accuracies printed under the table), and torchrun with one process per
# GPU when there are 2 or more.
# Prints one summary table; exits 1 if any part failed or ran past its time limit (each step has one, so
# that a hang cannot eat a lent machine's time), 2 when $PYTHON lacks torch or pytest.
# Without CUDA it runs the CPU equivalents (quick, tiny), says what it skipped and why, and exits 0
# when those pass.
#
#   bash benchmarks/gpu_check.sh                        # PYTHON=.venv/bin/python by default
#   GPU_CHECK_DIR=/some/folder bash benchmarks/gpu_check.sh   # logs, JSON and run folders there (default: a
#                                                       # new temp folder), e.g. a folder that is copied back
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)") || {
    echo "gpu_check: $PYTHON cannot import torch" >&2; exit 2; }
"$PYTHON" -c "import pytest" 2>/dev/null || {
    echo "gpu_check: $PYTHON cannot import pytest (its test steps need it): .venv/bin/pip install -r requirements-dev.txt" >&2
    exit 2; }
if [ -n "${GPU_CHECK_DIR:-}" ]; then OUT=$GPU_CHECK_DIR; mkdir -p "$OUT"; else OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); fi
NAMES=(); RESULTS=(); FAILED=0
# Tiny benchmark settings: the check is that each mode runs, not how fast (benchmarks/README.md times them).
BENCH=(--steps 4 --warmup 2 --eval-batches 2 --loader-batches 2 --image-size 64 --batch-size 8)

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log to $OUT/NAME.log, record the result
    local name=$1 limit=$2; shift 2
    local start=$SECONDS code=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || code=$?
    local took="$((SECONDS - start))s"
    case $code in
        0) RESULTS+=("pass  $took") ;;
        124|137) RESULTS+=("FAIL  $took: past its limit of ${limit}s (log: $OUT/$name.log)"); FAILED=1 ;;
        *) RESULTS+=("FAIL  $took, exit $code (log: $OUT/$name.log)"); FAILED=1 ;;
    esac
    NAMES+=("$name")
}
skip() { NAMES+=("$1"); RESULTS+=("skipped: $2"); }

if [ "$GPUS" -gt 0 ]; then
    step cuda-tests 90 "$PYTHON" -m pytest -q tests/test_cuda.py
    step quick-test 60 "$PYTHON" quick_test.py --device cuda
    step bench-fp32 45 "$PYTHON" benchmarks/bench_train.py --device cuda --amp off --channels-last off --compile off \
        "${BENCH[@]}" --json "$OUT/fp32.json"
    step bench-bf16-cl 45 "$PYTHON" benchmarks/bench_train.py --device cuda --amp bf16 --channels-last on --compile off \
        "${BENCH[@]}" --json "$OUT/bf16.json"
    step bench-compile 150 "$PYTHON" benchmarks/bench_train.py --device cuda --amp bf16 --channels-last on --compile on \
        "${BENCH[@]}" --json "$OUT/compile.json"
    # bf16 against fp32 on the same seed (docs: the default run's accuracy in bf16); 224 px, 5 epochs each.
    for amp in off bf16; do
        step "accuracy-$amp" 90 "$PYTHON" train_enhanced_adaptivestream.py --device cuda --amp "$amp" --epochs 5 \
            --compile off --vis-every 0 --seed 0 --out-dir "$OUT/accuracy-$amp"
    done
    if [ "$GPUS" -ge 2 ]; then
        step torchrun 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
            train_enhanced_adaptivestream.py --device cuda --epochs 1 --synthetic-train-size 128 \
            --synthetic-val-size 32 --image-size 64 --no-require-learning --out-dir "$OUT/torchrun"
    else
        skip torchrun "1 GPU: one process per GPU needs 2 or more"
    fi
else
    skip cuda-tests "no CUDA device (tests/test_cuda.py skips itself without one)"
    # The CPU twins of the CUDA tests: guard, SGD first-step skip, fp16 calibration, grouped BN restore.
    step guard-tests-cpu 300 "$PYTHON" -m pytest -q tests/test_guard.py tests/test_metrics.py
    skip quick-test "no CUDA device (quick_test.py on CPU is .ci/run's job)"
    step bench-cpu-fp32 300 "$PYTHON" benchmarks/bench_train.py --device cpu "${BENCH[@]}" --steps 2 --warmup 1 \
        --json "$OUT/fp32.json"
    skip bench-bf16-cl "no CUDA device (bf16 + channels-last is a GPU speed check)"
    skip bench-compile "no CUDA device (torch.compile on CPU needs a C++ toolchain and minutes)"
    skip accuracy "no CUDA device (bf16 is emulated on most CPUs: benchmarks/README.md, AMP on this CPU)"
    skip torchrun "no CUDA device (tests/test_distributed.py runs torchrun on CPU with Gloo)"
fi

echo
printf '%-16s %s\n' "check" "result"
for i in "${!NAMES[@]}"; do printf '%-16s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"; done
for amp in off bf16; do
    [ -f "$OUT/accuracy-$amp/metrics.csv" ] || continue
    "$PYTHON" - "$OUT/accuracy-$amp/metrics.csv" "$amp" <<'PY'
import csv, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
print(f"amp {sys.argv[2]:<5} epoch {row['epoch']}: val mIoU {float(row['val_miou']):.3f}, cls acc {float(row['val_cls_acc']):.3f}")
PY
done
echo "logs and JSON: $OUT"
exit $FAILED
