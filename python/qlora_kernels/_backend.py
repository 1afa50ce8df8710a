"""Which implementation runs an op: the native extension, the Triton kernels, or the PyTorch reference.

`QLORA_KERNELS_BACKEND=auto|native|triton|reference` (or `set_backend`) forces one path on every device;
`auto` (the default) takes the fastest path that is live on the tensor's device.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("auto", "native", "triton", "reference")
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for every op ("auto", "native", "triton", "reference"); None returns to the env var."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _forced = name


def get_backend() -> str:
    name = _forced if _forced is not None else os.environ.get("QLORA_KERNELS_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"QLORA_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@lru_cache(maxsize=None)
def native_module():
    """The compiled `qlora_kernels._C`, or None (the reference backend then takes over, said once)."""
    try:
        return importlib.import_module("qlora_kernels._C")
    except ImportError as exc:
        warnings.warn(
            f"qlora_kernels: native extension _C not available ({exc}); using the PyTorch reference kernels",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def native_available(device: torch.device) -> bool:
    mod = native_module()
    if mod is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(mod.has_cuda())
    return False


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_native(device: torch.device) -> bool:
    """For the quantization ops: native kernels unless the reference is forced or _C is missing."""
    return get_backend() != "reference" and native_available(device)


def linear_path(device: torch.device) -> str:
    """For the linear ops: "triton", "native" (dequantize + matmul) or "reference".

    auto: CUDA with Triton -> "triton" (its dispatcher may still pick dequantize + cuBLAS per shape);
    otherwise native when _C is live, else the reference. A forced "triton" off-GPU needs TRITON_INTERPRET=1.
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("QLORA_KERNELS_BACKEND=triton but triton is not installed (pip install triton)")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                "QLORA_KERNELS_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return "triton"
    if name == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    return "native" if native_available(device) else "reference"


def backend_info() -> dict:
    """What is compiled and what is usable on this machine, and versions.

    native_cpu: the native CPU kernels load; cpu_isa: the SIMD path they run ("avx512", "avx2" or "scalar"),
    cpu_isas_supported: the paths this CPU can run. native_cuda_compiled: _C holds CUDA kernels (cuda_archs);
    native_cuda: they are compiled AND a CUDA device is visible, so CUDA tensors use them. triton: the
    installed version (None without it); triton_usable: a CUDA device or the interpreter can run its kernels.
    """
    mod = native_module()
    cuda_visible = torch.cuda.is_available()
    compiled_cuda = bool(mod is not None and mod.has_cuda())
    info = {
        "backend": get_backend(),
        "torch": torch.__version__,
        "native_cpu": mod is not None,
        "cpu_isa": mod.cpu_isa() if mod is not None else None,
        "cpu_isas_supported": list(mod.cpu_isas_supported()) if mod is not None else [],
        "native_cuda_compiled": compiled_cuda,
        "native_cuda": compiled_cuda and cuda_visible,
        "cuda_archs": list(mod.cuda_archs()) if mod is not None else [],
        "cuda_device": torch.cuda.get_device_name() if cuda_visible else None,
        "triton": None,
        "triton_usable": triton_available() and (cuda_visible or triton_interpreting()),
        "triton_interpreter": triton_interpreting(),
        "reference": True,
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    try:
        from importlib.metadata import version

        info["qlora_kernels"] = version("qlora-kernels")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        info["qlora_kernels"] = None
    return info
