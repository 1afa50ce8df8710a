"""Shared pytest setup.

Without a CUDA device the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported (`@triton.jit` decides at decoration time): TRITON_INTERPRET=1 is set here when
no GPU is present and the variable is not set already.
"""

import faulthandler
import os
import signal
import threading

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _release(name: str) -> tuple:
    import re
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(v) for v in re.findall(r"\d+", version(name))[:2])
    except PackageNotFoundError:
        return ()


def _fix_triton_interpreter_for_numpy_2_4() -> None:
    """Compatibility patch, tests only, for triton < 3.8 (the GPU image's torch 2.11 pins 3.6.0) with
    numpy >= 2.4: the interpreter holds every scalar as a shape-(1,) array and its `tl.tensor.__index__` is
    `int(self.handle.data)` (triton/runtime/interpreter.py:888 in 3.6.0), which numpy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"), so any `range(0, N, BLOCK)` over a kernel
    argument fails. Triton 3.8 reads `int(self.handle.data.squeeze())`; this installs the same after the
    interpreter's own patching of tl.tensor (it applies and undoes it around every launch)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not () < _release("triton") < (3, 8) or _release("numpy") < (2, 4):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


_fix_triton_interpreter_for_numpy_2_4()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.qk_cpu_paths = {"ran": set(), "skipped": {}}  # filled by test_native.py's `isa` fixture


# QLORA_TEST_TIMEOUT_S=N (bench/gpu_check.sh sets it; pytest-timeout need not be installed): a test whose setup,
# call and teardown take over N s fails with TimeoutError, so one hung test cannot take its whole group. A test
# stuck in native code never returns to Python to see the alarm: 30 s later faulthandler prints every thread's
# stack and ends the process (the remaining groups of gpu_check.sh still run: one process per group).
_TEST_TIMEOUT_S = float(os.environ.get("QLORA_TEST_TIMEOUT_S", "0") or 0)


def _on_alarm(signum, frame):
    raise TimeoutError(f"test exceeded QLORA_TEST_TIMEOUT_S={_TEST_TIMEOUT_S:g} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    armed = (_TEST_TIMEOUT_S > 0 and hasattr(signal, "SIGALRM")
             and threading.current_thread() is threading.main_thread())
    if armed:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, _TEST_TIMEOUT_S)
        faulthandler.dump_traceback_later(_TEST_TIMEOUT_S + 30, exit=True)
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
            signal.signal(signal.SIGALRM, previous)


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
