"""What the other GPU tests do not reach: the CUDA decode's split-K last-CTA reduction under stress (many launches,
changing N, CUDA graph replays interleaved with eager calls), kernels on a side stream, more than 2^31 elements,
a misaligned `packed` view on the Triton fast path, fp32 activations through Triton, and (run last by
bench/gpu_check.sh) a paged state larger than the GPU's free memory, which the managed-memory guard must refuse.

GPU tests are marked `gpu` and skip without CUDA; the misaligned-view and guard-helper tests also run on the CPU
(Triton's interpreter). References: the split-K in-kernel reduction against the same slices summed by the second
kernel (bit for bit: both sum the slices in slice order); side-stream results against the default stream's (bit
for bit: same kernels, same inputs); dequantized values against reference.dequantize_nf4_ref (bit for bit); fp32
Triton against float64 with the derived tolerance (tests/accuracy.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _checks, _ops
from qlora_kernels import reference as ref

from accuracy import assert_close_derived

CUDA = torch.cuda.is_available()


def _native_cuda():
    mod = _ops.native_module()
    if mod is None or not mod.has_cuda():
        pytest.fail("qlora_kernels._C has no CUDA kernels on a CUDA machine (build with QLORA_KERNELS_CUDA=ON)")


def _weight(N, K, bs=64, dq=True, device="cuda", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed + N * 7 + K)
    W = qk.quantize_nf4((torch.randn(N, K, generator=g) * 0.02).to(device), blocksize=bs, double_quant=dq)
    return W.tensors(), g


def _decode(x, w, N, K, split, in_kernel=True):
    p, a, n, o = w
    y = _ops.nf4_decode_cuda(x, p, a, n, o, N, K, 64, split=split, reduce_in_kernel=in_kernel)
    assert y is not None, f"the CUDA decode declined M={x.shape[0]} N={N} K={K}"
    return y


# ---------------------------------------------------------------------------------------------- split-K stress
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_k_last_cta_many_launches_changing_n(dtype):
    """300 launches cycling N (ragged 1000 and 272 included: row groups of 16 with a partial last one) and the
    split; every result equals the two-kernel reduction. A counter the last CTA failed to reset would make a
    later launch's last CTA never fire (stale output) or fire early (partial sums)."""
    _native_cuda()
    K = 2048
    shapes = [4096, 1000, 2048, 272]
    weights = {N: _weight(N, K)[0] for N in shapes}
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = {M: torch.randn(M, K, generator=g).to("cuda", dtype) for M in (1, 5, 16)}
    want = {(N, M, s): _decode(xs[M], weights[N], N, K, s, in_kernel=False)
            for N in shapes for M in xs for s in (2, 4, 8)}
    bad = []
    for i in range(300):
        N, M, s = shapes[i % 4], (1, 5, 16)[i % 3], (2, 4, 8)[i % 5 % 3]
        y = _decode(xs[M], weights[N], N, K, s)
        if not torch.equal(y, want[(N, M, s)]):
            bad.append((i, N, M, s))
    torch.cuda.synchronize()
    assert not bad, f"{len(bad)} of 300 launches differ from the two-kernel reduction, first: {bad[:5]}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_split_k_graph_replays_interleaved_with_eager_calls():
    """A captured split-K decode (its counters belong to the graph) replayed between eager calls of other N on the
    same stream (the per-stream cached counters): each replay and each eager call stays exact."""
    _native_cuda()
    K = 4096
    w_g, g = _weight(1000, K)
    w_e, _ = _weight(4096, K, seed=3)
    x_static = torch.randn(4, K, generator=g).cuda().bfloat16()
    x_eager = torch.randn(3, K, generator=g).cuda().bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture stream, as torch's graph docs ask
        _decode(x_static, w_g, 1000, K, 4)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = _decode(x_static, w_g, 1000, K, 4)
    inputs = [torch.randn(4, K, generator=g).cuda().bfloat16() for _ in range(5)]
    want_g = [_decode(x, w_g, 1000, K, 4, in_kernel=False) for x in inputs]
    want_e = _decode(x_eager, w_e, 4096, K, 8, in_kernel=False)
    for rep in range(40):
        x_static.copy_(inputs[rep % 5])
        graph.replay()
        eager = _decode(x_eager, w_e, 4096, K, 8)
        assert torch.equal(y_static, want_g[rep % 5]), f"replay {rep}"
        assert torch.equal(eager, want_e), f"eager call after replay {rep}"


