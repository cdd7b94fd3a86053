#!/usr/bin/env bash
# The third multi-task seed study of issue 20 (its recipe and seeds are fixed in DEVELOPERS.md) as ONE command on a
# borrowed GPU machine (the device tool), resumable over sessions:
#
#   here, once per session:  .venv/bin/python benchmarks/multitask_devpack.py .devpack
#   device run, carry [".devpack"], timeout_s 600:  bash benchmarks/multitask_gpu_study.sh
#   here, after it:  tar xzf <files_at>/runs.tgz -C /tmp && cp /tmp/runs/*.json benchmarks/results/multitask_seeds_8000_runs/
#                    then commit the new JSON of WHOLE pairs only (both methods of a seed: a pair never mixes
#                    devices) and table them with benchmarks/multitask_seeds.py --pool-devices --planned 20
#
# The same study on the CPU of a session without a device machine (the amendment in DEVELOPERS.md: pairs of either
# device are pooled), two runs at a time, none started after DEADLINE seconds:
#   OUT=/tmp/s3 DEVICE=cpu JOBS=2 DEADLINE=5000 LIMIT=100000 bash benchmarks/multitask_gpu_study.sh
#   then unpack $OUT/runs.tgz as above
# Runs already committed in RUNS are skipped; up to JOBS runs share the GPU (one process each), none starts after
# DEADLINE seconds, and the runner is stopped at LIMIT seconds so the results are packed before the call's limit
# (only 8 files come back from $OUT: the finished runs' JSON and every log travel as one runs.tgz).
# For a smoke test on a CPU: OUT=/tmp/o SEEDS=52 DEVICE=cpu EXTRA="--train-size 16 --dev-size 16 --epochs 1" bash ...
set -u
OUT=${OUT:?set OUT to a folder for the results}
RUNS=benchmarks/results/multitask_seeds_8000_runs
SEEDS=${SEEDS:-52-71} JOBS=${JOBS:-16} DEADLINE=${DEADLINE:-420} LIMIT=${LIMIT:-560} DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT/runs"
cp "$RUNS"/*.json "$OUT/runs/" 2>/dev/null
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
# shellcheck disable=SC2086
PYTHONPATH=src timeout "$LIMIT" "$PY" benchmarks/multitask_runs.py "$OUT/runs" --methods lora,mhr --seeds "$SEEDS" \
    --jobs "$JOBS" --deadline "$DEADLINE" -- --device "$DEVICE" --train-size 8000 --dev-size 1100 --epochs 3 \
    --batch-size 32 --lr-router 0.1 --model .devpack/model --data .devpack/glue ${EXTRA:-}
echo "runner status $?"
for f in "$RUNS"/*.json; do [ -e "$f" ] && rm -f "$OUT/runs/$(basename "$f")"; done  # only the new runs go back
tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -rf "$OUT/runs"
tar tzf "$OUT/runs.tgz" | grep -c '\.json$' | sed 's/^/new finished runs: /'
