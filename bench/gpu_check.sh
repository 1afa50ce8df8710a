#!/usr/bin/env bash
# The first run on a GPU machine (one H100/H200, torch + triton + nvcc preinstalled, no network): does it build
# for sm_90 and is it CORRECT there, then how fast; within 9 minutes of steps (budget table below).
#
#   bash bench/gpu_check.sh                       the whole check
#   bash bench/gpu_check.sh --rerun NODE [NODE..] facts, install check (a build only if none is usable), then
#                                                 those pytest node ids in one process (minutes)
# On the lent device machine: `bash bench/prepare_gpu_wheels.sh` here first, then run `bash bench/gpu_check.sh`
# with carry [".whl"] and timeout_s 600 (the steps take <= 540 s, plus ~10 s of untimed glue). With the machine's
# start that is ~11-12 of the session's 15 device minutes: what is left serves one --rerun on the warm machine.
#
# Order: facts -> preflight (GPU, nvcc, compute-sanitizer) -> build (CUDA required, sm_90 only; the package goes
# to a private prefix, never into the current environment) -> assert (native_cuda, 90 in cuda_archs, Triton on
# the GPU, imported from that prefix) -> GPU tests (fused kernels first and in parallel with the other groups,
# one process per group, per-test timeout, junit XML each) -> compute-sanitizer (memcheck on the native and
# Triton kernels, racecheck + synccheck on the native ones) -> bench_linear (its JSON rewritten after each
# case) -> the test that asks for more managed memory than is free (after everything else: the guard in
# optim/paged.py must refuse it; if the guard were broken it could hang the GPU) -> summary (bench/gpu_summary.py).
# Any failure, timeout or skip other than the known multi-GPU ones makes the exit code non-zero. Exit codes:
# 0 shown correct; 1 a step or test failed / unexpected skip / sanitizer error; 2 no GPU (not forced);
# 3 preflight: something missing (named); 4 no build and no usable prebuilt wheel; 5 the install fails its asserts.
#
# Carried in .whl/ (bench/prepare_gpu_wheels.sh makes them here): bitsandbytes (bench rows bnb+peft) and a
# prebuilt sm_90 qlora_kernels wheel, installed only when the build here fails (its Python files are then
# replaced by this tree's, so the kernels under test are this tree's Triton code and that wheel's _C).
#
# $OUT (default bench/results/gpu_check) gets at most 6 files: summary.txt, gpu_check.log, facts.txt, the
# bench JSON, details.tgz (junit XMLs, build log, sanitizer logs): the device tool returns 8 files at most.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

# ---- budget (seconds). tests/test_gpu_check.py reads this table: the CAP_ steps run one after another and add
# up to <= 540 (9 minutes); the GCAP_ groups run inside CAP_tests (fused alone, the others one after another).
CAP_facts=15
CAP_preflight=15  # one torch import
CAP_wheels=10
CAP_build=135
CAP_assert=20
CAP_tests=170
CAP_memcheck=60
CAP_racecheck=25
CAP_synccheck=15
CAP_bench=50
CAP_oversubscribe=20
CAP_summary=5
GCAP_fused=170
GCAP_native=70
GCAP_stress=70
GCAP_other=30
TEST_TIMEOUT_S=60  # per test (tests/conftest.py, QLORA_TEST_TIMEOUT_S): one hung test cannot take its group

OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
PREFIX="${QLORA_CHECK_PREFIX:-/tmp/qk-site}"  # the package under test is installed here
START=$(date +%s)
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" TRITON_DEFAULT_FP_FUSION=0
unset TRITON_INTERPRET QLORA_KERNELS_BACKEND
: > "$LOG"
FAILED=0
STATUS=()
RERUN=()
if [[ "${1:-}" == "--rerun" ]]; then
  shift
  (( $# )) || { echo "usage: bash bench/gpu_check.sh --rerun tests/file.py[::test] ..." >&2; exit 2; }
  RERUN=("$@")
fi

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
die() {  # die RC MESSAGE: stop at once, naming what is missing
  log "STOP: $2"
  echo "gpu_check: STOP: $2" > "$OUT/summary.txt"
  exit "$1"
}
# step NAME CAP CMD...: run under `timeout` (SIGINT first: pytest still writes its summary and junit XML),
# output to the log, status recorded; a non-zero exit or a timeout marks the run failed.
step() {
  local name=$1 cap=$2; shift 2
  log "START $name (cap ${cap}s): $*"
  local s; s=$(date +%s)
  timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  (( rc == 124 || rc == 137 )) && log "TIMEOUT $name after ${took}s (cap ${cap}s)"
  log "END $name rc=$rc in ${took}s"
  STATUS+=("$name=rc$rc/${took}s")
  (( rc == 0 )) || FAILED=1
  return "$rc"
}

# ---- 1. facts -----------------------------------------------------------------------------------------------
facts() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "--- nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not found or failed"
  echo "--- nvcc"; (command -v nvcc >/dev/null && nvcc --version) || /usr/local/cuda/bin/nvcc --version 2>&1 || echo "nvcc: not found"
  echo "--- compute-sanitizer"; { command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2; } || echo "compute-sanitizer: not found"
  echo "--- python"
  "$PY" - <<'EOF' 2>&1
import sys, platform
print("python", sys.version.split()[0], sys.executable, platform.machine())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} sm_{p.major}{p.minor} SMs {p.multi_processor_count} free {free / 2**30:.1f} / {total / 2**30:.1f} GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
import numpy
print("numpy", numpy.__version__)
from importlib.metadata import PackageNotFoundError, version  # versions without importing (fast)
for name in ("bitsandbytes", "peft", "transformers", "pytest", "pytest-xdist", "scikit-build-core", "pybind11"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "absent")
EOF
}
log "facts -> $OUT/facts.txt"
timeout "$CAP_facts" bash -c "$(declare -f facts); PY='$PY' REPO='$REPO' facts" > "$OUT/facts.txt" 2>&1
grep -E "^(python|torch|triton|numpy|device|bitsandbytes|peft) " "$OUT/facts.txt" | tee -a "$LOG"

# ---- 2. preflight: what a decisive run needs, all named at once -------------------------------------------
MISSING=()
timeout "$CAP_preflight" "$PY" -c "
import sys
try:
    import torch
except Exception:
    sys.exit(4)
sys.exit(0 if torch.cuda.is_available() else 5)" 2>/dev/null
case $? in
  0) ;;
  4) MISSING+=("torch ($PY cannot import it)") ;;
  5) MISSING+=("a CUDA device (torch.cuda.is_available() is False; nvidia-smi: $(command -v nvidia-smi || echo absent))") ;;
  *) MISSING+=("an answer from torch within ${CAP_preflight}s (is a CUDA device there?)") ;;
