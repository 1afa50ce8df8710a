"""What was installed is what runs: a built native extension loads and the package uses it; the Triton kernels
import wherever triton is installed. A missing piece fails here instead of turning other tests into skips."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import qlora_kernels as qk
from build_state import BUILD_INFO, built_native_files, native_or_skip


def test_built_native_extension_is_live():
    C = native_or_skip()
    assert built_native_files(), "_C imports but no build files are installed beside it"
    info = json.loads(BUILD_INFO.read_text())
    assert info["cuda"] == C.has_cuda() and info["version"] == C.build_info()["version"]
    live = qk.backend_info()
    assert live["native_cpu"], "the package fell back to the reference kernels although _C imports"
    assert live["native_cuda_compiled"] == bool(info["cuda"])
    assert live["native_cuda"] == (bool(info["cuda"]) and torch.cuda.is_available())
    assert C.cpu_isa() in C.cpu_isas_supported()


def test_triton_kernels_import_when_triton_is_installed():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the Triton kernels are optional (pip install '.[triton]')")
    import triton

    import qlora_kernels.triton_kernels  # noqa: F401  (an ImportError here is a failure, never a skip)

    assert qk.backend_info()["triton"] == triton.__version__
