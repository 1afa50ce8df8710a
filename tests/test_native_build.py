"""How qlora_kernels._C was built: build-info file, no libtorch, and (CUDA builds) SM architectures and
zero register spills in every kernel. Needs no GPU: it reads the ptxas -v log and the fat binary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build_state import native_or_skip

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.cuda_sass_report import cuobjdump as _cuobjdump  # noqa: E402  (one finder for bench and tests)

C = native_or_skip()  # a skip only when nothing was built; a built extension that does not import fails

SO = Path(C.__file__)
INFO = C.build_info()
REQUIRED_ARCHS = {80, 86, 89, 90}
# every __global__ in csrc/nf4_cuda.cu (templates count once)
KERNELS = {
    "quantize_nf4_kernel",
    "dequantize_nf4_kernel",
    "double_quantize_kernel",
    "double_dequantize_kernel",
    "pack_nf4_kernel",
    "unpack_nf4_kernel",
}
needs_cuda_build = pytest.mark.skipif(not INFO["cuda"], reason="_C was built without CUDA (no nvcc, or QLORA_KERNELS_CUDA=OFF)")


def _ptxas_log() -> Path | None:
    for cand in (SO.parent / "_C_ptxas.log", Path(INFO.get("ptxas_log") or "/nonexistent")):
        if cand.is_file():
            return cand
    return None


def test_build_info_file_matches_module():
    path = SO.parent / "_C_build_info.json"
    assert path.is_file(), f"{path} is not installed beside the module"
    data = json.loads(path.read_text())
    assert data["cuda"] == INFO["cuda"] == C.has_cuda()
    assert data["cuda_archs"] == INFO["cuda_archs"] == C.cuda_archs()
    assert data["version"] == INFO["version"]
    assert "-ffp-contract=off" in data["cxx_flags"], "host code must not contract float ops into FMAs"
    if data["cuda"]:
        assert data["nvcc_version"], "nvcc version missing"
        assert "--fmad=false" in data["cuda_flags"]


def test_does_not_link_libtorch():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    out = subprocess.run([readelf, "-d", str(SO)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, out
    for lib in needed:
        assert not re.match(r"lib(torch|c10|cudart)\b", lib), f"_C must not depend on {lib} (needed: {needed})"


@needs_cuda_build
def test_arch_list():
    assert REQUIRED_ARCHS <= set(C.cuda_archs())
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton package provide it)")
    elf = subprocess.run([tool, "--list-elf", str(SO)], capture_output=True, text=True, check=True).stdout
    sms = {int(m) for m in re.findall(r"\.sm_(\d+)\.cubin", elf)}
    assert REQUIRED_ARCHS <= sms, f"cubins for {sorted(sms)}; need {sorted(REQUIRED_ARCHS)}\n{elf}"
    ptx = subprocess.run([tool, "--list-ptx", str(SO)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"sm_90\.ptx", ptx), f"expected compute_90 PTX for newer GPUs to JIT:\n{ptx}"


def _parse_ptxas(log: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(kernel, sm) -> (stack frame, spill stores, spill loads) from nvcc -Xptxas=-v output."""
    out = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            out[current] = tuple(int(x) for x in m.groups())
            current = None
    return out


def _kernel_of(mangled: str) -> str:
    for k in KERNELS:
        if re.search(rf"\d{k}", mangled):  # itanium mangling: <length><name>
            return k
    return mangled


@needs_cuda_build
def test_no_register_spills_ptxas_log():
    log = _ptxas_log()
    if log is None:
        pytest.skip("ptxas log not found (an install from a wheel built elsewhere does not ship it)")
    entries = _parse_ptxas(log.read_text())
    assert entries, f"no ptxas -v entries in {log}"
    spills = {k: v for k, v in entries.items() if v[1] or v[2]}
    assert not spills, f"register spills (stack, stores, loads): {spills}"
    seen = {(_kernel_of(name), sm) for name, sm in entries}
    for sm in (f"sm_{a}" for a in REQUIRED_ARCHS):
        missing = {k for k in KERNELS if (k, sm) not in seen}
        assert not missing, f"{sm}: no ptxas entry for {missing}"


@needs_cuda_build
def test_no_local_memory_cuobjdump():
    """Second source: the resource usage recorded in the fat binary (LOCAL = spills + local arrays)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    out = subprocess.run([tool, "--dump-resource-usage", str(SO)], capture_output=True, text=True, check=True).stdout
    functions = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert functions, out[:2000]
    assert {_kernel_of(f) for f, *_ in functions} >= KERNELS
    bad = [(f, r, s, l) for f, r, s, l in functions if int(s) or int(l)]
    assert not bad, f"kernels using stack/local memory: {bad}"


@pytest.mark.slow
def test_cpu_only_build_configures_and_compiles(tmp_path):
    """QLORA_KERNELS_CUDA=OFF builds the CPU kernels and the *_cuda stubs (what a machine without nvcc gets)."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake and ninja are needed")
    root = Path(__file__).resolve().parents[1]
    if not (root / "CMakeLists.txt").is_file():
        pytest.skip("source tree not available")
    env = dict(os.environ, QLORA_KERNELS_CUDA="OFF")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(root), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython_EXECUTABLE={sys.executable}"], env=env, check=True, capture_output=True)  # fmt: skip
    subprocess.run([cmake, "--build", str(build)], env=env, check=True, capture_output=True)
    info = json.loads((build / "_C_build_info.json").read_text())
    assert info["cuda"] is False and info["cuda_archs"] == []
    so = next(build.glob("_C*.so"))
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "assert not m.has_cuda() and m.cuda_archs() == [];\n"
        "try:\n    m.pack_nf4_cuda(0, 0, 4, 0)\nexcept RuntimeError as e:\n    assert 'without CUDA' in str(e)\n"
        "else:\n    raise SystemExit('no error')"
    )
    subprocess.run([sys.executable, "-c", code, str(so)], check=True)