esac
NVCC=$(command -v nvcc || { [[ -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda/bin/nvcc; } || true)
[[ -n "$NVCC" ]] || MISSING+=("nvcc (the CUDA kernels must be built here)")
command -v compute-sanitizer >/dev/null || MISSING+=("compute-sanitizer")
"$PY" -c "import triton" 2>/dev/null || MISSING+=("triton")
if (( ${#MISSING[@]} )); then
  if [[ "${QLORA_CHECK_FORCE:-0}" != 1 ]] && [[ " ${MISSING[*]} " == *"a CUDA device"* ]]; then
    log "no CUDA device visible: this script is for a GPU machine (QLORA_CHECK_FORCE=1 runs its checks anyway)"
    exit 2
  fi
  die 3 "missing: $(printf '%s; ' "${MISSING[@]}" | sed 's/; $//')"
fi

# ---- 3. build: CUDA required, sm_90 only, pip's whole output kept ---------------------------------------------
timeout "$CAP_wheels" "$PY" -m pip install --no-index --no-deps --no-compile .whl/bitsandbytes-*.whl >>"$LOG" 2>&1 \
  && log "bitsandbytes installed from .whl/" || log "no bitsandbytes wheel in .whl/: no bnb+peft bench rows"
export PYTHONPATH="$PREFIX${PYTHONPATH:+:$PYTHONPATH}"
installed_ok() {  # the installed package imports from $PREFIX with CUDA kernels for sm_90
  (cd / && "$PY" -c "
import sys, qlora_kernels as q, qlora_kernels._C as C
sys.exit(0 if q.__file__.startswith('$PREFIX') and C.has_cuda() and 90 in list(C.cuda_archs()) else 1)" 2>/dev/null)
}
if (( ${#RERUN[@]} )) && installed_ok; then
  log "rerun: using the install in $PREFIX"
else
  rm -rf "$PREFIX"
  export QLORA_KERNELS_CUDA=ON QLORA_KERNELS_CUDA_ARCHS=90 CUDACXX="$NVCC"
  # pip -v: CMake's configure (CUDA found, archs) and nvcc's lines go to build.log; its tail to the main log
  if ! step build "$CAP_build" bash -c "'$PY' -m pip install -v --no-index --no-deps --no-build-isolation \
       --no-cache-dir --target '$PREFIX' -C build-dir=/tmp/qk-build . > '$OUT/build.log' 2>&1; rc=\$?; \
       grep -E 'qlora_kernels: CUDA=|CMAKE_CUDA_COMPILER|error' '$OUT/build.log' | head -20; tail -5 '$OUT/build.log'; exit \$rc"; then
    FAILED=1
    WHEEL=$(ls .whl/qlora_kernels-*.whl 2>/dev/null | head -1)
    [[ -n "$WHEEL" ]] || die 4 "the build failed (see the build log in details.tgz / gpu_check.log) and .whl/ holds no prebuilt qlora_kernels wheel"
    log "FALLBACK: the build failed; installing the prebuilt $WHEEL with this tree's Python files over it"
    rm -rf "$PREFIX"
    "$PY" -m pip install --no-index --no-deps --no-compile --target "$PREFIX" "$WHEEL" >>"$LOG" 2>&1 \
      || die 4 "the build failed and the prebuilt wheel $WHEEL did not install"
    # this tree's Python and Triton code over the wheel's (the wheel may be older than the tree)
    (cd python/qlora_kernels && find . -name '*.py' -exec cp --parents {} "$PREFIX/qlora_kernels/" \;)
    (cd triton_kernels && find . -name '*.py' -exec cp --parents {} "$PREFIX/qlora_kernels/triton_kernels/" \;)
  fi
fi

# ---- 4. assert what the run is for: native CUDA kernels for sm_90, Triton on the GPU, the installed package --
ASSERT=$(cd "$REPO" && timeout "$CAP_assert" "$PY" - "$PREFIX" "$REPO" <<'EOF' 2>&1
import sys
prefix, repo = sys.argv[1], sys.argv[2]
sys.path.insert(1, repo + "/tests")  # pytest's view: the repo root and tests/ on the path, python/ not
import qlora_kernels as qk
info = qk.backend_info()
print("backend_info", info)
missing = []
if not qk.__file__.startswith(prefix):
    missing.append(f"qlora_kernels imported from {qk.__file__}, not from the install in {prefix}")
if not info["native_cuda"]:
    missing.append("native_cuda (the extension has no CUDA kernels or sees no device)")
if 90 not in info["cuda_archs"]:
    missing.append(f"sm_90 in cuda_archs (got {info['cuda_archs']})")
if not info["triton_usable"] or info["triton_interpreter"]:
    missing.append(f"Triton on the GPU (triton {info['triton']}, usable {info['triton_usable']}, interpreter {info['triton_interpreter']})")
try:
    import qlora_kernels.triton_kernels  # noqa: F401
except Exception as exc:
    missing.append(f"qlora_kernels.triton_kernels importable ({type(exc).__name__}: {exc})")
print("MISSING: " + "; ".join(missing) if missing else "ASSERT OK")
sys.exit(1 if missing else 0)
EOF
)
ARC=$?
echo "$ASSERT" | tee -a "$LOG"
(( ARC == 0 )) || die 5 "$(echo "$ASSERT" | grep '^MISSING' || echo "the import check failed (rc $ARC): $(echo "$ASSERT" | tail -3)")"

# ---- 5. GPU tests: one process per group, junit XML each -------------------------------------------------------
export QLORA_TEST_TIMEOUT_S=$TEST_TIMEOUT_S
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts= -q -rs --durations=5)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 6)  # Triton compiles are CPU-bound: 6 workers compile at once
TESTS_END=$(( $(date +%s) + CAP_tests ))  # the groups end within CAP_tests, whatever each one's own cap
group() {  # group NAME CAP PYTEST_ARGS...: cap cut to what is left of CAP_tests (the last group has its own)
  local name=$1 cap=$2; shift 2
  local left=$(( TESTS_END - $(date +%s) ))
  [[ "$name" == oversubscribe ]] || cap=$(( cap < left ? cap : left ))
  if (( cap < 10 )); then log "SKIP tests-$name: CAP_tests spent"; FAILED=1; return 1; fi
  step "tests-$name" "$cap" "${PYTEST[@]}" --junitxml "$OUT/junit-$name.xml" "$@"
}
if (( ${#RERUN[@]} )); then
  group rerun "$GCAP_fused" "${RERUN[@]}"
else
  # the fused-kernel tests first (the longest: Triton compiles), beside the other groups, which run one at a time
  # (test_triton_grouped.py runs its kernels on the GPU when there is one; its static SASS test is not a GPU test)
  group fused "$GCAP_fused" "${XDIST[@]}" tests/test_triton_gpu.py tests/test_decode_cuda_gpu.py \
    tests/test_triton_grouped.py --deselect tests/test_triton_grouped.py::test_grouped_kernels_compile_for_sm80_and_sm90 &
  FUSED_PID=$!
  group native "$GCAP_native" -m gpu tests/test_native.py tests/test_optim.py
  group stress "$GCAP_stress" tests/test_gpu_stress.py -k "not over_free"
  group other "$GCAP_other" -m gpu tests/test_checkpoint.py tests/test_device_placement.py
  wait "$FUSED_PID" || FAILED=1

  # ---- 6. compute-sanitizer ----------------------------------------------------------------------------------
  SAN=(compute-sanitizer --error-exitcode 9 --print-limit 50)
  step memcheck "$CAP_memcheck" "${SAN[@]}" --tool memcheck --log-file "$OUT/sanitize-memcheck.log" \
    "$PY" bench/sanitize_driver.py --part all
  step racecheck "$CAP_racecheck" "${SAN[@]}" --tool racecheck --log-file "$OUT/sanitize-racecheck.log" \
    "$PY" bench/sanitize_driver.py --part native --small
  step synccheck "$CAP_synccheck" "${SAN[@]}" --tool synccheck --log-file "$OUT/sanitize-synccheck.log" \
    "$PY" bench/sanitize_driver.py --part native --small

  # ---- 7. bench (JSON after each case) -------------------------------------------------------------------------
  step bench_linear "$CAP_bench" "$PY" -m bench.bench_linear --out "$OUT" --shapes 4096x4096,14336x4096 \
    --ranks 16 --ms 1,16,4096 --budget-s $(( CAP_bench - 20 ))

  # ---- 8. last: more managed memory than is free (the guard must refuse; never before everything else ran) ---
  group oversubscribe "$CAP_oversubscribe" tests/test_gpu_stress.py -k over_free
fi

# ---- 9. summary ----------------------------------------------------------------------------------------------
log "steps: ${STATUS[*]}"
EXPECT=fused,native,stress,other,oversubscribe
(( ${#RERUN[@]} )) && EXPECT=rerun
timeout "$CAP_summary" "$PY" bench/gpu_summary.py "$OUT" --expect "$EXPECT" > "$OUT/summary.txt" 2>&1 || FAILED=1
cat "$OUT/summary.txt" | tee -a "$LOG"
log "total $(( $(date +%s) - START ))s; exit $FAILED"
# the details in one archive (8 files at most come back)
(cd "$OUT" && ls junit-*.xml sanitize-*.log build.log 2>/dev/null | tar -czf details.tgz --remove-files -T - 2>>"$LOG")
exit "$FAILED"
