"""Shared pytest setup.

Without a CUDA device the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported (`@triton.jit` decides at decoration time): TRITON_INTERPRET=1 is set here when
no GPU is present and the variable is not set already.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
