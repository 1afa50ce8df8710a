#!/usr/bin/env bash
# Prepares .whl/ (git-ignored) for bench/gpu_check.sh on the GPU image, which has no network and no bitsandbytes:
#   1. bitsandbytes 0.50.2 trimmed to its CPU and CUDA 13.0 libraries (the image's torch is built for CUDA 13.0;
#      the whole wheel is 43 MB compressed, over what a device call carries beside the tree);
#   2. a prebuilt qlora_kernels wheel with the CUDA kernels for sm_90 only, for the image's Python (3.12), built
#      here with nvcc in a build folder under /tmp (never the tree's build/, which the editable install uses).
#      gpu_check.sh installs it only when its own build fails.
# Usage: bash bench/prepare_gpu_wheels.sh   (PYTHON312=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DEST="$REPO/.whl"
WORK="$(mktemp -d /tmp/qk-wheels.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST"
PIP_PY="${PYTHON:-python3}"   # any Python with pip: downloads only
PY312="${PYTHON312:-$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || command -v python3.12 || true)}"
IMAGE_PY=3.12                 # /work/.library/device/KINDS.md: python3 there is 3.12.3

# ---- 1. bitsandbytes, trimmed ---------------------------------------------------------------------------------
rm -f "$DEST"/bitsandbytes-*.whl
"$PIP_PY" -m pip download --no-deps --only-binary=:all: --python-version "$IMAGE_PY" --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$WORK/dl" bitsandbytes==0.50.2
"$PIP_PY" - "$WORK/dl" "$DEST" <<'EOF'
# Rewrite the wheel without the libraries of other CUDA / ROCm / XPU versions; RECORD rewritten to match
# (pip checks the hashes of what it installs).
import base64, hashlib, sys, zipfile
from pathlib import Path
src = next(Path(sys.argv[1]).glob("bitsandbytes-*.whl"))
dst = Path(sys.argv[2]) / src.name
keep_lib = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name, lines = None, []
    for info in zin.infolist():
        name = info.filename
        if name.endswith(".dist-info/RECORD"):
            record_name = name
            continue
        if "/libbitsandbytes_" in name and not name.endswith(keep_lib):
            continue
        data = zin.read(name)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(lines) + "\n")
print(f"{dst.name}: {dst.stat().st_size / 2**20:.1f} MiB (from {src.stat().st_size / 2**20:.1f} MiB)")
EOF

# ---- 2. qlora_kernels for sm_90, Python 3.12 ------------------------------------------------------------------
rm -f "$DEST"/qlora_kernels-*.whl
if [[ -z "$PY312" ]]; then
  echo "no python3.12 here: the prebuilt qlora_kernels wheel (fallback of gpu_check.sh's build) is NOT made" >&2
  exit 1
fi
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
QLORA_KERNELS_CUDA=ON QLORA_KERNELS_CUDA_ARCHS=90 CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" \
  "$WORK/venv/bin/python" -m pip wheel --no-deps --no-build-isolation -v -w "$DEST" \
  -C build-dir=/tmp/qk-prebuilt-sm90 . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
grep -E "qlora_kernels: CUDA=" "$WORK/build.log" || true
WHL=$(ls "$DEST"/qlora_kernels-*.whl)
# the wheel must hold CUDA kernels for sm_90 (its build info says which archs)
unzip -p "$WHL" 'qlora_kernels/_C_build_info.json' 2>/dev/null | "$PIP_PY" -c "
import json, sys
info = json.load(sys.stdin)
print('build info:', info)
archs = info.get('cuda_archs') or []
sys.exit(0 if 90 in archs else 'the prebuilt wheel has no sm_90 kernels')"
ls -la "$DEST"
du -sh "$DEST"
