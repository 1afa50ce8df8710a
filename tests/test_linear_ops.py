"""The linear ops of the contract (qlora::nf4_linear, qlora::nf4_linear_dx) on the native and reference paths.

The Triton path has its own tests (test_triton_linear.py); these check the dequantize + matmul paths that
run on CPU and that the CUDA dispatcher falls back to.
"""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference as ref

from build_state import native_or_skip


@pytest.fixture(params=["native", "reference"])
def backend(request):
    if request.param == "native":
        native_or_skip()  # a skip only when nothing was built; a built extension that does not import fails
        assert qk.backend_info()["native_cpu"], "_C imports but the package does not use it"
    qk.set_backend(request.param)
    yield request.param
    qk.set_backend(None)


def _problem(m, n, k, r, dtype, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q = qk.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    u = torch.randn(m, r, generator=g).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return q, x, u, b, bias


def _deq64(q):
    p, a, na, off = q.tensors()
    return ref.dequantize_nf4_ref(p, a, na, off, q.numel, q.blocksize, torch.float64).view(q.shape)


def _err_bound(exact, got, plain):
    """Derived tolerance: at most 2x the error plain PyTorch makes in the same dtype, plus a tiny floor."""
    if exact.numel() == 0:
        return got.numel() == 0
    plain_err = (plain.double() - exact).abs().max().item()
    return (got.double() - exact).abs().max().item() <= 2 * plain_err + 1e-6 * exact.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [0, 1, 17])
def test_forward_and_dx_match_float64(m, dtype, backend):
    n, k, r, s = 48, 200, 8, 0.5
    q, x, u, b, bias = _problem(m, n, k, r, dtype)
    args = (*q.tensors(), n, k, q.blocksize)
    y = torch.ops.qlora.nf4_linear(x, *args, u, b, s, bias)
    w64 = _deq64(q)
    exact = x.double() @ w64.t() + s * u.double() @ b.double().t() + bias.double()
    plain = x @ w64.to(dtype).t() + s * (u @ b.t()) + bias
    assert y.dtype == dtype and y.shape == (m, n)
    assert _err_bound(exact, y, plain)

    dy = torch.randn(m, n).to(dtype)
    a = torch.randn(r, k).to(dtype)
    g = torch.randn(m, r).to(dtype)
    dx = torch.ops.qlora.nf4_linear_dx(dy, *args, g, a, s)
    exact = dy.double() @ w64 + s * g.double() @ a.double()
    plain = dy @ w64.to(dtype) + s * (g @ a)
    assert dx.shape == (m, k) and _err_bound(exact, dx, plain)


def test_opcheck_linear_ops(backend):
    n, k, r = 40, 96, 4
    q, x, u, b, bias = _problem(5, n, k, r, torch.float32)
    args = (*q.tensors(), n, k, q.blocksize)
    torch.library.opcheck(torch.ops.qlora.nf4_linear.default, (x, *args, u, b, 2.0, bias))
    torch.library.opcheck(torch.ops.qlora.nf4_linear.default, (x, *args, None, None, 1.0, None))
    dy = torch.randn(5, n)
    torch.library.opcheck(torch.ops.qlora.nf4_linear_dx.default, (dy, *args, torch.randn(5, r), torch.randn(r, k), 2.0))