# ---------------------------------------------------------------------------------------------- side stream
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_kernels_on_a_side_stream():
    """Dequantize, the CUDA decode (split-K, its own counters per stream), the Triton linear and dx, launched on
    a side stream while the default stream runs the same calls: results equal the default stream's."""
    _native_cuda()
    from qlora_kernels.triton_kernels import nf4_linear, nf4_linear_dx

    N, K = 2048, 4096
    (p, a, n, o), g = _weight(N, K)
    x1 = torch.randn(8, K, generator=g).cuda().bfloat16()
    x64 = torch.randn(64, K, generator=g).cuda().bfloat16()
    dy = torch.randn(64, N, generator=g).cuda().bfloat16()

    def run():
        return (_ops.dequantize_nf4(p, a, n, o, N * K, 64, torch.bfloat16),
                _decode(x1, (p, a, n, o), N, K, 8),
                nf4_linear(x64, p, a, n, o, N, K, 64),
                nf4_linear_dx(dy, p, a, n, o, N, K, 64))

    want = run()
    side = torch.cuda.Stream()
    for _ in range(3):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = run()
        again = run()  # the default stream at the same time
        torch.cuda.current_stream().wait_stream(side)
        for name, w, s_, d in zip(("dequantize", "decode", "linear", "dx"), want, got, again):
            assert torch.equal(s_, w), f"{name} on the side stream"
            assert torch.equal(d, w), f"{name} on the default stream beside it"


