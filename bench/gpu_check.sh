#!/usr/bin/env bash
# One-shot GPU check on a fresh machine (torch + triton preinstalled, no network), in under 8 minutes:
#   1. install build wheels carried in .whl/ (if any), build + install this package (CUDA kernels included)
#   2. the GPU tests (pytest -m gpu)
#   3. the benchmarks present: bench_optim (short sizes; its JSON kept out of $OUT, its table and the fused
#      8-bit step's memory-floor check folded into the log and summary), bench_quant, bench_linear,
#      bench_layer (JSON + PNG each), bench_plan --quick (beside bench_optim's JSON; the planner against
#      torch.cuda.max_memory_allocated in the summary)
#   4. a short summary table
# Results and the log go to $OUT (or bench/results when OUT is unset). Each step gets a time cap from what
# is left of the total budget (QLORA_CHECK_BUDGET_S, default 460 s), so a slow step cannot eat the rest.
# Keep $OUT at <= 8 files (the device tool returns at most 8): log, summary and one JSON + PNG per bench.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
BUDGET="${QLORA_CHECK_BUDGET_S:-460}"
START=$(date +%s)
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" TRITON_DEFAULT_FP_FUSION=0
unset TRITON_INTERPRET
: > "$LOG"
STATUS=()

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step NAME CAP_SECONDS CMD...: run with timeout min(CAP, time left - 10 s reserve), record status
  local name=$1 cap=$2; shift 2
  local t; t=$(left); t=$(( t - 10 < cap ? t - 10 : cap ))
  if (( t < 15 )); then log "SKIP $name (no time left)"; STATUS+=("$name: skipped (time)"); return 0; fi
  log "START $name (cap ${t}s): $*"
  local s=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  log "END $name rc=$rc in $(( $(date +%s) - s ))s"
  STATUS+=("$name: rc=$rc ($(( $(date +%s) - s ))s)")
  (( rc == 0 )) || FAILED=1
  return 0
}
FAILED=0

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # it pip-installs the package into the current environment: never by accident on a development machine
  log "no CUDA device visible: this script is for a GPU machine (QLORA_CHECK_FORCE=1 runs it anyway)"
  [[ "${QLORA_CHECK_FORCE:-0}" == 1 ]] || exit 2
fi
log "host: $(hostname); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF

# 1. build. Build requirements (scikit-build-core, pybind11) may be carried as wheels in .whl/.
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
fi
if [[ -f pyproject.toml ]]; then
  step build 200 "$PY" -m pip install -q --no-build-isolation --no-deps .
  if ! "$PY" -c "import qlora_kernels.triton_kernels" 2>>"$LOG"; then
    log "installed package not importable with its triton_kernels: falling back to the source tree"
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  log "no pyproject.toml: using the source tree (python/) without the native extension"
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
# the source tree reaches triton_kernels/ through a development symlink (git-ignored, so it does not travel)
[[ -e python/qlora_kernels/triton_kernels ]] || ln -s ../../triton_kernels python/qlora_kernels/triton_kernels
"$PY" -c "import qlora_kernels as q; print('backend_info', q.backend_info())" 2>&1 | tee -a "$LOG"

# 2. GPU tests (the package as installed; tests/ does not put python/ on the path)
step gpu-tests 150 "$PY" -m pytest -m gpu tests -q -x -p no:cacheprovider -o addopts="" --durations=5

# 3. benchmarks (those present). The optimizer bench writes outside $OUT (8 files at most come back); the
# summary below reads it from there.
OPTIM_DIR="$(mktemp -d)"
[[ -f bench/bench_optim.py ]] && step bench_optim 45 "$PY" -m bench.bench_optim --device cuda --sizes 16,16x256,64 --reps 5 --out "$OPTIM_DIR"
[[ -f bench/bench_quant.py ]] && step bench_quant 60 "$PY" -m bench.bench_quant --out "$OUT" --skip-slow-reference
[[ -f bench/bench_linear.py ]] && step bench_linear 170 "$PY" -m bench.bench_linear --out "$OUT" --budget-s 120
[[ -f bench/bench_layer.py ]] && step bench_layer 70 "$PY" -m bench.bench_layer --out "$OUT" --no-model
# issue 10: the planner against torch.cuda.max_memory_allocated over a real step (last: it gets what is left)
[[ -f bench/bench_plan.py ]] && step bench_plan 60 "$PY" bench/bench_plan.py --quick --out "$OPTIM_DIR"

