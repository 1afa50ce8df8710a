"""Shared pytest setup.

Without a CUDA device the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported (`@triton.jit` decides at decoration time): TRITON_INTERPRET=1 is set here when
no GPU is present and the variable is not set already.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.qk_cpu_paths = {"ran": set(), "skipped": {}}  # filled by test_native.py's `isa` fixture


@pytest.fixture(params=["auto", "threads"])
def pool(request):
    """Runs the test on both CPU thread pools of the native kernels (csrc/cpu_threads.h): torch's OpenMP
    runtime where it is loaded, and std::thread."""
    from qlora_kernels._backend import native_module

    mod = native_module()
    if mod is None:
        pytest.skip("qlora_kernels._C is not built")
    got = mod.set_cpu_thread_pool(request.param)
    yield got
    mod.set_cpu_thread_pool("auto")


def pytest_terminal_summary(terminalreporter, config):
    """Say which CPU SIMD paths of the native kernels the run exercised, and why the others did not run."""
    paths = getattr(config, "qk_cpu_paths", None)
    if not paths or not (paths["ran"] or paths["skipped"]):
        return
    try:
        import qlora_kernels._C as C

        terminalreporter.write_line(f"qlora_kernels CPU SIMD path of every other test (auto on this CPU): {C.cpu_isa()}")
    except ImportError:
        pass
    order = ("avx512", "avx2", "scalar")
    ran = [p for p in order if p in paths["ran"]]
    terminalreporter.write_line(f"qlora_kernels CPU SIMD paths tested: {', '.join(ran) or 'none'}")
    for isa, reason in paths["skipped"].items():
        terminalreporter.write_line(f"qlora_kernels CPU SIMD path NOT tested: {isa}: {reason}")
