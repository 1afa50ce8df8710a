"""The grouped MoE ops of the contract (qlora::nf4_grouped_linear, qlora::nf4_grouped_linear_dx) on the native
(per-expert dequantize into one scratch + matmul) and reference paths, against the float64 oracle; their fakes
(opcheck, torch.compile fullgraph) and argument errors. The Triton kernels have test_triton_grouped.py."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _grouped_ops as gops

from accuracy import assert_close_derived
from build_state import native_or_skip

E, N, K, R, S = 4, 24, 64, 4, 0.5


@pytest.fixture(params=["native", "reference"])
def backend(request):
    if request.param == "native":
        native_or_skip()
    qk.set_backend(request.param)
    yield request.param
    qk.set_backend(None)


def stack_experts(w, blocksize=64, double_quant=True):
    """Quantize each expert of w [E, N, K] as a Linear weight and stack: (packed, absmax, nested, offset)."""
    qs = [qk.quantize_nf4(w[e], blocksize=blocksize, double_quant=double_quant) for e in range(w.shape[0])]
    packed = torch.stack([q.packed.view(-1) for q in qs])
    absmax = torch.stack([q.absmax for q in qs])
    if not double_quant:
        return packed, absmax, None, None
    return packed, absmax, torch.stack([q.nested_absmax for q in qs]), torch.stack([q.offset.reshape(()) for q in qs])


def problem(counts, dtype, double_quant=True, lora=True, seed=0, n=N, k=K):
    g = torch.Generator().manual_seed(seed)
    e, t = len(counts), sum(counts)
    w = torch.randn(e, n, k, generator=g) * 0.05
    offsets = torch.tensor([0] + list(counts), dtype=torch.int64).cumsum(0)
    weights = stack_experts(w, 64, double_quant)
    x = torch.randn(t, k, generator=g).to(dtype)
    dy = torch.randn(t, n, generator=g).to(dtype)
    u = torch.randn(t, R, generator=g).to(dtype) if lora else None
    b = (torch.randn(e, n, R, generator=g) * 0.1).to(dtype) if lora else None
    a = (torch.randn(e, R, k, generator=g) * 0.1).to(dtype) if lora else None
    return x, dy, offsets, weights, u, b, a


def d64(t):
    return None if t is None else t.double()


COUNTS = {"ragged": [3, 0, 6, 1], "one-expert": [0, 10, 0, 0], "T=0": [0, 0, 0, 0], "leading-empty": [0, 0, 2, 5]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "no-lora"])
@pytest.mark.parametrize("counts", list(COUNTS.values()), ids=list(COUNTS))
def test_grouped_ops_match_float64(counts, lora, double_quant, dtype, backend):
    x, dy, offsets, wts, u, b, a = problem(counts, dtype, double_quant, lora)
    args = (offsets, *wts, N, K, 64)
    y = torch.ops.qlora.nf4_grouped_linear(x, *args, u, b, S)
    exact = gops.nf4_grouped_linear_ref(x.double(), *args, d64(u), d64(b), S)
    plain = gops.nf4_grouped_linear_ref(x, *args, u, b, S)
    assert y.shape == (sum(counts), N) and y.dtype == dtype
    assert_close_derived(y, exact, plain, "grouped forward")

    dx = torch.ops.qlora.nf4_grouped_linear_dx(dy, *args, u, a, S)
    exact = gops.nf4_grouped_linear_dx_ref(dy.double(), *args, d64(u), d64(a), S)
    plain = gops.nf4_grouped_linear_dx_ref(dy, *args, u, a, S)
    assert dx.shape == (sum(counts), K) and dx.dtype == dtype
    assert_close_derived(dx, exact, plain, "grouped dx")


def test_oracle_is_the_dense_op_per_expert():
    """The float64 oracle, expert by expert, is the dense qlora::nf4_linear of that expert's Linear weight."""
    counts = [3, 0, 6, 1]
    x, dy, offsets, wts, u, b, a = problem(counts, torch.float64)
    y = gops.nf4_grouped_linear_ref(x, offsets, *wts, N, K, 64, u, b, S)
    o = offsets.tolist()
    packed, absmax, nested, off = wts
    qk.set_backend("reference")
    try:
        for e in range(E):
            rows = slice(o[e], o[e + 1])
            dense = torch.ops.qlora.nf4_linear(x[rows], packed[e], absmax[e], nested[e], off[e], N, K, 64,
                                               u[rows], b[e], S, None)
            # float64: the two differ only in where s * (u @ b^T) is rounded (addmm_ vs add)
            torch.testing.assert_close(y[rows], dense, rtol=1e-13, atol=1e-13)
    finally:
        qk.set_backend(None)


def test_native_dequantizes_one_expert_at_a_time(monkeypatch):
    """The native path's scratch holds one expert: every dequantize writes the same [N*K] buffer, and only
    experts with tokens are dequantized."""
    native_or_skip()
    from qlora_kernels import _ops

    seen = []
    real = _ops._dequantize_into
    monkeypatch.setattr(_ops, "_dequantize_into", lambda out, *rest: (seen.append((out.data_ptr(), out.numel())),
                                                                      real(out, *rest)))
    x, dy, offsets, wts, u, b, a = problem([3, 0, 6, 1], torch.float32)
    qk.set_backend("native")
    try:
        torch.ops.qlora.nf4_grouped_linear(x, offsets, *wts, N, K, 64, u, b, S)
    finally:
        qk.set_backend(None)
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0][1] == N * K


