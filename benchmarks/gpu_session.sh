#!/usr/bin/env bash
# Everything this project measures on a CUDA machine, in four phases, in order of priority
# (the issues' figures first), each under a 10-minute call: every phase's step limits, the
# device lines included, add up to under 600 s (tests/test_gpu_session.py checks it).
# Usage, on the GPU machine, repo root (the repo goes on PYTHONPATH here):
#   OUT=dir bash benchmarks/gpu_session.sh kernels    # 1/4/16-token tables, gate and up in
#                                                     # one launch (decides FUSED_GATE_UP)
#   OUT=dir bash benchmarks/gpu_session.sh fidelity   # CUDA profile and validate (tiny), each
#                                                     # with rows at launches and --sync-rows
#   OUT=dir bash benchmarks/gpu_session.sh mixtral    # Mixtral-shaped fidelity, its profile
#                                                     # measured in the run
#   OUT=dir bash benchmarks/gpu_session.sh followups  # GPU tests, a bfloat16 run, planes in
#                                                     # place vs stacked, loads into the CUDA
#                                                     # pool, launch sweep
# Each step has its own time limit, so one that runs long costs only itself; logs and JSON land
# in $OUT (docs/reproduce.md says which result file each feeds), at most 8 files a phase (what
# one device call brings back).
set -u -o pipefail
phase=${1:?usage: gpu_session.sh kernels|fidelity|mixtral|followups}
case "$phase" in kernels|fidelity|mixtral|followups) ;; *)
  echo "unknown phase $phase: kernels, fidelity, mixtral or followups" >&2; exit 2 ;; esac
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks import d2moe from here
PY=${PY:-python3}
JOBS=${JOBS:-$(nproc)}
D2MOE="$PY -m d2moe.cli"  # (a word list, so that `timeout` can run it)
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }

step device
{ date -u; timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv
  timeout 30 $D2MOE env  # versions, the GPU, the CPU kernel, O_DIRECT on the cache's disk
  timeout 10 $PY -c "import simpy" 2>/dev/null || echo "simpy missing: the fidelity phase needs it"
} 2>&1 | tee "$OUT/device.txt"

case "$phase" in
kernels)
  step "1-token table with the correctness check (~150 s)"
  timeout 200 $PY benchmarks/kernels.py --check --kinds bitplane --tokens 1 --jobs "$JOBS" \
    --json "$OUT/k1.json" 2>&1 | grep -v "resource_tracker\|warnings.warn" | tail -32
  step "4 and 16 tokens (~60 s)"
  timeout 120 $PY benchmarks/kernels.py --kinds bitplane --bits 2,4,8 --tokens 4,16 \
    --jobs "$JOBS" --json "$OUT/k4-16.json" 2>&1 | grep -v "resource_tracker\|warnings.warn" \
    | tail -26
  step "gate and up in one launch against four (decides FUSED_GATE_UP; not yet timed)"
  timeout 200 $PY benchmarks/gate_up.py --bits 2,4,8 --tokens 1,4 2>&1 | tail -30 \
    | tee "$OUT/gate_up.txt"
  ;;
fidelity)
  # rows at the launches (the default) against rows after the GPU's work (--sync-rows), each
  # with a profile measured the same way: which one the simulator predicts, at what cost in
  # real tokens/s (docs/profiling.md, "Timeline rows on CUDA")
  for mode in launch sync; do
    flag=""; [ "$mode" = sync ] && flag="--sync-rows"
    step "CUDA profile, rows: $mode (~80 s)"
    timeout 140 $D2MOE profile --device cuda $flag --out "$OUT/h100-$mode.yaml" \
      --no-progress 2>&1 | tail -8
    step "validate, tiny model, rows: $mode (~50 s with 3 repeats)"
    timeout 120 $D2MOE validate --device cuda $flag --profile "$OUT/h100-$mode.yaml" \
      --repeats 3 --out "/tmp/d2moe-validate-$mode" 2>&1 | grep -v "^wrote" | tail -12
    cp "/tmp/d2moe-validate-$mode/fidelity.json" "$OUT/validate-tiny-$mode.json" 2>/dev/null
  done
  ;;
mixtral)
  # ~270 s on 2026-11-23; the profile has gained probes since (cold loads per pause, a
  # quarter-budget decode), so it has the phase to itself
  step "Mixtral-shaped, 2 layers, profile measured in the run (~400 s)"
  timeout 500 $PY benchmarks/fidelity.py --device cuda --mixtral --layers 2 --tokens 4 \
    --measure --store /tmp/d2moe-mix --out /tmp/d2moe-fmix 2>&1 | grep -v "^wrote" | tail -12
  for f in fidelity.json table.txt profile.yaml timeline-50pct.png; do  # (8 files at most)
    cp "/tmp/d2moe-fmix/$f" "$OUT/fidelity-mixtral-$f" 2>/dev/null; done
  ;;
followups)
  # the GPU's checks of changes made on the CPU since the H100 session of 2026-11-23
  step "GPU tests (~90 s)"
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tail -3
  step "the executor in bfloat16 (--dtype, 2026-11-24: tested on the CPU only) (~30 s)"
  timeout 60 $D2MOE run --device cuda --dtype bfloat16 --budget 50% --max-new-tokens 16 \
    --no-progress --out /tmp/d2moe-bf16 2>&1 | tail -3 | tee "$OUT/run_bf16.txt"
  step "planes in place against stacked per run, the pool's change of 2026-11-23 (~40 s)"
  timeout 80 $PY benchmarks/plane_views.py --bits 2,4,8 2>&1 | tail -16 \
    | tee "$OUT/plane_views.txt"
  step "loads into the CUDA pool: heap read buffers against a mapping per read (~40 s)"
  timeout 80 $PY benchmarks/read_buffers.py --device cuda --spec mixtral-8x7b --rounds 6 \
    2>&1 | tail -4 | tee "$OUT/read_buffers.txt"
  step "loads into the CUDA pool: checksums beside the next read against inline (~40 s)"
  timeout 80 $PY benchmarks/load_checksum.py --device cuda --rounds 6 \
    2>&1 | tail -4 | tee "$OUT/load_checksum.txt"
  step "launch sweep: the default against its split and pipeliner variants (~60 s)"
  timeout 80 $PY benchmarks/kernels.py --tune --tune-set pipeline \
    --models mixtral-8x7b,llama-moe-3.5b --no-table --kinds bitplane --tokens 1,4 \
    --jobs "$JOBS" --json "$OUT/tune.json" > "$OUT/tune.log" 2>&1 \
    || tail -1 "$OUT/tune.log"  # why it stopped (no CUDA: one line), as the steps above show
  grep "^tune" "$OUT/tune.log" | head -120
  ;;
esac
step done
