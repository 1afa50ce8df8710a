"""Triton linear kernels (forward, dx, decode) against a float64 reference.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on small odd shapes with
small tiles (the heuristic table is overridden), in float16/float32: the interpreter computes bfloat16
arithmetic wrongly. On a GPU the same tests run compiled.

Tolerance (derived, not guessed): the kernel's error against float64 is at most twice the error of plain
PyTorch in the same dtype on the same inputs (dequantize to that dtype, matmul, addmm), measured as RMS over
the output (max error: 4x, it is a noisier statistic), plus a floor of 1e-2 float32 ulp of the output's
magnitude for cases where PyTorch happens to be exact.
"""

from __future__ import annotations

import os

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference as ref

from accuracy import assert_close_derived

pytest.importorskip("triton")  # without triton there is nothing to test; with it, a missing module must fail
import qlora_kernels.triton_kernels as tk  # noqa: E402
from qlora_kernels.triton_kernels import LaunchConfig, config_override, dispatch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set before triton is imported)", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float16, torch.float32]
SCALING = 0.5

# Small tiles so the interpreter stays fast; they still leave partial tiles on every axis.
SMALL = {
    "fwd": LaunchConfig(16, 16, 32, 2, 4, 1),
    "dx": LaunchConfig(16, 32, 32, 2, 4, 1),
    "decode": LaunchConfig(16, 16, 32, 1, 4, 1, split_k=1),
}

# M, N, K, blocksize, double_quant, r (0 = no LoRA), bias, strided x
CASES = [
    (0, 37, 96, 32, True, 8, True, False),  # empty input
    (1, 37, 91, 32, True, 1, True, True),  # odd K: bytes straddle rows
    (1, 40, 256, 64, False, 64, False, False),  # aligned, rank 64
    (3, 45, 200, 64, True, 16, True, True),  # K % blocksize != 0: blocks straddle rows
    (3, 33, 130, 32, False, 0, False, False),  # no LoRA, no bias
    (17, 45, 200, 64, False, 8, True, True),
    (17, 50, 91, 32, True, 64, False, False),
    (64, 70, 256, 64, True, 16, True, True),
    (64, 33, 150, 32, False, 1, True, False),
    # aligned fast path (nf4_tile_fast: no W masks, int32 words) for every kernel at the SMALL tiles
    (5, 64, 128, 32, True, 8, True, False),
    (20, 32, 64, 32, False, 4, False, True),
]
IDS = [f"M{c[0]}-N{c[1]}-K{c[2]}-bs{c[3]}-{'dq' if c[4] else 'nodq'}-r{c[5]}{'-bias' if c[6] else ''}{'-strided' if c[7] else ''}"
       for c in CASES]


@pytest.fixture(autouse=True)
def small_tiles():
    if ON_GPU:  # the real heuristic table on a GPU
        yield
        return
    with config_override(lambda op, M, N, K, bs: SMALL[op]):
        yield


@pytest.fixture
def triton_backend():
    qk.set_backend("triton")
    yield
    qk.set_backend(None)