# ---------------------------------------------------------------------------------------------- > 2^31 elements
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_dequantize_more_than_2_31_elements():
    """A weight of 2^31 + 2^20 values (no double quant): the values past 2^31, around it and at the start equal
    the reference (32-bit index arithmetic would wrap and read or write the wrong place)."""
    _native_cuda()
    bs = 64
    n = (1 << 31) + (1 << 20)
    need = n // 2 + n // bs * 4 + n * 2  # packed + absmax + bf16 output
    free, _ = torch.cuda.mem_get_info()
    if free < need + (2 << 30):
        pytest.skip(f"needs {(need + (2 << 30)) / 2**30:.1f} GiB free, the GPU has {free / 2**30:.1f} GiB")
    g = torch.Generator(device="cuda").manual_seed(5)
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(n // bs, device="cuda", generator=g) + 0.5
    out = _ops.dequantize_nf4(packed, absmax, None, None, n, bs, torch.bfloat16)
    torch.cuda.synchronize()
    for start in (0, (1 << 31) - 4096, (1 << 31), n - 8192):  # block-aligned windows of 8192 values
        want = ref.dequantize_nf4_ref(packed[start // 2:(start + 8192) // 2], absmax[start // bs:(start + 8192) // bs],
                                      None, None, 8192, bs, torch.bfloat16)
        assert torch.equal(out[start:start + 8192], want), f"values {start}..{start + 8191}"
    del out, packed, absmax
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- misaligned packed
def test_aligned_packed_copies_only_misaligned_views():
    dev = "cuda" if CUDA else "cpu"
    buf = torch.arange(257, dtype=torch.uint8, device=dev)
    aligned = buf[:256]
    assert _checks.aligned_packed(aligned) is aligned
    view = buf[1:]
    assert view.data_ptr() % _checks.PACKED_ALIGN
    _checks._warned_misaligned = False
    with pytest.warns(RuntimeWarning, match="not a multiple of 16 bytes"):
        fixed = _checks.aligned_packed(view)
    assert fixed.data_ptr() % _checks.PACKED_ALIGN == 0 and torch.equal(fixed, view)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert torch.equal(_checks.aligned_packed(buf[3:]), buf[3:])


@pytest.mark.parametrize("offset", [1, 4, 8])
def test_misaligned_packed_view_on_the_triton_fast_path(offset):
    """`packed` as a view at byte offset 1 / 4 / 8 of a bigger buffer, at an aligned fast-path shape (N % 64,
    K % 128, blocksize 64): Triton's forward, decode and dx give exactly what the aligned tensor gives (on a GPU
    the int32 vector loads would otherwise be misaligned; on the CPU the interpreter runs the same launchers)."""
    from qlora_kernels.triton_kernels import nf4_decode, nf4_linear, nf4_linear_dx

    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16  # 16-bit activations: the fast path (fast_flags), in the interpreter too
    N, K = (256, 512) if CUDA else (64, 256)
    (p, a, n, o), g = _weight(N, K, device=dev)
    buf = torch.zeros(p.numel() + offset, dtype=torch.uint8, device=dev)
    view = buf[offset:]
    view.copy_(p.reshape(-1))
    assert view.data_ptr() % 16
    x = torch.randn(32, K, generator=g).to(dev, dtype)
    dy = torch.randn(32, N, generator=g).to(dev, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = (nf4_linear(x, view, a, n, o, N, K, 64), nf4_decode(x[:4], view, a, n, o, N, K, 64),
               nf4_linear_dx(dy, view, a, n, o, N, K, 64))
    want = (nf4_linear(x, p, a, n, o, N, K, 64), nf4_decode(x[:4], p, a, n, o, N, K, 64),
            nf4_linear_dx(dy, p, a, n, o, N, K, 64))
    for name, gt, wt in zip(("forward", "decode", "dx"), got, want):
        assert torch.equal(gt, wt), name
    if CUDA:
        torch.cuda.synchronize()  # a misaligned access would surface here as a CUDA error


# ---------------------------------------------------------------------------------------------- fp32 Triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 16, 300])
def test_triton_fp32_on_gpu(M):
    """fp32 activations (exact "ieee" dots, the masked path): forward, decode and dx against float64, with the
    tolerance derived from a plain fp32 torch matmul (TF32 off) of the same dequantized weight."""
    from qlora_kernels.triton_kernels import nf4_decode, nf4_linear, nf4_linear_dx

    N, K, r = 1000, 1088, 16  # ragged N, K % 128 != 0
    (p, a, n, o), g = _weight(N, K)
    w64 = ref.dequantize_nf4_ref(p, a, n, o, N * K, 64, torch.float64).view(N, K)
    w32 = w64.float()
    x = torch.randn(M, K, generator=g).cuda()
    U = torch.randn(M, r, generator=g).cuda()
    B = (torch.randn(N, r, generator=g) * 0.05).cuda()
    dy = torch.randn(M, N, generator=g).cuda()
    G = torch.randn(M, r, generator=g).cuda()
    A = (torch.randn(r, K, generator=g) / K**0.5).cuda()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exact = x.double() @ w64.t() + 2.0 * U.double() @ B.double().t()
        plain = x @ w32.t() + 2.0 * U @ B.t()
        assert_close_derived(nf4_linear(x, p, a, n, o, N, K, 64, U, B, 2.0), exact, plain, "fp32 forward")
        if M <= 16:
            assert_close_derived(nf4_decode(x, p, a, n, o, N, K, 64, U, B, 2.0), exact, plain, "fp32 decode")
        exact = dy.double() @ w64 + 2.0 * G.double() @ A.double()
        plain = dy @ w32 + 2.0 * G @ A
        assert_close_derived(nf4_linear_dx(dy, p, a, n, o, N, K, 64, G, A, 2.0), exact, plain, "fp32 dx")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ---------------------------------------------------------------------------------------------- run LAST
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_managed_over_free():
    """A paged state larger than the GPU's free memory: the guard (optim/paged.py) refuses it before the driver is
    asked (asking could hang the GPU), the optimizer path falls back with a warning, and the managed bytes the
    extension holds are unchanged. bench/gpu_check.sh runs this after every other step."""
    from qlora_kernels.optim import paged

    _native_cuda()
    C = _ops.native_module()
    before = C.managed_bytes()
    free, _ = torch.cuda.mem_get_info()
    dev = torch.device("cuda", torch.cuda.current_device())
    too_big = (free + (1 << 30)) // 4
    with pytest.raises(paged.ManagedMemoryError, match="exceeds the managed-memory budget"):
        paged.managed_zeros((too_big,), torch.float32, dev)
    paged._warned_guard.discard(dev)
    with pytest.warns(RuntimeWarning, match="use ordinary device memory"):
        assert paged.managed_zeros_or_none((too_big,), torch.float32, dev) is None
    assert C.managed_bytes() == before
    small = paged.managed_zeros((1024,), torch.float32, dev)  # within the budget: still managed
    assert paged.pointer_type(small) == "managed" and int(small.count_nonzero()) == 0
    del small
    torch.cuda.synchronize()
    assert C.managed_bytes() == before
