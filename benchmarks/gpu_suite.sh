#!/usr/bin/env bash
# Issue 15's GPU measurements in one run (under 8 minutes on an H100/H200):
#   1. machine       nvidia-smi, CPU count, disk                        -> results/gpu_machine.txt
#   2. overhead      benchmarks/extract_overhead.py r50_c2-c5_640 (CPU) -> results/gpu_extract_overhead/*
#   3. limits        extraction views/s beside its three limits         -> results/gpu_limits.*
#   4. savings R50   R50-FPN 640², batch 8, every regime + break-even   -> results/gpu_savings_resnet50.*
#   5. savings large convnext_large 1024², batch 8 (random weights)    -> results/gpu_savings_large.*
# Each part has its own timeout; a failed or timed-out part is recorded in results/gpu_suite.log
# and the next part still runs. Results are written as each part ends.
# Dry run on a CPU: GPU_SUITE_DEVICE=cpu GPU_SUITE_TINY=1 benchmarks/gpu_suite.sh [OUT]
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python}"
export GPU_SUITE_DEVICE="${GPU_SUITE_DEVICE:-cuda}"
export GPU_SUITE_TINY="${GPU_SUITE_TINY:-0}"
SCALE=1  # the CPU dry run gets 4x the time limits
if [ "$GPU_SUITE_DEVICE" = cpu ]; then SCALE=4; fi
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
: >"$LOG"

part() {  # part NAME SECONDS COMMAND...: run with a timeout, log its status, never stop the suite
    local name=$1 limit=$(($2 * SCALE)) start=$SECONDS status=0
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start))s" | tee -a "$LOG"
}

machine() {
    { nvidia-smi || echo "no nvidia-smi"; nproc; df -h "$OUT"; "$PY" -c "import torch; print(torch.__version__)"; } \
        >"$OUT/gpu_machine.txt" 2>&1
}

overhead() {
    if [ -f benchmarks/extract_overhead.py ]; then
        # the config the limits part reads (R50 c2-c5 at 640²), 3 rounds and 1 views/s run of each: 81 s on the 2-core development CPU
        "$PY" benchmarks/extract_overhead.py r50_c2-c5_640 --rounds 3 --scaling-rounds 1 --out "$OUT/gpu_extract_overhead"
    else
        echo "benchmarks/extract_overhead.py is not in this tree: the CPU-side limit is not measured"
    fi
}

export -f machine overhead
export OUT PY
OVERHEAD_JSON=""
part machine 20 bash -c machine
part overhead 120 bash -c overhead
for candidate in "$OUT/gpu_extract_overhead/extract_overhead.json" "$OUT/gpu_extract_overhead.json"; do
    if [ -f "$candidate" ]; then OVERHEAD_JSON=$candidate; fi
done
part limits 90 "$PY" benchmarks/gpu_suite.py limits --out "$OUT" ${OVERHEAD_JSON:+--overhead "$OVERHEAD_JSON"}
part savings_resnet50 110 "$PY" benchmarks/gpu_suite.py savings --out "$OUT" --kind resnet50 \
    --backbone resnet50 --size 640 --batch 8
part savings_large 130 "$PY" benchmarks/gpu_suite.py savings --out "$OUT" --kind large \
    --backbone convnext_large --size 1024 --batch 8
echo "gpu_suite done: $(grep -c ': exit 0 ' "$LOG") of 5 parts succeeded; see $LOG" | tee -a "$LOG"
