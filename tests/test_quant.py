"""NF4 quantize / dequantize / double quantization: bit-exact against bitsandbytes 0.50.2 and the reference.

Every op runs on each backend that is live here ("auto" = native _C when built, "reference" = pure PyTorch).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference as ref
from qlora_kernels._format import DYNAMIC_LUT, DYNAMIC_MAP, NF4_TABLE, VALID_BLOCKSIZES

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF
    from bnb_oracle import dequantize_bnb

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd n, K % blocksize != 0, a single value, rows shorter than a block, a 2-D weight with a partial last block
SHAPES = [(1,), (7, 9), (33, 70), (64, 128), (300, 257), (5, 4096)]


@pytest.fixture(params=["auto", "reference"])
def backend(request):
    qk.set_backend(request.param)
    yield request.param
    qk.set_backend(None)


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    if flat.numel() > 200:
        flat[64:128] = 0  # an all-zero block
        flat[130] = flat[131:190].abs().max() * -1.0  # a value exactly at -absmax
    return w.to(dtype)


def _bnb_quantize(w, blocksize, double_quant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _bnb_dequantize_exact(q, st):
    """The format's definition from bitsandbytes' bytes and quant state (tests/bnb_oracle.py): its native CPU
    dequantize is wrong on AVX-512 CPUs when blocks straddle rows, so it is no oracle on every CPU."""
    return dequantize_bnb(q, st)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_with_bitsandbytes(shape, dtype, blocksize, double_quant, backend):
    w = _weight(shape, dtype)
    q = qk.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    bq, st = _bnb_quantize(w, blocksize, double_quant)
    assert q.packed.shape == bq.shape and torch.equal(q.packed, bq), "packed bytes differ from bitsandbytes"
    assert torch.equal(q.absmax, st.absmax), "scales (or scale codes) differ from bitsandbytes"
    if double_quant:
        assert torch.equal(q.nested_absmax, st.state2.absmax)
        assert torch.equal(q.offset, st.offset.reshape(()))
        assert torch.equal(q.nested_quant_map, st.state2.code)
    assert torch.equal(q.quant_map, st.code)
    out = q.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, _bnb_dequantize_exact(bq, st)), "dequantized values differ from bitsandbytes"


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_any_dtype_matches_reference(out_dtype, double_quant, backend):
    w = _weight((129, 67), torch.float32, seed=1)
    q = qk.quantize_nf4(w, blocksize=32, double_quant=double_quant)
    expect = ref.dequantize_nf4_ref(q.packed, q.absmax, q.nested_absmax, q.offset, w.numel(), 32, out_dtype)
    assert torch.equal(q.dequantize(out_dtype), expect.view(w.shape))


def test_dequantize_into_reused_buffer(backend):
    q = qk.quantize_nf4(_weight((40, 100), torch.float32), blocksize=64)
    out = torch.full((40, 100), float("nan"), dtype=torch.bfloat16)
    assert q.dequantize(out=out) is not None and torch.equal(out, q.dequantize(torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous with 4000 elements"):
        q.dequantize(out=torch.empty(10, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="disagrees"):
        q.dequantize(torch.float32, out=out)
    torch.library.opcheck(torch.ops.qlora.dequantize_nf4_out.default,
                          (out.view(-1), q.packed.view(-1), q.absmax, q.nested_absmax, q.offset, 4000, 64))


def test_adversarial_values_match_reference(backend):
    """Values exactly on NF4 midpoints (times absmax), exactly +-absmax, tiny and huge magnitudes."""
    mids = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2).repeat(4)  # 60 values
    scale = torch.tensor([1e-30, 3.0, 1e30, 0.5]).repeat_interleave(15)
    w = torch.cat([mids * scale, torch.tensor([1.0, -1.0, 0.0, 1e-45])])  # 64 values; last block partial below
    w = torch.cat([w, w[:37] * 7.0])
    for blocksize in (32, 64):
        q = qk.quantize_nf4(w, blocksize=blocksize, double_quant=False)
        packed, absmax = ref.quantize_nf4_ref(w, blocksize)
        assert torch.equal(q.packed.view(-1), packed) and torch.equal(q.absmax, absmax)
        bq, st = _bnb_quantize(w, blocksize, False)
        assert torch.equal(q.packed, bq) and torch.equal(q.absmax, st.absmax)


def _div_rcp_straddlers(amax: float) -> torch.Tensor:
    """float32 values w next to (NF4 midpoint) * amax whose code differs between w / amax (true division) and
    w * (1 / amax) (reciprocal multiply). Empty when amax has none."""
    mids = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
    a = torch.tensor(amax, dtype=torch.float32)
    centre = (mids * a).view(torch.int32)
    cands = torch.cat([(centre + k).view(torch.float32) for k in range(-3, 4)])
    cands = cands[cands.abs() <= a]
    return cands[torch.bucketize(cands / a, mids) != torch.bucketize(cands * (1.0 / a), mids)]


def _codes(w: torch.Tensor, inv_scale: torch.Tensor, divide: bool) -> torch.Tensor:
    mids = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
    scaled = w / inv_scale if divide else w * (1.0 / inv_scale)
    return torch.bucketize(torch.clamp(scaled, -1, 1), mids)


@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_division_rules_match_bitsandbytes(blocksize, backend):
    """bitsandbytes' CPU quantize multiplies full blocks by the reciprocal of absmax and divides the partial last
    block by it. The weight holds values where the two rules give different codes, in full blocks and in the
    partial last block, and is compared with bitsandbytes directly (not only with our own reference)."""
    full_blocks, found = [], 0
    for amax in torch.linspace(0.3, 9.7, 60).tolist():
        vals = _div_rcp_straddlers(amax)
        if vals.numel():
            found += vals.numel()
            block = torch.cat([torch.tensor([torch.tensor(amax, dtype=torch.float32).item()]), vals])
            full_blocks.append(block.repeat(blocksize)[:blocksize])
    assert found > 20
    amax_tail = 0.30000001192092896  # float32(0.3): its straddlers below are checked, not assumed
    tail_vals = _div_rcp_straddlers(amax_tail)
    tail = torch.cat([torch.tensor([amax_tail]), tail_vals, torch.randn(5) * 0.01])[: blocksize - 1]
    w = torch.cat(full_blocks + [tail])
    # the input exercises both rules: each rule applied to the wrong block kind changes some code
    head = torch.stack(full_blocks)
    head_amax = head.abs().amax(1, keepdim=True)
    assert (_codes(head, head_amax, divide=True) != _codes(head, head_amax, divide=False)).any()
    t_amax = tail.abs().max()
    assert (_codes(tail, t_amax, divide=True) != _codes(tail, t_amax, divide=False)).sum() >= 3
    assert w.numel() % blocksize != 0
    for shape in ((w.numel(),), (1, w.numel())):
        ww = w.reshape(shape)
        q = qk.quantize_nf4(ww, blocksize=blocksize, double_quant=False)
        bq, st = _bnb_quantize(ww, blocksize, False)
        assert torch.equal(q.absmax, st.absmax)
        assert torch.equal(q.packed, bq), "NF4 codes differ from bitsandbytes where divide and reciprocal differ"
    q = qk.quantize_nf4(w, blocksize=blocksize, double_quant=True)
    bq, st = _bnb_quantize(w, blocksize, True)
    assert torch.equal(q.packed, bq) and torch.equal(q.absmax, st.absmax)
    assert torch.equal(q.dequantize(), _bnb_dequantize_exact(bq, st))


def test_double_quant_constant_and_zero_scales(backend):
    """A nested block whose centred scales are all zero encodes to code 0 (bitsandbytes' CPU rule)."""
    w = torch.full((4, 256), 0.25)
    q = qk.quantize_nf4(w, blocksize=64)
    bq, st = _bnb_quantize(w, 64, True)
    assert torch.equal(q.absmax, st.absmax) and torch.equal(q.nested_absmax, st.state2.absmax)
    assert torch.equal(q.dequantize(), _bnb_dequantize_exact(bq, st))


def test_tables_match_bitsandbytes():
    assert torch.equal(NF4_TABLE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP, bnbF.create_dynamic_map(signed=True))
    assert NF4_TABLE[7] == 0 and NF4_TABLE[0] == -1 and NF4_TABLE[15] == 1
    assert DYNAMIC_LUT.dtype == torch.uint8 and DYNAMIC_LUT.numel() == 65536


@pytest.mark.parametrize("n", [0, 1, 2, 3, 64, 65, 1001])
def test_pack_unpack_roundtrip(n, backend):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = qk.pack_nf4(codes)
    assert packed.shape == ((n + 1) // 2,)
    assert torch.equal(packed, ref.pack_nf4_ref(codes))
    if n % 2:
        assert int(packed[-1]) & 0xF == 7  # odd counts pad with the NF4 zero code
    assert torch.equal(qk.unpack_nf4(packed, n), codes)
    if n >= 2:
        assert int(packed[0]) == (int(codes[0]) << 4) | int(codes[1])  # first value in the high nibble


def test_double_quantize_roundtrip(backend):
    absmax = torch.rand(1000) * 0.1 + 0.01
    codes, nested, offset = qk.double_quantize(absmax)
    assert codes.dtype == torch.uint8 and nested.shape == (4,) and offset.shape == ()
    rebuilt = qk.double_dequantize(codes, nested, offset)
    assert torch.equal(rebuilt, ref.double_dequantize_ref(codes, nested, offset))
    assert (rebuilt - absmax).abs().max() < 0.01 * absmax.abs().max()
    qb, st2 = bnbF.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(codes, qb) and torch.equal(nested, st2.absmax)


def test_empty_and_noncontiguous(backend):
    q = qk.quantize_nf4(torch.empty(0, 16), blocksize=64)
    assert q.packed.numel() == 0 and q.dequantize().shape == (0, 16)
    w = _weight((96, 80), torch.float16).t()  # non-contiguous
    q = qk.quantize_nf4(w, blocksize=64)
    bq, st = _bnb_quantize(w.contiguous(), 64, True)
    assert torch.equal(q.packed, bq) and q.dequantize().shape == w.shape


def test_bits_per_param_and_nbytes():
    q = qk.quantize_nf4(torch.randn(1024, 1024), blocksize=64, double_quant=True)
    n = 1024 * 1024
    assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-9)  # + the offset
    q = qk.quantize_nf4(torch.randn(1024, 1024), blocksize=64, double_quant=False)
    assert q.bits_per_param == pytest.approx(4.5)
    assert q.nbytes == 1024 * 1024 // 2 + 4 * 1024 * 1024 // 64


# ------------------------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_keys_and_roundtrip(double_quant, dtype):
    w = _weight((64, 192), dtype)
    q = qk.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    sd = q.state_dict()
    bq, st = _bnb_quantize(w, 64, double_quant)
    expect = {"weight": bq, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
    assert set(sd) == set(expect)
    for k in expect:
        if k.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(sd[k].tolist())) == json.loads(bytes(expect[k].tolist()))
        else:
            assert torch.equal(sd[k], expect[k]), k
    back = qk.NF4Weight.from_state_dict(sd)
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_linear4bit_checkpoint_loads_here_and_ours_loads_there(double_quant):
    lin = torch.nn.Linear(128, 48, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bl = bnb.nn.Linear4bit(128, 48, bias=False, compress_statistics=double_quant, quant_type="nf4",
                               compute_dtype=torch.float32)
        bl.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=double_quant, blocksize=64)
        bl = bl.to("cpu")  # Params4bit quantizes on its first move to a device
    assert bl.weight.bnb_quantized
    sd = bl.state_dict()
    ours = qk.NF4Weight.from_state_dict(sd)
    # bitsandbytes' own dequantize as a second witness: K = 128 is whole blocks, where its AVX-512 and scalar
    # CPU kernels both compute the definition (they part only for blocks straddling rows)
    bnb_deq = bnbF.dequantize_4bit(bl.weight.data, bl.weight.quant_state)
    assert torch.equal(ours.dequantize(torch.float32), dequantize_bnb(bl)) and torch.equal(bnb_deq, dequantize_bnb(bl))
    # and ours into bitsandbytes
    q = qk.quantize_nf4(lin.weight.data, blocksize=64, double_quant=double_quant)
    ours_sd = q.state_dict()
    qs = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in ours_sd.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(ours_sd["weight"], qs), q.dequantize())
    state = {k[len("weight."):]: v for k, v in ours_sd.items() if k != "weight"}
    p4 = bnb.nn.Params4bit.from_prequantized(ours_sd["weight"], state, device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(p4.data, p4.quant_state), q.dequantize())


