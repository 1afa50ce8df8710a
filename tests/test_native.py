"""qlora_kernels._C called directly (raw pointers), compared bit for bit with the pure-PyTorch reference.

Every CPU test runs once per SIMD level this CPU supports (AVX-512, AVX2, the portable scalar code), forced
through `_C.set_cpu_isa`, so the fallback paths are covered on any machine. CUDA tests (marked `gpu`) compare
the *_cuda functions with the *_cpu ones and skip without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from build_state import native_or_skip

C = native_or_skip()  # a skip only when nothing was built; a built extension that does not import fails
from qlora_kernels import _format as F
from qlora_kernels import reference as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCKSIZES = F.VALID_BLOCKSIZES
# n = 0, 1, 2, 63, 64, 65, 4095 (odd), odd sizes, rows whose K is not a multiple of the blocksize,
# a 2-D weight, and one ~1M-element case (odd, K % blocksize != 0 for every blocksize).
SHAPES = [(0,), (1,), (2,), (63,), (64,), (65,), (4095,), (4097,), (3, 100), (7, 33), (300, 257), (1000, 1001)]
THREADS = 2


def shape_id(s):
    return "x".join(map(str, s))


CPU_ISAS = ("avx512", "avx2", "scalar")
# the CPU features each SIMD path needs (nf4_cpu.cpp's run-time check), named in the skip reason
ISA_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "avx2": ("avx2", "f16c"), "scalar": ()}


def _missing_cpu_flags(isa: str) -> list[str]:
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return list(ISA_FLAGS[isa])
    return [f for f in ISA_FLAGS[isa] if f not in flags]


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Runs the test with the CPU kernels capped at one SIMD level (scalar is the portable fallback). A level
    this CPU lacks is a visible skip, and conftest's summary lists the levels that ran."""
    paths = request.config.qk_cpu_paths
    if request.param not in C.cpu_isas_supported():
        reason = (f"this CPU lacks the {request.param} path (missing CPU flags: "
                  f"{', '.join(_missing_cpu_flags(request.param)) or 'none in /proc/cpuinfo, but the OS or _C refuses it'})")
        paths["skipped"][request.param] = reason
        pytest.skip(reason)
    assert C.set_cpu_isa(request.param) == request.param
    paths["ran"].add(request.param)
    yield request.param
    C.set_cpu_isa("auto")


def assert_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a = actual.reshape(-1).contiguous().view(torch.uint8)
    e = expected.reshape(-1).contiguous().view(torch.uint8)
    if not torch.equal(a, e):
        isz = actual.element_size()
        bad = (a.reshape(-1, isz) != e.reshape(-1, isz)).any(1).nonzero().reshape(-1)
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {actual.numel()} elements differ; first at {i}: "
            f"{actual.reshape(-1)[i].item()!r} vs expected {expected.reshape(-1)[i].item()!r}"
        )


# ----------------------------------------------------------------------------------------------- wrappers
def nblocks(n, bs):
    return (n + bs - 1) // bs


