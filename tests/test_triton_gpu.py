"""Triton linear kernels on a real GPU: bf16 at realistic shapes, with the real heuristic table.

Skipped without CUDA. Reference: W dequantized with reference.dequantize_nf4_ref to float64 and matmuls in
float64; tolerance derived as in test_triton_linear.py (kernel RMS error <= 2x cuBLAS's in bf16, max error
<= 4x). Output buffers are poisoned with NaN before each launch, so an element a kernel fails to write
shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference as ref

from accuracy import assert_close_derived

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

S = 2.0
# N, K, r, blocksize, double quant: Llama-like projections, and an odd one (K % 64 != 0, odd K, no DQ)
# (each distinct layout x M bucket is a Triton compile of a few seconds: the lists are kept short)
WEIGHTS = [(4096, 4096, 16, 64, True), (3000, 2050, 128, 64, False), (1000, 1001, 8, 32, True)]
MS = [1, 16, 17, 512, 2048]


@pytest.fixture(scope="module", params=WEIGHTS, ids=lambda w: f"N{w[0]}-K{w[1]}-r{w[2]}-bs{w[3]}{'-dq' if w[4] else ''}")
def layer(request):
    import qlora_kernels.triton_kernels  # noqa: F401  (fails loudly if the kernels do not import)

    N, K, r, bs, dq = request.param
    g = torch.Generator(device="cpu").manual_seed(N + K)
    w = (torch.randn(N, K, generator=g) * 0.02).cuda().to(torch.bfloat16)
    W = qk.quantize_nf4(w, blocksize=bs, double_quant=dq)
    p, a, n, o = W.tensors()
    w64 = ref.dequantize_nf4_ref(p, a, n, o, N * K, bs, torch.float64).view(N, K)
    wbf = ref.dequantize_nf4_ref(p, a, n, o, N * K, bs, torch.bfloat16).view(N, K)
    B = (torch.randn(N, r, generator=g) * 0.05).cuda().to(torch.bfloat16)
    A = (torch.randn(r, K, generator=g) / K**0.5).cuda().to(torch.bfloat16)
    bias = torch.randn(N, generator=g).cuda().to(torch.bfloat16)
    return dict(W=W, w64=w64, wbf=wbf, A=A, B=B, bias=bias, args=(p, a, n, o, N, K, bs), N=N, K=K, r=r)


def poisoned(*shape):
    return torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("M", MS)
def test_forward_bf16(layer, M):
    from qlora_kernels.triton_kernels import nf4_decode, nf4_linear

    L = layer
    g = torch.Generator(device="cpu").manual_seed(M)
    x = torch.randn(M, L["K"] + 8, generator=g).cuda().to(torch.bfloat16)[:, 4 : 4 + L["K"]]  # strided rows
    U = (torch.randn(M, L["r"], generator=g)).cuda().to(torch.bfloat16)
    exact = x.double() @ L["w64"].t() + S * U.double() @ L["B"].double().t() + L["bias"].double()
    plain = torch.addmm(L["bias"], x, L["wbf"].t()).addmm_(U, L["B"].t(), alpha=S)
    out = nf4_linear(x, *L["args"], U, L["B"], S, L["bias"], out=poisoned(M, L["N"]))
    assert_close_derived(out, exact, plain, "fused")
    if M <= 16:
        out = nf4_decode(x, *L["args"], U, L["B"], S, L["bias"], out=poisoned(M, L["N"]))
        assert_close_derived(out, exact, plain, "decode")
        from qlora_kernels.triton_kernels import LaunchConfig

        cfg = LaunchConfig(16, 16, 64, 1, 4, 3, split_k=4)  # forced split-K (partials + reduce), deterministic
        o1 = nf4_decode(x, *L["args"], U, L["B"], S, L["bias"], config=cfg, out=poisoned(M, L["N"]))
        o2 = nf4_decode(x, *L["args"], U, L["B"], S, L["bias"], config=cfg)
        assert_close_derived(o1, exact, plain, "decode split 4")
        assert torch.equal(o1, o2)
    qk.set_backend("triton")
    try:
        assert_close_derived(torch.ops.qlora.nf4_linear(x, *L["args"], U, L["B"], S, L["bias"]), exact, plain, "op (dispatched)")
    finally:
        qk.set_backend(None)


@pytest.mark.parametrize("M", MS)
def test_dx_bf16(layer, M):
    from qlora_kernels.triton_kernels import nf4_linear_dx

    L = layer
    g = torch.Generator(device="cpu").manual_seed(100 + M)
    dy = torch.randn(M, L["N"], generator=g).cuda().to(torch.bfloat16)
    G = torch.randn(M, L["r"], generator=g).cuda().to(torch.bfloat16)
    exact = dy.double() @ L["w64"] + S * G.double() @ L["A"].double()
    plain = (dy @ L["wbf"]).addmm_(G, L["A"], alpha=S)
    assert_close_derived(nf4_linear_dx(dy, *L["args"], G, L["A"], S, out=poisoned(M, L["K"])), exact, plain, "dx")
    qk.set_backend("triton")
    try:
        assert_close_derived(torch.ops.qlora.nf4_linear_dx(dy, *L["args"], G, L["A"], S), exact, plain, "dx op (dispatched)")
    finally:
        qk.set_backend(None)


def test_dequant_plan_and_graph_capture(layer):
    """The dispatcher's dequant + cuBLAS branch, and a decode call captured in a CUDA graph (as the bench does)."""
    from qlora_kernels.triton_kernels import dispatch, nf4_decode

    L = layer
    x = torch.randn(3000, L["K"], device="cuda", dtype=torch.bfloat16)
    exact = x.double() @ L["w64"].t() + L["bias"].double()
    plain = torch.addmm(L["bias"], x, L["wbf"].t())
    dispatch.set_plan_override("dequant")
    qk.set_backend("triton")
    try:
        assert_close_derived(torch.ops.qlora.nf4_linear(x, *L["args"], None, None, S, L["bias"]), exact, plain, "dequant plan")
    finally:
        dispatch.set_plan_override(None)
        qk.set_backend(None)
    xs = x[:4].contiguous()
    out = poisoned(4, L["N"])
    nf4_decode(xs, *L["args"], None, None, S, L["bias"], out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        nf4_decode(xs, *L["args"], None, None, S, L["bias"], out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_derived(out, exact[:4], plain[:4], "decode in a CUDA graph")


def test_empty_and_single_row():
    from qlora_kernels.triton_kernels import nf4_linear, nf4_linear_dx

    W = qk.quantize_nf4(torch.randn(64, 96, device="cuda"), blocksize=64)
    args = (*W.tensors(), 64, 96, 64)
    assert nf4_linear(torch.empty(0, 96, device="cuda", dtype=torch.bfloat16), *args).shape == (0, 64)
    assert nf4_linear_dx(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16), *args).shape == (0, 96)


# ------------------------------------------------------------------ register lookup: bit-exact on the device
def _assert_kernels_reproduce_w(args, want, eye_k, eye_n):
    """Forward, dx and decode on identity activations return W (or W^T) bit for bit."""
    from qlora_kernels.triton_kernels import nf4_decode, nf4_linear, nf4_linear_dx

    torch.testing.assert_close(nf4_linear(eye_k, *args), want.t(), rtol=0, atol=0)
    torch.testing.assert_close(nf4_linear_dx(eye_n, *args), want, rtol=0, atol=0)
    torch.testing.assert_close(nf4_decode(eye_k[:16], *args), want.t()[:16], rtol=0, atol=0)
    # M not a multiple of the tile (masked activation loads; EVEN_M off) and a single decode row
    torch.testing.assert_close(nf4_linear(eye_k[:500], *args), want.t()[:500], rtol=0, atol=0)
    torch.testing.assert_close(nf4_linear_dx(eye_n[:250], *args), want[:250], rtol=0, atol=0)
    torch.testing.assert_close(nf4_decode(eye_k[77:78], *args), want.t()[77:78], rtol=0, atol=0)


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_register_lookup_bit_exact(dq, dtype):
    """The aligned fast path (PRMT lookup of per-row product tables) reproduces the reference dequantization
    bit for bit: multiplying by identity matrices returns W itself (fp32 accumulation of one exact product).
    The weight has every code, a zero block, and the largest and smallest scales of the dtype."""
    N, K, bs = 256, 512, 64
    g = torch.Generator(device="cpu").manual_seed(3)
    w = torch.randn(N, K, generator=g)
    w[0, :bs] = 0.0  # a zero block
    big = 6e4 if dtype == torch.float16 else 1e36
    w[1, :bs] *= big / w[1, :bs].abs().max()  # largest scale
    w[2, :bs] *= 1e-6 if dtype == torch.float16 else 1e-36  # smallest scale (subnormal products)
    w[3, :16] = torch.linspace(-1, 1, 16)  # every code in one block
    W = qk.quantize_nf4(w.cuda().to(torch.float32), blocksize=bs, double_quant=dq)
    p, a, n, o = W.tensors()
    want = ref.dequantize_nf4_ref(p, a, n, o, N * K, bs, dtype).view(N, K)
    args = (p, a, n, o, N, K, bs)
    eye_k, eye_n = torch.eye(K, dtype=dtype, device="cuda"), torch.eye(N, dtype=dtype, device="cuda")
    _assert_kernels_reproduce_w(args, want, eye_k, eye_n)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_weights_device():
    """Weights and activations on cuda:1 while cuda:0 is current (device_map="auto" placement)."""
    N, K, bs = 256, 512, 64
    dev = torch.device("cuda:1")
    w = torch.randn(N, K, generator=torch.Generator(device="cpu").manual_seed(4))
    W = qk.quantize_nf4(w.to(dev), blocksize=bs, double_quant=True)
    p, a, n, o = W.tensors()
    want = ref.dequantize_nf4_ref(p, a, n, o, N * K, bs, torch.bfloat16).view(N, K)
    args = (p, a, n, o, N, K, bs)
    torch.cuda.set_device(0)
    eye_k, eye_n = torch.eye(K, dtype=torch.bfloat16, device=dev), torch.eye(N, dtype=torch.bfloat16, device=dev)
    _assert_kernels_reproduce_w(args, want, eye_k, eye_n)