def test_opcheck_grouped_ops(backend):
    x, dy, offsets, wts, u, b, a = problem([2, 0, 3, 1], torch.float32)
    args = (offsets, *wts, N, K, 64)
    torch.library.opcheck(torch.ops.qlora.nf4_grouped_linear.default, (x, *args, u, b, 2.0))
    torch.library.opcheck(torch.ops.qlora.nf4_grouped_linear.default, (x, *args, None, None, 1.0))
    torch.library.opcheck(torch.ops.qlora.nf4_grouped_linear_dx.default, (dy, *args, u, a, 2.0))
    _, _, _, wts_plain, _, _, _ = problem([2, 0, 3, 1], torch.float32, double_quant=False)
    torch.library.opcheck(torch.ops.qlora.nf4_grouped_linear_dx.default,
                          (dy, offsets, *wts_plain, N, K, 64, None, None, 1.0))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, dy, offsets, wts, u, b, a = problem([3, 0, 6, 1], torch.float32)

    def f(x, dy, offsets, u, b, a):
        y = torch.ops.qlora.nf4_grouped_linear(x, offsets, *wts, N, K, 64, u, b, S)
        dx = torch.ops.qlora.nf4_grouped_linear_dx(dy, offsets, *wts, N, K, 64, u, a, S)
        return y.relu() * 2, dx + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, dy, offsets, u, b, a), f(x, dy, offsets, u, b, a)):
        assert torch.equal(got, want)


def _bad(**change):
    """The forward's keyword arguments with `change` applied."""
    x, dy, offsets, (packed, absmax, nested, off), u, b, a = problem([2, 0, 3, 1], torch.float32)
    kw = dict(x=x, offsets=offsets, packed=packed, absmax=absmax, nested_absmax=nested, offset=off,
              out_features=N, in_features=K, blocksize=64, lora_u=u, lora_b=b, scaling=S)
    kw.update({k: (v(kw) if callable(v) else v) for k, v in change.items()})
    return kw


BAD = {
    "offsets-not-monotone": (dict(offsets=torch.tensor([0, 3, 2, 5, 6])), ValueError, "non-decreasing"),
    "offsets-not-ending-at-T": (dict(offsets=torch.tensor([0, 2, 2, 5, 5])), ValueError, "end at the row count"),
    "offsets-not-starting-at-0": (dict(offsets=torch.tensor([1, 2, 2, 5, 6])), ValueError, "start at 0"),
    "offsets-wrong-length": (dict(offsets=torch.tensor([0, 2, 6])), ValueError, "offsets must be 1-D \\[E \\+ 1\\]"),
    "offsets-int32": (dict(offsets=lambda kw: kw["offsets"].int()), TypeError, "offsets must be int64"),
    # a meta tensor routes the call to the fake, whose torch._check raises RuntimeError
    "offsets-wrong-device": (dict(offsets=lambda kw: kw["offsets"].to("meta")), RuntimeError, "offsets is on meta"),
    "x-wrong-K": (dict(x=lambda kw: kw["x"][:, :32]), ValueError, "x has 32 columns"),
    "N*K-not-blocks": (dict(out_features=3, in_features=40, x=lambda kw: kw["x"][:, :40]), ValueError, "straddle"),
    "packed-wrong-size": (dict(in_features=128), ValueError, "x has 64 columns"),
    "absmax-float-with-dq": (dict(absmax=lambda kw: kw["absmax"].float()), TypeError, "uint8 codes"),
    "nested-without-offset": (dict(offset=None), ValueError, "given together"),
    "offset-not-per-expert": (dict(offset=lambda kw: kw["offset"][:1]), ValueError, "offset must be \\[4\\]"),
    "lora-alone": (dict(lora_b=None), ValueError, "lora_u and lora_b must be given together"),
    "lora_b-wrong-shape": (dict(lora_b=lambda kw: kw["lora_b"][:, :, :2]), ValueError, "lora_b must be"),
    "lora_u-wrong-rows": (dict(lora_u=lambda kw: kw["lora_u"][:3]), ValueError, "lora_u must be"),
    "x-int": (dict(x=lambda kw: kw["x"].long()), TypeError, "x must be float32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_naming_the_argument(case, backend):
    change, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        torch.ops.qlora.nf4_grouped_linear(**_bad(**change))


def test_wrong_device_in_eager_checks():
    x, dy, offsets, wts, u, b, a = problem([2, 0, 3, 1], torch.float32)
    with pytest.raises(ValueError, match="lora_b is on meta, x on cpu"):
        gops.check_grouped(x, offsets, *wts, N, K, 64, u, b.to("meta"), dx=False)


def test_bad_dx_inputs():
    x, dy, offsets, wts, u, b, a = problem([2, 0, 3, 1], torch.float32)
    with pytest.raises(ValueError, match="dy has 64 columns"):
        torch.ops.qlora.nf4_grouped_linear_dx(x, offsets, *wts, N, K, 64, None, None, 1.0)
    with pytest.raises(ValueError, match="lora_a must be \\[4, 4, 64\\]"):
        torch.ops.qlora.nf4_grouped_linear_dx(dy, offsets, *wts, N, K, 64, u, b, 1.0)


def test_fake_checks_under_compile():
    """The fake raises too (torch.compile traces with it): a K mismatch fails at trace time."""
    torch._dynamo.reset()
    x, dy, offsets, wts, u, b, a = problem([2, 0, 3, 1], torch.float32)
    f = torch.compile(lambda x: torch.ops.qlora.nf4_grouped_linear(x, offsets, *wts, N, K, 64, None, None, 1.0),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="x has 32 columns"):
        f(x[:, :32].contiguous())