def quantize(w, bs, threads=THREADS, status=None):
    flat = w.contiguous().reshape(-1)
    n = flat.numel()
    packed = torch.full(((n + 1) // 2,), 0xAA, dtype=torch.uint8)
    absmax = torch.full((nblocks(n, bs),), -7.0)
    status = torch.tensor([0, n]) if status is None else status
    C.quantize_nf4_cpu(packed.data_ptr(), absmax.data_ptr(), status.data_ptr(), flat.data_ptr(), n, bs, CODE[w.dtype], threads)
    return packed, absmax, status


def dequantize(packed, absmax, nested, offset, n, bs, dtype, threads=THREADS, out=None):
    out = torch.empty(n, dtype=dtype) if out is None else out
    C.dequantize_nf4_cpu(
        out.data_ptr(), packed.data_ptr(), absmax.data_ptr(),
        0 if nested is None else nested.data_ptr(), 0 if offset is None else offset.data_ptr(),
        F.DYNAMIC_MAP.data_ptr(), n, bs, CODE[dtype], threads,
    )  # fmt: skip
    return out


def double_quantize(absmax, threads=THREADS):
    nb = absmax.numel()
    offset = absmax.mean() if nb else torch.zeros(())
    codes = torch.empty(nb, dtype=torch.uint8)
    nested = torch.empty(nblocks(nb, F.NESTED_BLOCKSIZE))
    C.double_quantize_cpu(codes.data_ptr(), nested.data_ptr(), absmax.data_ptr(), offset.data_ptr(),
                          F.DYNAMIC_LUT.data_ptr(), nb, threads)  # fmt: skip
    return codes, nested, offset


def double_dequantize(codes, nested, offset, threads=THREADS):
    out = torch.empty(codes.numel())
    C.double_dequantize_cpu(out.data_ptr(), codes.data_ptr(), nested.data_ptr(), offset.data_ptr(),
                            F.DYNAMIC_MAP.data_ptr(), codes.numel(), threads)  # fmt: skip
    return out


def check_quantize(w, bs, threads=THREADS):
    """Native quantize == reference (packed bytes, absmax bits, no non-finite report); returns the reference."""
    packed, absmax, status = quantize(w, bs, threads)
    rp, ra = ref.quantize_nf4_ref(w, bs)
    assert_bits(packed, rp, "packed")
    assert_bits(absmax, ra, "absmax")
    assert status.tolist() == [0, w.numel()]
    return rp, ra


def check_dequantize(packed, absmax, n, bs, threads=THREADS):
    """Native dequantize == reference for every output dtype, with plain and double-quantized scales."""
    for dtype in DTYPES:
        assert_bits(dequantize(packed, absmax, None, None, n, bs, dtype, threads),
                    ref.dequantize_nf4_ref(packed, absmax, None, None, n, bs, dtype), f"dequant {dtype}")  # fmt: skip
    # (the float32 mean of scales near 3e38 overflows: double quantization is undefined there, in bnb too)
    if absmax.numel() and torch.isfinite(absmax.mean()):
        codes, nested, offset = ref.double_quantize_ref(absmax)
        for dtype in DTYPES:
            assert_bits(dequantize(packed, codes, nested, offset, n, bs, dtype, threads),
                        ref.dequantize_nf4_ref(packed, codes, nested, offset, n, bs, dtype), f"dq dequant {dtype}")  # fmt: skip


def straddlers(amax: float, dtype) -> list[float]:
    """Values w (representable in dtype) next to midpoint * amax for which w / amax and w * (1 / amax) get
    different NF4 codes: they tell the partial block's true division from the full blocks' reciprocal."""
    mids = (F.NF4_TABLE[:-1] + F.NF4_TABLE[1:]) / 2
    a = torch.tensor([amax]).to(dtype).float()
    centre = (mids * a).to(dtype)
    ibits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    cands = torch.cat([(centre.view(ibits) + k).view(dtype) for k in range(-3, 4)]).float()
    cands = cands[torch.isfinite(cands) & (cands.abs() <= a)]
    by_div = torch.bucketize(cands / a, mids)
    by_rcp = torch.bucketize(cands * (1.0 / a), mids)
    return cands[by_div != by_rcp].tolist()


def weight(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------- module facts
def test_module_surface():
    for name in ("quantize_nf4", "dequantize_nf4", "double_quantize", "double_dequantize", "pack_nf4", "unpack_nf4"):
        assert callable(getattr(C, name + "_cpu")) and callable(getattr(C, name + "_cuda"))
    info = C.build_info()
    assert info["cuda"] == C.has_cuda()
    assert info["cpu_isa"] in ("scalar", "avx2", "avx512")
    count = C.cuda_device_count()  # never raises, even without a driver
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count()
    elif not os.path.exists("/dev/nvidiactl"):
        assert count == 0
    assert "scalar" in C.cpu_isas_supported()


def test_cpu_isa_env_var():
    code = "import qlora_kernels._C as C; print(C.cpu_isa())"
    env = dict(os.environ, QLORA_KERNELS_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_tables_match_format():
    """The constants compiled into nf4_format.h are NF4_TABLE (checked through a dequantize with scale 1)."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # 32 values = one block of 32
    packed = ref.pack_nf4_ref(codes)
    out = dequantize(packed, torch.ones(1), None, None, 32, 32, torch.float32)
    assert_bits(out[:16], F.NF4_TABLE)


# ----------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_dequantize_random(isa, dtype, bs, shape):
    w = weight(shape, dtype, seed=bs + len(shape), scale=3.0)
    n = w.numel()
    rp, ra = check_quantize(w, bs)
    if dtype == torch.bfloat16 or n < 100_000:  # dequantize does not see w's dtype: the 1M case once is enough
        check_dequantize(rp, ra, n, bs)


@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_adversarial(isa, dtype, bs):
    """Midpoints exactly, +-absmax, zero blocks, tiny/huge/subnormal magnitudes, a zero partial last block."""
    fi = torch.finfo(dtype)
    mids = ((F.NF4_TABLE[:-1] + F.NF4_TABLE[1:]) / 2).tolist()
    blocks = []

    def block(values):
        v = torch.tensor(values, dtype=torch.float32)
        reps = (bs + v.numel() - 1) // v.numel()
        blocks.append(v.repeat(reps)[:bs])

    # absmax 1 and 2 (exact scaling): values land exactly on the midpoints -> the lower code
    for amax in (1.0, 2.0, 0.5):
        block([amax, -amax] + [m * amax for m in mids])
        # one ulp either side of every midpoint
        m = torch.tensor(mids) * amax
        block([amax] + torch.nextafter(m, torch.tensor(float("inf"))).tolist())
        block([-amax] + torch.nextafter(m, torch.tensor(float("-inf"))).tolist())
    # a non-power-of-two absmax: midpoint * absmax is rounded, so scaled values sit just beside midpoints
    block([3.7] + [m * 3.7 for m in mids])
    block([-3.7] + [m * -3.7 for m in mids])
    # where reciprocal-multiply and division disagree (full blocks must multiply). Only float32 inputs have
    # enough mantissa bits to land within an ulp of a midpoint; float16/bfloat16 find none.
    found = 0
    for amax in torch.linspace(0.3, 9.7, 40).tolist():
        vals = straddlers(amax, dtype)
        if vals:
            block([amax] + vals)
            found += 1
    assert found > 3 or dtype != torch.float32
    block([0.0])  # all-zero block
    block([-0.0, 0.0])
    block([5.0, -5.0, 5.0])  # only +-absmax
    for mag in (1e-30, 1e30, 1e-40, 1e-45, 1e-38, 3e-39, 6e4, 6e-8):  # tiny, huge, subnormal (float32 / float16)
        if mag < fi.max:
            block([mag, -mag / 3, mag / 7, 0.0, mag * 0.5])
    block([fi.max, -fi.max / 2, fi.max / 3])  # largest finite of the dtype
    block([fi.tiny, fi.tiny / 4, -fi.tiny / 16, fi.tiny / 2**9])  # smallest normal and subnormals of the dtype
    w32 = torch.cat(blocks)
    w = w32.to(dtype)
    assert torch.isfinite(w).all()
    # full blocks only, then the same with a partial last block: zeros, subnormals, midpoints
    check_quantize(w, bs)
    tails = [[0.0] * 5, [1e-40, -3e-41, 0.0], [1.0, mids[3], mids[8], -mids[0]], [fi.tiny / 8]]
    # partial blocks where only true division gives the reference's codes
    for amax in (5.0625, 7.78125, 0.984375, 3.3):
        vals = straddlers(amax, dtype)
        tails.append(([amax] + vals)[: bs - 1])
    for tail in tails:
        wt = torch.cat([w32, torch.tensor(tail)]).to(dtype)
        rp, ra = check_quantize(wt, bs)
        check_dequantize(rp, ra, wt.numel(), bs)


def code_search_probe() -> torch.Tensor:
    """float32 values around every NF4 midpoint (each midpoint and 4 ulps either side), the table values, 0,
    +-1 and its neighbours: every step of the code search meets both outcomes of each of its compares.
    Scaled by an absmax of exactly 1 (a 1.0 in every block), so the codes are those of these values."""
    mids = ((F.NF4_TABLE[:-1] + F.NF4_TABLE[1:]) / 2).to(torch.float32)
    near = torch.cat([(mids.view(torch.int32) + k).view(torch.float32) for k in range(-4, 5)])
    near = torch.cat([near, -near, F.NF4_TABLE, torch.tensor([0.0, -0.0, 1.0, -1.0, 0.99999994, -0.99999994])])
    near = near[near.abs() <= 1.0]
    blocks = near.split(31)  # 31 values + a 1.0 per block of 32
    return torch.cat([torch.cat([b, torch.ones(32 - b.numel())]) for b in blocks])


def test_code_search_matches_compare_count(isa):
    """The portable path's 4-level code search (the CUDA kernel's nf4_code_search) == the reference's
    count of midpoints below, on the values where a wrong threshold or level shows (every ISA runs it on
    the partial last block; the scalar level on every block)."""
    w = code_search_probe()
    for ww in (w, w[:-5]):  # the second ends in a partial block
        rp, _ = check_quantize(ww, 32)
        codes = ref.unpack_nf4_ref(rp, ww.numel()).long()
        mids = (F.NF4_TABLE[:-1] + F.NF4_TABLE[1:]) / 2
        assert torch.equal(codes, torch.bucketize(ww, mids).long())  # absmax 1: the codes of the values
        assert set(codes.tolist()) == set(range(16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_every_half_value(isa, dtype):
    """Every finite float16 / bfloat16 bit pattern as input (exercises the widening conversions)."""
    if dtype == torch.float32:
        bits = torch.randint(0, 2**31 - 1, (1 << 18,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
        w = bits.to(torch.int32).view(torch.float32)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    else:
        w = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    for bs in (32, 4096):
        for ww in (w, w[: w.numel() - 11]):  # with a partial block
            rp, ra = check_quantize(ww, bs)
            check_dequantize(rp, ra, ww.numel(), bs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_non_finite(isa, dtype):
    n = 10_000
    for positions, values in (([5], [float("nan")]), ([9_999, 17, 4_000], [float("inf"), float("-inf"), float("nan")]),
                              ([0], [float("inf")]), ([9_990], [float("-inf")])):  # fmt: skip
        w = weight((n,), dtype)
        for p, v in zip(positions, values):
            w[p] = v
        for bs in (32, 64, 4096):
            _, _, status = quantize(w, bs)
            assert status.tolist() == [len(positions), min(positions)]
    # status accumulates (+= count, min index) onto what the caller put there
    w = weight((n,), dtype)
    w[123] = float("nan")
    _, _, status = quantize(w, 64, status=torch.tensor([4, 50]))
    assert status.tolist() == [5, 50]
    _, _, status = quantize(w, 64, status=torch.tensor([0, 1000]))
    assert status.tolist() == [1, 123]


def test_cpu_thread_pool_is_torchs_openmp_runtime():
    """On Linux the kernels' chunks run on the OpenMP runtime torch loaded (its libgomp), not on threads of
    their own that would share cores with torch's spinning workers; 'threads' switches back."""
    if sys.platform.startswith("linux") and "libgomp" in open("/proc/self/maps").read():
        assert C.cpu_thread_pool().startswith("openmp ") and "libgomp" in C.cpu_thread_pool()
    assert C.set_cpu_thread_pool("threads") == "threads" == C.cpu_thread_pool()
    assert C.set_cpu_thread_pool("auto") != "threads" or "libgomp" not in open("/proc/self/maps").read()
    with pytest.raises(ValueError, match="'auto' or 'threads'"):
        C.set_cpu_thread_pool("tbb")


def _forked_child_dequantize(conn, packed, absmax, n):
    got = dequantize(packed, absmax, None, None, n, 64, torch.bfloat16, threads=2)
    conn.send((C.cpu_thread_pool(), got.view(torch.uint8).numpy().tobytes()))  # bytes: no tensor sharing
    conn.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + libgomp is the Linux case")
def test_forked_child_runs_on_its_own_threads():
    """libgomp's pool does not survive a fork (a child using it hangs): after the parent ran chunks on it, a
    forked child runs them on std::threads, and gets the same bits."""
    import multiprocessing as mp

    w = weight((1 << 19) + 5, torch.bfloat16, seed=4)
    n = w.numel()
    packed, absmax, _ = quantize(w, 64, threads=2)
    want = dequantize(packed, absmax, None, None, n, 64, torch.bfloat16, threads=2)  # the parent's pool is live
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_forked_child_dequantize, args=(child, packed, absmax, n))
    proc.start()
    try:
        assert parent.poll(60), "the forked child did not answer within 60 s (hung in the OpenMP runtime?)"
        pool, got = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert pool == "threads"
    assert got == want.view(torch.uint8).numpy().tobytes()


def test_threads_do_not_change_results(isa, pool):
    w = weight((1 << 20) + 37, torch.bfloat16, seed=3)
    n = w.numel()
    p1, a1, _ = quantize(w, 64, threads=1)
    for t in (0, 2, 3, 7, 64):
        p, a, s = quantize(w, 64, threads=t)
        assert_bits(p, p1)
        assert_bits(a, a1)
        assert s.tolist() == [0, n]
    d1 = dequantize(p1, a1, None, None, n, 64, torch.bfloat16, threads=1)
    for t in (2, 5):
        assert_bits(dequantize(p1, a1, None, None, n, 64, torch.bfloat16, threads=t), d1)


def test_misaligned_pointers(isa):
    """Inputs and outputs at odd byte offsets (the SIMD paths use unaligned accesses)."""
    n, bs = 4097, 64
    for dtype in DTYPES:
        buf = weight((n + 1,), dtype, seed=5)
        w = buf[1:]  # 2- or 4-byte offset from the allocation
        packed = torch.empty((n + 1) // 2 + 1, dtype=torch.uint8)[1:]
        absmax = torch.empty(nblocks(n, bs) + 1)[1:]
        status = torch.tensor([0, n])
        C.quantize_nf4_cpu(packed.data_ptr(), absmax.data_ptr(), status.data_ptr(), w.data_ptr(), n, bs, CODE[dtype], 2)
        rp, ra = ref.quantize_nf4_ref(w, bs)
        assert_bits(packed, rp)
        assert_bits(absmax, ra)
        out = torch.empty(n + 1, dtype=dtype)[1:]
        dequantize(packed, absmax, None, None, n, bs, dtype, out=out)
        assert_bits(out, ref.dequantize_nf4_ref(rp, ra, None, None, n, bs, dtype))


# ----------------------------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_dequantize_extreme_scales(isa, bs):
    """Random packed bytes with scales from float32 subnormal to 1e38: f16 overflow to inf, f16/bf16
    subnormal results, bf16 round-to-nearest-even ties."""
    g = torch.Generator().manual_seed(bs)
    nb = 97
    n = nb * bs - 3
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    exps = torch.randint(-149, 127, (nb,), generator=g).to(torch.float64)
    absmax = (torch.rand(nb, generator=g, dtype=torch.float64) + 1.0) * torch.pow(2.0, exps)
    absmax = absmax.to(torch.float32)
    absmax[:4] = torch.tensor([0.0, 65504.0, 2.0**-24, 1.0])
    check_dequantize(packed, absmax, n, bs)


# ----------------------------------------------------------------------------------------------- double quant
@pytest.mark.parametrize("nb", [1, 2, 255, 256, 257, 1000, 65536 + 13])
def test_double_quantize(isa, nb):
    g = torch.Generator().manual_seed(nb)
    absmax = torch.rand(nb, generator=g) * 2.0
    if nb > 300:
        absmax[256:512] = 0.7  # a constant group (centred values all equal, nonzero)
    cases = [absmax, absmax * 1e-30, absmax * 1e30, torch.full((nb,), 0.25)]
    for a in cases:
        codes, nested, offset = double_quantize(a)
        rc, rn, ro = ref.double_quantize_ref(a)
        assert_bits(offset, ro)
        assert_bits(codes, rc, "codes")
        assert_bits(nested, rn, "nested_absmax")
        assert_bits(double_dequantize(codes, nested, offset), ref.double_dequantize_ref(rc, rn, ro), "rebuilt scales")


def test_double_quantize_group_all_equal_to_offset(isa):
    """A group whose values all equal the offset: nested_absmax 0, every code 0."""
    a = torch.cat([torch.full((256,), 0.5), torch.tensor([0.25, 0.75] * 128)])
    codes, nested, offset = double_quantize(a)
    rc, rn, ro = ref.double_quantize_ref(a)
    assert offset.item() == 0.5 and nested[0].item() == 0.0 and int(codes[:256].max()) == 0
    assert_bits(codes, rc)
    assert_bits(nested, rn)


def test_double_dequantize_all_codes(isa):
    codes = torch.arange(256, dtype=torch.uint8).repeat(5)
    nested = torch.tensor([1.0, 3.3e-5, 7.5, 1e30, 2.0**-140])
    offset = torch.tensor(0.0123)
    assert_bits(double_dequantize(codes, nested, offset), ref.double_dequantize_ref(codes, nested, offset))


# ----------------------------------------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("n", [0, 1, 2, 3, 31, 32, 33, 4095, 4096, 200_001])
def test_pack_unpack(isa, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    C.pack_nf4_cpu(packed.data_ptr(), codes.data_ptr(), n, THREADS)
    assert_bits(packed, ref.pack_nf4_ref(codes))
    out = torch.empty(n, dtype=torch.uint8)
    C.unpack_nf4_cpu(out.data_ptr(), packed.data_ptr(), n, THREADS)
    assert_bits(out, codes)
    assert_bits(out, ref.unpack_nf4_ref(packed, n))
    # any byte value packs exactly as the reference's (c0 << 4) | c1 on uint8
    raw = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    C.pack_nf4_cpu(packed.data_ptr(), raw.data_ptr(), n, THREADS)
    assert_bits(packed, ref.pack_nf4_ref(raw))


# ----------------------------------------------------------------------------------------------- argument checks
def test_argument_errors():
    buf = torch.empty(4096)
    p = buf.data_ptr()
    with pytest.raises(ValueError, match="blocksize"):
        C.quantize_nf4_cpu(p, p, p, p, 64, 48, 0, 1)
    with pytest.raises(ValueError, match="blocksize"):
        C.dequantize_nf4_cpu(p, p, p, 0, 0, 0, 64, 8192, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        C.quantize_nf4_cpu(p, p, p, p, 64, 64, 3, 1)
    with pytest.raises(ValueError, match="out_dtype"):
        C.dequantize_nf4_cpu(p, p, p, 0, 0, 0, 64, 64, -1, 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.quantize_nf4_cpu(p, p, p, p, -1, 64, 0, 1)
    with pytest.raises(ValueError, match="w must not be a null pointer"):
        C.quantize_nf4_cpu(p, p, p, 0, 64, 64, 0, 1)
    with pytest.raises(ValueError, match="offset"):
        C.dequantize_nf4_cpu(p, p, p, p, 0, p, 64, 64, 0, 1)
    with pytest.raises(ValueError, match="nblocks"):
        C.double_quantize_cpu(p, p, p, p, p, -5, 1)
    with pytest.raises(ValueError, match="codes"):
        C.pack_nf4_cpu(p, 0, 10, 1)
    with pytest.raises(ValueError):
        C.set_cpu_isa("sse9")
    # n = 0 touches nothing, even with null pointers
    C.quantize_nf4_cpu(0, 0, 0, 0, 0, 64, 0, 1)
    C.dequantize_nf4_cpu(0, 0, 0, 0, 0, 0, 0, 64, 2, 1)
    C.double_quantize_cpu(0, 0, 0, 0, 0, 0, 1)
    C.double_dequantize_cpu(0, 0, 0, 0, 0, 0, 1)
    C.pack_nf4_cpu(0, 0, 0, 1)
    C.unpack_nf4_cpu(0, 0, 0, 1)


def test_cuda_entry_points_without_a_device():
    """Without CUDA compiled in, *_cuda raise RuntimeError; with CUDA but no device, a launch error is a
    RuntimeError too (never a crash), and argument errors come first either way."""
    if C.has_cuda() and C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: the gpu tests cover the CUDA entry points")
    with pytest.raises(RuntimeError, match="without CUDA" if not C.has_cuda() else "CUDA"):
        C.quantize_nf4_cuda(16, 16, 16, 16, 64, 64, 0, 0)
    with pytest.raises(RuntimeError):
        C.dequantize_nf4_cuda(16, 16, 16, 0, 0, 0, 64, 64, 2, 0)
    if C.has_cuda():
        with pytest.raises(ValueError, match="blocksize"):
            C.quantize_nf4_cuda(16, 16, 16, 16, 64, 48, 0, 0)
        C.quantize_nf4_cuda(0, 0, 0, 0, 0, 64, 0, 0)  # n = 0 launches nothing


# ----------------------------------------------------------------------------------------------- CUDA == CPU
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and C.has_cuda()), reason="needs a CUDA device and a CUDA build of _C")


def _stream():
    return torch.cuda.current_stream().cuda_stream


def cuda_quantize(w, bs, offset_bytes=0):
    flat = w.contiguous().reshape(-1)
    n = flat.numel()
    if offset_bytes:  # misaligned copies exercise the scalar (non-vectorized) path
        buf = torch.empty(n + 8, dtype=w.dtype, device="cuda")
        k = offset_bytes // w.element_size()
        buf[k : k + n] = flat
        flat = buf[k : k + n]
    packed = torch.full(((n + 1) // 2 + 16,), 0xAA, dtype=torch.uint8, device="cuda")[offset_bytes : offset_bytes + (n + 1) // 2]
    absmax = torch.full((nblocks(n, bs),), -7.0, device="cuda")
    status = torch.tensor([0, n], device="cuda")
    C.quantize_nf4_cuda(packed.data_ptr(), absmax.data_ptr(), status.data_ptr(), flat.data_ptr(), n, bs, CODE[w.dtype], _stream())
    torch.cuda.synchronize()
    return packed.cpu(), absmax.cpu(), status.cpu()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_quantize_dequantize_match_cpu(dtype, bs, shape):
    w = weight(shape, dtype, seed=bs, scale=2.0)
    n = w.numel()
    cp, ca, cs = quantize(w, bs)
    for off in (0, 2):
        gp, ga, gs = cuda_quantize(w.cuda(), bs, offset_bytes=off if dtype != torch.float32 else 4 * (off // 2))
        assert_bits(gp, cp, "cuda packed")
        assert_bits(ga, ca, "cuda absmax")
        assert gs.tolist() == cs.tolist()
    codes, nested, offset = double_quantize(ca) if n else (None, None, None)
    dmap = F.DYNAMIC_MAP.cuda()
    for dtype_out in DTYPES:
        for dq in (False, True):
            if dq and not n:
                continue
            a, ne, of = (codes, nested, offset) if dq else (ca, None, None)
            expected = dequantize(cp, a, ne, of, n, bs, dtype_out)
            for off in (0, 1):
                out = torch.empty(n + 8, dtype=dtype_out, device="cuda")[off : off + n]
                gpk = torch.empty(cp.numel() + 1, dtype=torch.uint8, device="cuda")[off : off + cp.numel()]
                gpk.copy_(cp)
                ga, gne, gof = a.cuda(), (ne.cuda() if dq else None), (of.cuda() if dq else None)
                C.dequantize_nf4_cuda(out.data_ptr(), gpk.data_ptr(), ga.data_ptr(), gne.data_ptr() if dq else 0,
                                      gof.data_ptr() if dq else 0, dmap.data_ptr(), n, bs, CODE[dtype_out], _stream())  # fmt: skip
                torch.cuda.synchronize()
                assert_bits(out.cpu(), expected, f"cuda dequant {dtype_out} dq={dq} off={off}")


@pytest.mark.gpu
@gpu
def test_cuda_code_search_matches_cpu():
    """The CUDA quantize kernel's code search == the CPU's on the values next to every midpoint."""
    w = code_search_probe()
    for ww in (w, w[:-5]):
        cp, ca, _ = quantize(ww, 32)
        gp, ga, _ = cuda_quantize(ww.cuda(), 32)
        assert_bits(gp, cp, "cuda packed")
        assert_bits(ga, ca, "cuda absmax")


def _deq_cuda(packed, a, ne, of, n, bs, dtype, out_off=0, packed_off=0):
    out = torch.empty(n + 8, dtype=dtype, device="cuda")[out_off : out_off + n]
    gpk = torch.empty(packed.numel() + 16, dtype=torch.uint8, device="cuda")[packed_off : packed_off + packed.numel()]
    gpk.copy_(packed)
    ga = a.cuda()
    gne, gof = (ne.cuda(), of.cuda()) if ne is not None else (None, None)
    C.dequantize_nf4_cuda(out.data_ptr(), gpk.data_ptr(), ga.data_ptr(), 0 if gne is None else gne.data_ptr(),
                          0 if gof is None else gof.data_ptr(), F.DYNAMIC_MAP.cuda().data_ptr(), n, bs,
                          CODE[dtype], _stream())  # fmt: skip
    torch.cuda.synchronize()
    return out.cpu()


# sizes around the 1024-value warp tile, and enough tiles that warps take 2..4 of them (grid-stride: beyond one
# wave of 8 CTAs x 8 warps per SM: > 8.7M values on an H200)
DEQ_TILE_SIZES = [1, 31, 33, 1023, 1024, 1025, 2048 + 64, 8192 * 8 + 7, 3 * (1 << 22) + 1000, 40_000_000 + 77]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", DEQ_TILE_SIZES)
def test_cuda_dequantize_tiles_match_cpu(n):
    """The tiled CUDA dequantize == the CPU kernel bit for bit: every byte value (all code pairs), zero blocks,
    the largest and smallest scales, plain and double-quantized, every output dtype, aligned and not."""
    g = torch.Generator().manual_seed(n)
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    packed[: min(256, packed.numel())] = torch.arange(min(256, packed.numel()), dtype=torch.uint8)
    for bs in (32, 64, 4096):
        nb = nblocks(n, bs)
        absmax = torch.rand(nb, generator=g) * 4
        absmax[::7] = 0.0  # zero blocks
        absmax[1::11] = 3.0e38  # the largest: fp16/bf16 outputs overflow exactly as on the CPU
        absmax[2::13] = 1e-38  # subnormal-range products
        absmax[3::17] = float.fromhex("0x1p-149")
        big = n > 1_000_000
        for dtype in DTYPES if not big else (torch.bfloat16, torch.float32):
            for dq in (False, True):
                if dq:
                    finite = absmax.clamp(max=1e30)  # the double-quant mean must not overflow
                    a, ne, of = double_quantize(finite)
                else:
                    a, ne, of = absmax, None, None
                expected = dequantize(packed, a, ne, of, n, bs, dtype)
                for off in ((0, 0), (1, 0), (0, 1)) if not big else ((0, 0),):
                    got = _deq_cuda(packed, a, ne, of, n, bs, dtype, *off)
                    assert_bits(got, expected, f"n={n} bs={bs} {dtype} dq={dq} misalign={off}")
            if big:
                break


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_adversarial_and_non_finite(dtype):
    fi = torch.finfo(dtype)
    vals = torch.tensor([1.0, -1.0, 0.0, 1e-40, fi.tiny / 4, fi.max / 2] + ((F.NF4_TABLE[:-1] + F.NF4_TABLE[1:]) / 2).tolist())
    w = vals.repeat(300)[: 4096 * 3 + 77].to(dtype)
    w[4096:8192] = 0
    for bs in BLOCKSIZES:
        cp, ca, _ = quantize(w, bs)
        gp, ga, _ = cuda_quantize(w.cuda(), bs)
        assert_bits(gp, cp)
        assert_bits(ga, ca)
    w = weight((100_000,), dtype)
    for p, v in ((99_999, float("inf")), (77_000, float("nan")), (31, float("-inf"))):
        w[p] = v
    for bs in (32, 256, 4096):
        _, _, gs = cuda_quantize(w.cuda(), bs)
        assert gs.tolist() == [3, 31]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nb", [1, 255, 256, 257, 100_003])
def test_cuda_double_quant_match_cpu(nb):
    absmax = torch.rand(nb, generator=torch.Generator().manual_seed(nb)) * 3
    codes, nested, offset = double_quantize(absmax)
    g = absmax.cuda()
    goff = offset.cuda()
    gcodes = torch.empty(nb, dtype=torch.uint8, device="cuda")
    gnested = torch.empty(nblocks(nb, 256), device="cuda")
    C.double_quantize_cuda(gcodes.data_ptr(), gnested.data_ptr(), g.data_ptr(), goff.data_ptr(),
                           F.DYNAMIC_LUT.cuda().data_ptr(), nb, _stream())  # fmt: skip
    out = torch.empty(nb, device="cuda")
    C.double_dequantize_cuda(out.data_ptr(), gcodes.data_ptr(), gnested.data_ptr(), goff.data_ptr(),
                             F.DYNAMIC_MAP.cuda().data_ptr(), nb, _stream())  # fmt: skip
    torch.cuda.synchronize()
    assert_bits(gcodes.cpu(), codes)
    assert_bits(gnested.cpu(), nested)
    assert_bits(out.cpu(), double_dequantize(codes, nested, offset))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 4095, 200_001])
def test_cuda_pack_unpack_match_cpu(n):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    expected = ref.pack_nf4_ref(codes)
    for off in (0, 1):
        gc = torch.empty(n + 1, dtype=torch.uint8, device="cuda")[off : off + n]
        gc.copy_(codes)
        gp = torch.empty((n + 1) // 2, dtype=torch.uint8, device="cuda")
        C.pack_nf4_cuda(gp.data_ptr(), gc.data_ptr(), n, _stream())
        back = torch.empty(n + 1, dtype=torch.uint8, device="cuda")[off : off + n]
        C.unpack_nf4_cuda(back.data_ptr(), gp.data_ptr(), n, _stream())
        torch.cuda.synchronize()
        assert_bits(gp.cpu(), expected)
        assert_bits(back.cpu(), codes)