def test_state_dict_errors():
    q = qk.quantize_nf4(torch.randn(64, 64))
    sd = q.state_dict()
    bad = dict(sd)
    del bad["weight.absmax"]
    with pytest.raises(KeyError, match="missing"):
        qk.NF4Weight.from_state_dict(bad)
    bad = dict(sd, **{"weight.surprise": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected"):
        qk.NF4Weight.from_state_dict(bad)
    bad = dict(sd, weight=sd["weight"][:10])
    with pytest.raises(ValueError, match="too short"):
        qk.NF4Weight.from_state_dict(bad)
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:3]})
    with pytest.raises(ValueError, match="absmax must have"):
        qk.NF4Weight.from_state_dict(bad)
    bad = {k: v for k, v in sd.items() if "quant_state" not in k}
    with pytest.raises(KeyError, match="bitsandbytes__nf4"):
        qk.NF4Weight.from_state_dict(bad)
    bad = dict(sd, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)})
    with pytest.raises(ValueError, match="JSON"):
        qk.NF4Weight.from_state_dict(bad)


def test_state_dict_rejects_foreign_code_maps():
    """A state dict whose quant_map / nested_quant_map is not the NF4 table / signed dynamic map (fp4, another
    code book, one value nudged by an ulp) would dequantize to other values: it is refused, not ignored."""
    sd = qk.quantize_nf4(torch.randn(64, 64), double_quant=True).state_dict()
    qk.NF4Weight.from_state_dict(sd)  # the genuine maps load
    nudged = NF4_TABLE.clone()
    nudged[3] = torch.nextafter(nudged[3], torch.tensor(0.0))
    for bad in (bnbF.get_4bit_type("fp4", device="cpu"), nudged, torch.linspace(-1, 1, 16)):
        with pytest.raises(ValueError, match="weight.quant_map is not the NF4 table"):
            qk.NF4Weight.from_state_dict(dict(sd, **{"weight.quant_map": bad}))
    nudged = DYNAMIC_MAP.clone()
    nudged[200] = torch.nextafter(nudged[200], torch.tensor(2.0))
    for bad in (bnbF.create_dynamic_map(signed=False), nudged):
        with pytest.raises(ValueError, match="weight.nested_quant_map is not the signed dynamic map"):
            qk.NF4Weight.from_state_dict(dict(sd, **{"weight.nested_quant_map": bad}))


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    with pytest.raises(TypeError, match="w must be float32, float16 or bfloat16"):
        qk.quantize_nf4(torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        qk.quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qk.quantize_nf4(torch.ones(8), blocksize=48)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qk.quantize_nf4(torch.ones(8), blocksize=8192)
    with pytest.raises(TypeError, match="dtype must be"):
        qk.quantize_nf4(torch.ones(64)).dequantize(torch.int8)
    with pytest.raises(TypeError, match="q must be an NF4Weight"):
        qk.dequantize_nf4(torch.ones(3))
    with pytest.raises(ValueError, match="0..15"):
        qk.pack_nf4(torch.tensor([1, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="too short"):
        qk.unpack_nf4(torch.zeros(2, dtype=torch.uint8), 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_reported(bad, backend):
    w = torch.randn(10, 20)
    w[3, 7] = bad
    w[8, 1] = bad
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*index \(3, 7\)"):
        qk.quantize_nf4(w)


def test_huge_scales_refuse_double_quant():
    w = torch.full((4, 64), 3e38)
    with pytest.raises(ValueError, match="double_quant=False"):
        qk.quantize_nf4(w, double_quant=True)
    assert torch.equal(qk.quantize_nf4(w, double_quant=False).dequantize(), w)


def test_device_mix_is_rejected():
    q = qk.quantize_nf4(torch.randn(64, 64))
    with pytest.raises(ValueError, match="share one device"):
        qk.NF4Weight(q.packed, q.absmax.to("meta"), shape=q.shape, dtype=q.dtype, blocksize=64,
                     nested_absmax=q.nested_absmax, offset=q.offset)


# ---------------------------------------------------------------------------------------- op contract
def test_opcheck_every_quant_op(backend):
    w = torch.randn(33, 70)
    packed, absmax = torch.ops.qlora.quantize_nf4(w, 64)
    codes, nested, offset = torch.ops.qlora.double_quantize(absmax)
    cases = [
        (torch.ops.qlora.quantize_nf4.default, (w, 64)),
        (torch.ops.qlora.double_quantize.default, (absmax,)),
        (torch.ops.qlora.double_dequantize.default, (codes, nested, offset)),
        (torch.ops.qlora.dequantize_nf4.default, (packed, absmax, None, None, w.numel(), 64, torch.bfloat16)),
        (torch.ops.qlora.dequantize_nf4.default, (packed, codes, nested, offset, w.numel(), 64, torch.float16)),
        (torch.ops.qlora.pack_nf4.default, (torch.randint(0, 16, (9,), dtype=torch.uint8),)),
        (torch.ops.qlora.unpack_nf4.default, (packed, w.numel())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_fullgraph_quantize_dequantize(backend):
    def roundtrip(w):
        q = qk.quantize_nf4(w, blocksize=64, double_quant=True)
        return q.dequantize(torch.float32)

    w = torch.randn(48, 100)
    compiled = torch.compile(roundtrip, fullgraph=True)  # default inductor backend
    assert torch.equal(compiled(w), roundtrip(w))


def test_backend_info():
    info = qk.backend_info()
    for key in ("native_cpu", "native_cuda", "cuda_archs", "triton", "reference", "torch"):
        assert key in info
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.set_backend("fastest")
