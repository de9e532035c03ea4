#!/usr/bin/env bash
# One device call: GPU tests, correctness on real quantized matrices, optional tuning, the table.
# Usage (on the GPU machine, repo root): OUT=dir bash benchmarks/kernels_gpu.sh [--tune]
set -u -o pipefail
OUT=${OUT:-out/kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PY:-python3}
JOBS=${JOBS:-$(nproc)}
# without CUDA, one line (else kernels.py would time its CPU path into $OUT's GPU files)
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || {
  echo "kernels_gpu.sh needs CUDA: torch sees no GPU (CPU figures: benchmarks/kernels.py)" >&2
  exit 1; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tail -3 | tee "$OUT/pytest_gpu.log"
if [ "${1:-}" = "--tune" ]; then
  $PY benchmarks/kernels.py --check --tune --no-table --kinds bitplane --tokens 1 \
    --jobs "$JOBS" --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | grep -v "^tune"
  grep "^tune" "$OUT/tune.log" | awk 'NR % 3 == 1'  # the best config of each case
fi
$PY benchmarks/kernels.py --jobs "$JOBS" ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | tail -${TAIL:-60}
