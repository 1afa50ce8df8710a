"""The CUDA decode GEMM (csrc/nf4_decode_cuda.cu, M <= 16) on a real GPU. Skipped without CUDA or without a
native CUDA build.

Reference: W dequantized by reference.dequantize_nf4_ref in float64, matmul in float64; the tolerance is the one
of test_triton_gpu.py (RMS error <= 2x a plain torch matmul in the same dtype, max error <= 4x). The dequantized
values themselves are checked bit for bit: x = one-hot rows picks W's columns out exactly (one product 1 * w in
fp32, every other term 0, then one rounding of a value that is already of the output type).
"""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _ops
from qlora_kernels import reference as ref

from accuracy import assert_close_derived

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def _native_cuda():
    mod = _ops.native_module()
    if mod is None or not mod.has_cuda():
        pytest.skip("qlora_kernels._C was built without CUDA")


# N, K, blocksize, double quant (N = 1000: ragged, not a multiple of 16; K = 1280: 5 tiles of 256)
WEIGHTS = [(4096, 4096, 64, True), (4096, 4096, 64, False), (1000, 1280, 128, True), (2048, 8192, 64, True)]


def _weight(N, K, bs, dq, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(N * 7 + K + bs + dq)
    w = (torch.randn(N, K, generator=g) * 0.02).to(device)
    W = qk.quantize_nf4(w, blocksize=bs, double_quant=dq)
    p, a, n, o = W.tensors()
    w64 = ref.dequantize_nf4_ref(p, a, n, o, N * K, bs, torch.float64).view(N, K)
    return (p, a, n, o), w64, g


@pytest.mark.parametrize("w", WEIGHTS, ids=lambda w: f"N{w[0]}-K{w[1]}-bs{w[2]}{'-dq' if w[3] else ''}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
def test_decode_cuda_matches_reference(w, dtype, M):
    N, K, bs, dq = w
    (p, a, n, o), w64, g = _weight(N, K, bs, dq)
    x = torch.randn(M, K, generator=g).to("cuda", dtype)
    r = 16
    U = (torch.randn(M, r, generator=g) * 0.1).to("cuda", dtype)
    B = (torch.randn(N, r, generator=g) * 0.05).to("cuda", dtype)
    bias = torch.randn(N, generator=g).to("cuda", dtype)
    base_exact, base_plain = x.double() @ w64.t(), x @ w64.t().to(dtype)
    for lora, with_bias in ((False, False), (True, True), (True, False), (False, True)):
        exact, plain = base_exact, base_plain
        if lora:
            exact = exact + 0.5 * (U.double() @ B.double().t())
            plain = plain + 0.5 * (U @ B.t())
        if with_bias:
            exact, plain = exact + bias.double(), plain + bias
        for split, in_kernel in ((None, True), (1, True), (2, True), (2, False), (max(1, K // 1024), True),
                                 (max(1, K // 1024), False)):
            y = _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs, U if lora else None, B if lora else None, 0.5,
                                     bias if with_bias else None, split=split, reduce_in_kernel=in_kernel)
            assert y is not None, "the CUDA decode did not take a supported shape"
            assert_close_derived(y, exact, plain, f"M={M} lora={lora} bias={with_bias} split={split} in_kernel={in_kernel}")
            if split == 2:  # deterministic: the two reductions sum the same slices in the same order
                y2 = _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs, U if lora else None, B if lora else None, 0.5,
                                          bias if with_bias else None, split=split, reduce_in_kernel=not in_kernel)
                assert torch.equal(y, y2)


@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_cuda_dequantized_values_bit_exact(dtype, dq):
    N, K, bs = 1000, 1024, 64
    (p, a, n, o), _, _ = _weight(N, K, bs, dq)
    wdt = ref.dequantize_nf4_ref(p, a, n, o, N * K, bs, dtype).view(N, K)
    for split, in_kernel in ((1, True), (4, True), (4, False)):
        for start in range(0, K, 16):  # 16 one-hot rows per call: every k position of every lane and step
            ks = torch.arange(start, start + 16)
            x = torch.zeros(16, K, dtype=dtype)
            x[torch.arange(16), ks] = 1
            y = _ops.nf4_decode_cuda(x.cuda(), p, a, n, o, N, K, bs, split=split, reduce_in_kernel=in_kernel)
            assert y is not None
            assert torch.equal(y, wdt[:, ks.cuda()].t()), f"k {start}..{start + 15} split {split}"


def test_decode_cuda_declines_unsupported_shapes():
    (p, a, n, o), _, g = _weight(256, 1024, 64, True)
    x = torch.randn(4, 1024, generator=g).cuda()
    assert _ops.nf4_decode_cuda(x, p, a, n, o, 256, 1024, 64) is None  # fp32 x: the Triton path
    assert _ops.nf4_decode_cuda(torch.randn(17, 1024).cuda().half(), p, a, n, o, 256, 1024, 64) is None  # M > 16
    (p2, a2, n2, o2), _, _ = _weight(64, 1000, 64, True)  # K % 256 != 0
    assert _ops.nf4_decode_cuda(torch.randn(2, 1000).cuda().half(), p2, a2, n2, o2, 64, 1000, 64) is None
    with pytest.raises(ValueError, match="split"):
        _ops.nf4_decode_cuda(x.half(), p, a, n, o, 256, 1024, 64, split=5)  # 4 tiles of 256
    with pytest.raises(ValueError, match="features"):
        _ops.nf4_decode_cuda(torch.randn(2, 512).cuda().half(), p, a, n, o, 256, 1024, 64)


def test_nf4_linear_op_runs_the_cuda_decode():
    """torch.ops.qlora.nf4_linear with M <= 16 on CUDA returns exactly the CUDA decode's result (deterministic)."""
    N, K, bs = 4096, 4096, 64
    (p, a, n, o), _, g = _weight(N, K, bs, True)
    x = torch.randn(5, K, generator=g).cuda().bfloat16()
    want = _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs)
    got = torch.ops.qlora.nf4_linear(x, p, a, n, o, N, K, bs, None, None, 1.0, None)
    assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_decode_cuda_on_second_device():
    (p, a, n, o), w64, g = _weight(1024, 2048, 64, True, device="cuda:1")
    x = torch.randn(4, 2048, generator=g).to("cuda:1", torch.bfloat16)
    with torch.cuda.device(0):
        y = _ops.nf4_decode_cuda(x, p, a, n, o, 1024, 2048, 64)
    assert y is not None and y.device == x.device
    assert_close_derived(y, x.double() @ w64.t(), x @ w64.t().to(torch.bfloat16), "cuda:1")


def test_decode_cuda_graph_capture():
    N, K, bs = 2048, 4096, 64
    (p, a, n, o), _, g = _weight(N, K, bs, True)
    x = torch.randn(16, K, generator=g).cuda().bfloat16()
    want = _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs)  # also creates the device tables before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs)
    x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs))
    assert not torch.equal(y, want)
    graph.replay()  # the counters were reset by the last replay: a second replay gives the same result
    torch.cuda.synchronize()
    assert torch.equal(y, _ops.nf4_decode_cuda(x, p, a, n, o, N, K, bs))