# 4. summary
"$PY" - "$OUT" "$OPTIM_DIR" <<'EOF' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
side = Path(sys.argv[2])
for path in sorted(out.glob("*.json")) + sorted(side.glob("optim-*.json")) + sorted(side.glob("plan-*.json")):
    data = json.loads(path.read_text())
    rows, meta = data.get("rows", []), data.get("meta", {})
    print(f"== {path.name}: {meta.get('device')} torch {meta.get('torch')} triton {meta.get('triton')} "
          f"copy {meta.get('copy_gbs', 0) or 0:.0f} GB/s matmul {meta.get('matmul_tflops', 0) or 0:.0f} TFLOP/s")
    if data.get("family") == "linear":
        cases = {}
        for r in rows:
            cases.setdefault(r["case"], {})[r["impl"]] = r
        print(f"{'case':<32} {'fused ms':>9} {'disp ms':>9} {'deq+mm':>9} {'bnb':>9} {'bf16':>9} {'x deq':>6} {'%copy':>6} {'%mm':>5}")
        for case, d in cases.items():
            f = d.get("fused", {})
            ms = lambda k: f"{d[k]['median_ms']:.3f}" if k in d else "-"  # noqa: E731
            print(f"{case:<32} {ms('fused'):>9} {ms('dispatched'):>9} {ms('deq+mm'):>9} {ms('bnb+peft'):>9} "
                  f"{ms('bf16-lora'):>9} {f.get('speedup', 0):>6.2f} {f.get('%copy', 0):>6.1f} {f.get('%matmul', 0):>5.1f}")
        for k, v in meta.get("crossover", {}).items():
            print(f"crossover {k}: {v}")
    elif data.get("family") == "optim":
        # issue 11's GPU target: the fused 8-bit step within 1.3x of its memory floor (params, grads and states
        # read + written, at the best copy bandwidth measured in the same run)
        for r in rows:
            print(f"{r['case']:<16} {r['impl']:<34} {r['median_ms']:9.3f} ms  x_floor {r.get('x_floor', 0):6.2f}  "
                  f"state {r['state_B/param']:.3f} B/param  speedup {r.get('speedup', 0):6.2f}")
        for r in rows:
            if r["impl"] == "qlora_kernels AdamW8bit":
                verdict = "PASS" if r.get("x_floor", 99) <= 1.3 else "MISS"
                print(f"memory floor {r['case']}: fused 8-bit step at {r.get('x_floor', 0):.2f}x (target <= 1.3): {verdict}")
    elif data.get("family") == "plan":
        # issue 10: plan_memory's tensor bytes vs torch.cuda.max_memory_allocated over the same step (target 5%)
        for r in rows:
            print(f"{r['case']:<32} planned {r['planned_MiB']:9.2f} MiB  measured {r['measured_MiB']:9.2f} MiB  "
                  f"error {r['error_%']:+6.2f}%")
        worst = max((abs(r["error_%"]) for r in rows), default=float("nan"))
        print(f"planner vs the measured step ({meta.get('device')}): worst |error| {worst:.2f}% (target <= 5): "
              f"{'PASS' if worst <= 5 else 'MISS'}")
    else:
        for r in rows[:40]:
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                            if k in ("case", "impl", "median_ms", "GB/s", "%copy", "TFLOP/s", "speedup")))
EOF
log "steps: ${STATUS[*]}"
log "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$FAILED"