def make_case(M, N, K, blocksize, dq, r, bias, strided, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    W = qk.quantize_nf4(w, blocksize=blocksize, double_quant=dq)
    if strided:  # rows with a stride > K, last stride 1: passed as strides, never copied
        x = torch.randn(M, K + 7, generator=g)[:, 3 : 3 + K]
    else:
        x = torch.randn(M, K, generator=g)
    u = torch.randn(M, r, generator=g) if r else None
    b = torch.randn(N, r, generator=g) * 0.2 if r else None
    bias_t = torch.randn(N, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    W = W.to(DEVICE)
    return W, to(x), to(u), to(b), to(bias_t)


def dequant(W, dtype):
    p, a, n, o = W.tensors()
    N, K = W.shape
    return ref.dequantize_nf4_ref(p, a, n, o, N * K, W.blocksize, dtype).view(N, K)


def fwd_refs(W, x, u, b, bias):
    """(float64 reference, plain PyTorch in x.dtype)."""
    w64 = dequant(W, torch.float64)
    y64 = x.double() @ w64.t()
    if u is not None:
        y64 += SCALING * u.double() @ b.double().t()
    if bias is not None:
        y64 += bias.double()
    wd = dequant(W, x.dtype)
    yt = x @ wd.t() if bias is None else torch.addmm(bias, x, wd.t())
    if u is not None:
        yt = yt.addmm(u, b.t(), alpha=SCALING)
    return y64, yt


def dx_refs(W, dy, g, a):
    w64 = dequant(W, torch.float64)
    dx64 = dy.double() @ w64
    if g is not None:
        dx64 += SCALING * g.double() @ a.double()
    dxt = dy @ dequant(W, dy.dtype)
    if g is not None:
        dxt = dxt.addmm(g, a, alpha=SCALING)
    return dx64, dxt


def launch_args(W):
    p, a, n, o = W.tensors()
    return p, a, n, o, W.shape[0], W.shape[1], W.blocksize


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_launchers(case, dtype):
    W, x, u, b, bias = make_case(*case, dtype)
    y64, yt = fwd_refs(W, x, u, b, bias)
    y = tk.nf4_linear(x, *launch_args(W), u, b, SCALING, bias)
    assert_close_derived(y, y64, yt, "fused")
    if x.shape[0] <= 16:
        # block_m 16: tl.dot path; block_m 1: register-FMA path (M == 1 only); split_k > 1: partials + reduce
        for block_m, split in ((16, 1), (16, 3), (1, 1), (1, 2)):
            cfg = LaunchConfig(block_m, 16, 32 if not ON_GPU else 256, 1, 4, 1 if not ON_GPU else 3, split_k=split)
            y = tk.nf4_decode(x, *launch_args(W), u, b, SCALING, bias, config=cfg)
            assert_close_derived(y, y64, yt, f"decode block_m {block_m} split {split}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_op(case, dtype, triton_backend):
    W, x, u, b, bias = make_case(*case, dtype, seed=1)
    y64, yt = fwd_refs(W, x, u, b, bias)
    y = torch.ops.qlora.nf4_linear(x, *launch_args(W), u, b, SCALING, bias)
    assert_close_derived(y, y64, yt, "op")


# ---------------------------------------------------------------------------------------------------- dx
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dx(case, dtype, triton_backend):
    M, N, K, bs, dq, r, _, strided = case
    W, _, _, _, _ = make_case(*case, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(M, N + 5, generator=gen)[:, 2 : 2 + N] if strided else torch.randn(M, N, generator=gen)
    g = torch.randn(M, r, generator=gen) if r else None
    a = torch.randn(r, K, generator=gen) * 0.2 if r else None
    dy, g, a = (None if t is None else t.to(DEVICE, dtype) for t in (dy, g, a))
    dx64, dxt = dx_refs(W, dy, g, a)
    assert_close_derived(tk.nf4_linear_dx(dy, *launch_args(W), g, a, SCALING), dx64, dxt, "dx launcher")
    assert_close_derived(torch.ops.qlora.nf4_linear_dx(dy, *launch_args(W), g, a, SCALING), dx64, dxt, "dx op")


# -------------------------------------------------------------------------------- tile paths and configs
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32"])
def test_wide_k_tiles(dtype):
    """BLOCK_K > blocksize (allowed when K % blocksize == 0): several scales per tile row; r = 128 (two chunks)."""
    case = (20, 40, 256, 32, True, 128, True, False)
    W, x, u, b, bias = make_case(*case, dtype, seed=4)
    y64, yt = fwd_refs(W, x, u, b, bias)
    wide = {"fwd": LaunchConfig(16, 16, 128, 1, 4, 1), "dx": LaunchConfig(16, 16, 64, 1, 4, 1),
            "decode": LaunchConfig(16, 16, 128, 1, 4, 1, split_k=2)}
    with config_override(lambda op, *_: wide[op]):
        assert_close_derived(tk.nf4_linear(x, *launch_args(W), u, b, SCALING, bias), y64, yt, "fwd wide")
        assert_close_derived(tk.nf4_decode(x[:5], *launch_args(W), u[:5], b, SCALING, bias), y64[:5], yt[:5], "decode wide")
        dy = y64.to(dtype)
        g = torch.randn(20, 128, dtype=dtype, device=DEVICE)
        a = torch.randn(128, 256, dtype=dtype, device=DEVICE) * 0.1
        dx64, dxt = dx_refs(W, dy, g, a)
        assert_close_derived(tk.nf4_linear_dx(dy, *launch_args(W), g, a, SCALING), dx64, dxt, "dx wide")


def test_bf16_upcast_path():
    """bf16 activations: the interpreter upcasts loaded bf16 to float32 (UPCAST); compiled, bf16 tl.dot."""
    case = (17, 40, 128, 64, True, 8, True, False)
    W, x, u, b, bias = make_case(*case, torch.bfloat16, seed=5)
    y64, yt = fwd_refs(W, x, u, b, bias)
    assert_close_derived(tk.nf4_linear(x, *launch_args(W), u, b, SCALING, bias), y64, yt, "bf16")


def test_dequant_plan_matches(triton_backend):
    """The dispatcher's other branch (dequantize to scratch + matmul + addmm) gives the same contract."""
    W, x, u, b, bias = make_case(40, 37, 200, 64, True, 8, True, True, torch.float32, seed=6)
    y64, yt = fwd_refs(W, x, u, b, bias)
    dispatch.set_plan_override("dequant")
    try:
        assert dispatch.plan_linear("fwd", 40, 37, 200, 8, x.device) == "dequant"
        assert_close_derived(torch.ops.qlora.nf4_linear(x, *launch_args(W), u, b, SCALING, bias), y64, yt, "dequant")
        dy = torch.randn(40, 37, device=DEVICE)
        dx64, dxt = dx_refs(W, dy, None, None)
        assert_close_derived(torch.ops.qlora.nf4_linear_dx(dy, *launch_args(W), None, None, SCALING), dx64, dxt, "dq dx")
    finally:
        dispatch.set_plan_override(None)


def test_out_buffer_fully_written():
    """A NaN-poisoned output buffer: every element in range is written (partial tiles on both axes)."""
    W, x, u, b, bias = make_case(19, 37, 91, 32, True, 8, True, False, torch.float32, seed=7)
    y64, yt = fwd_refs(W, x, u, b, bias)
    out = torch.full((19, 37), float("nan"), device=DEVICE)
    tk.nf4_linear(x, *launch_args(W), u, b, SCALING, bias, out=out)
    assert_close_derived(out, y64, yt, "poisoned fwd")
    out = torch.full((3, 37), float("nan"), device=DEVICE)
    tk.nf4_decode(x[:3], *launch_args(W), u[:3], b, SCALING, bias, out=out)
    assert_close_derived(out, y64[:3], yt[:3], "poisoned decode")


def test_bad_inputs():
    W, x, u, b, bias = make_case(4, 16, 64, 64, True, 4, False, False, torch.float32)
    with pytest.raises(ValueError, match="x has"):
        tk.nf4_linear(x[:, :32], *launch_args(W))
    with pytest.raises(ValueError, match="together"):
        tk.nf4_linear(x, *launch_args(W), u, None)
    with pytest.raises(ValueError, match="lora_b"):
        tk.nf4_linear(x, *launch_args(W), u, b[:, :2])
    with pytest.raises(TypeError, match="float16"):
        tk.nf4_linear(x.to(torch.float64), *launch_args(W))
    with pytest.raises(ValueError, match="at most 16"):
        tk.nf4_decode(torch.zeros(17, 64, device=DEVICE), *launch_args(W))


def test_fast_path_cases_take_the_fast_path():
    """The two aligned CASES run nf4_tile_fast (int32 words, no W masks) in every kernel at the SMALL tiles;
    the others take the masked path. The interpreter runs its gather variant (LUT_ASM off)."""
    from qlora_kernels.triton_kernels._common import fast_flags

    for M, N, K, bs, *_ in CASES:
        for op, cfg in SMALL.items():
            flags = fast_flags(N, K, bs, cfg.block_n, cfg.block_k, torch.float16)
            assert flags["FAST"] == ((M, N, K) in ((5, 64, 128), (20, 32, 64))), (op, M, N, K)
            assert not flags["LUT_ASM"] or ON_GPU


@pytest.mark.parametrize("even_m", [True, False], ids=["even-M", "ragged-M"])
def test_fast_path_reproduces_the_dequantization(even_m):
    """The aligned fast path (nf4_tile_fast, its gather variant under the interpreter) with one and two blocks
    per tile row (BLOCK_K = 64, 128 at blocksize 64: the GPU table's; two blocks take the k-permuted PERM_K
    tile, the activations and dx columns in the same order, decode split over K), with and
    without the activation mask (EVEN_M): identity activations return W itself, bit for bit (one exact
    product per output, float32 accumulation). Catches a wrong block index, row offset or word order."""
    N, K, bs = 64, 256, 64
    g = torch.Generator().manual_seed(11)
    w = torch.randn(N, K, generator=g)
    w[0, :bs] = 0.0  # a zero block
    w[3, :16] = torch.linspace(-1, 1, 16)  # every code
    W = qk.quantize_nf4(w, blocksize=bs, double_quant=True).to(DEVICE)
    want = dequant(W, torch.float16)
    args = launch_args(W)
    cut_k, cut_n = (K, N) if even_m else (K - 5, N - 3)
    eye_k = torch.eye(K, dtype=torch.float16, device=DEVICE)[:cut_k]
    eye_n = torch.eye(N, dtype=torch.float16, device=DEVICE)[:cut_n]
    for block_k in (64, 128):  # one block per tile row, and two (PERM_K: k-permuted tile, x / dx alike)
        fwd, dx, dec = (LaunchConfig(32, 16, block_k, 2, 4, 1), LaunchConfig(16, 32, block_k, 2, 4, 1),
                        LaunchConfig(16, 16, block_k, 1, 4, 1, split_k=2))
        for op, cfg, rows in (("fwd", fwd, N), ("dx", dx, N), ("decode", dec, N)):
            flags = tk._common.fast_flags(rows, K, bs, cfg.block_n, cfg.block_k, torch.float16)
            assert flags["FAST"], op
            assert flags["PERM_K"] == (block_k == 2 * bs and tk.configs.perm_k_supported()), op
        torch.testing.assert_close(tk.nf4_linear(eye_k, *args, config=fwd), want.t()[:cut_k], rtol=0, atol=0)
        torch.testing.assert_close(tk.nf4_linear_dx(eye_n, *args, config=dx), want[:cut_n], rtol=0, atol=0)
        torch.testing.assert_close(tk.nf4_decode(eye_k[40:56], *args, config=dec), want.t()[40:56], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- dispatcher
def test_perm_k_needs_triton_3_9(monkeypatch):
    """The two-block PERM_K tiles only where triton compiles them well (>= 3.9); older triton (torch 2.11's 3.6
    fails to compile them for sm_90) gets the one-block table and no PERM_K flag: both answers under a faked
    version, then the installed triton's."""
    import triton

    from qlora_kernels.triton_kernels import _common, configs

    for version, ok in (("3.6.0", False), ("3.8.1", False), ("3.9.0", True), ("3.10.2", True), ("4.0.0+git1a2b", True)):
        monkeypatch.setattr(triton, "__version__", version)
        configs.perm_k_supported.cache_clear()
        assert configs.perm_k_supported() is ok, version
    configs.perm_k_supported.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    try:
        assert not _common.fast_flags(4096, 4096, 64, 128, 128, torch.bfloat16)["PERM_K"]
        for cap in (8, 9):
            for op, ms in (("fwd", (64, 256, 512, 4096)), ("dx", (64, 256, 512, 4096)), ("decode", (1, 16))):
                for M in ms:
                    cfg = configs.table_config(op, M, cap)
                    assert cfg.block_k <= 64 or op == "dx" and cfg.block_m == 64, (op, cap, M, cfg)
    finally:
        configs.perm_k_supported.cache_clear()
    monkeypatch.undo()
    # the installed triton (CI runs this file under 3.9 and under 3.6, the GPU image's) gets its own table
    installed = tuple(int(v) for v in triton.__version__.split("+")[0].split(".")[:2]) >= (3, 9)
    assert configs.perm_k_supported() is installed, triton.__version__
    assert (configs.table_config("fwd", 4096, 9).block_k == 128) is installed
    assert _common.fast_flags(4096, 4096, 64, 128, 128, torch.bfloat16)["PERM_K"] is installed


def test_dispatch_rules():
    d = dispatch
    cpu = torch.device("cpu")
    assert d.plan_linear("fwd", 1, 4096, 4096, 16, cpu) == "decode"
    assert d.plan_linear("fwd", 17, 4096, 4096, 16, cpu) == "fused"
    assert d.plan_linear("dx", 1, 4096, 4096, 16, cpu) == "fused"
    # the roofline model: fused wins at small and mid M, cuBLAS at very large M (unmeasured constants; eta
    # from bench/sass_report's model, capped at 0.9 on sm_90: M* = 12606 at 4096 x 4096, r = 16)
    cross = d.crossover_m(4096, 4096, 16, 9)
    assert 4096 < cross < 16384, cross
    assert d.crossover_m(4096, 4096, 0, 9) <= cross  # LoRA's extra addmm favours the fused kernel
    # an unmeasured eta is capped (sm_80's model says 1.0): very large M still goes to dequant + cuBLAS
    assert d.crossover_m(4096, 4096, 16, 8) < 16384
    # every table config fits its constraints after fitting to odd shapes
    for (op, cap, bucket), cfg in [*d.HEURISTICS.items(), *tk.configs.LEGACY_HEURISTICS.items()]:
        for K, bs in ((4096, 64), (4100, 64), (4097, 32), (96, 128)):
            f = d.fit_config(op, cfg, bucket or 8192, 4096, K, bs)
            assert f.block_k <= bs or K % bs == 0
            assert min(f.block_k, f.block_n) >= 16 and f.block_m >= 16
    with config_override(lambda *a: LaunchConfig(32, 32, 64, 1)):
        assert d.pick_config("fwd", 100, 50, 91, 32, cpu).block_k == 32  # clamped to the blocksize


# ------------------------------------------------------------------------------ opcheck and torch.compile
def _op_args(dtype=torch.float32, M=5, dq=True, r=4):
    W, x, u, b, bias = make_case(M, 24, 96, 32, dq, r, True, False, dtype, seed=8)
    return W, (x, *launch_args(W), u, b, SCALING, bias)


def test_opcheck_nf4_linear(triton_backend):
    for M in (3, 20):
        _, args = _op_args(M=M)
        torch.library.opcheck(torch.ops.qlora.nf4_linear.default, args)


def test_opcheck_nf4_linear_dx(triton_backend):
    W, (x, *wargs) = _op_args(M=20)
    dy = torch.randn(20, 24, device=DEVICE)
    g = torch.randn(20, 4, device=DEVICE)
    a = torch.randn(4, 96, device=DEVICE)
    torch.library.opcheck(torch.ops.qlora.nf4_linear_dx.default, (dy, *launch_args(W), g, a, SCALING))


def test_torch_compile_fullgraph(triton_backend):
    W, args = _op_args(M=20)
    x, p, a, n, o, N, K, bs, u, b, s, bias = args

    def layer(x, u, b, bias):
        y = torch.ops.qlora.nf4_linear(x, p, a, n, o, N, K, bs, u, b, s, bias)
        return torch.ops.qlora.nf4_linear_dx(y.new_ones(y.shape), p, a, n, o, N, K, bs, None, None, s) + x

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, u, b, bias), layer(x, u, b, bias))
