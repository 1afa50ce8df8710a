"""QLoRALinear: construction, scaling, merged weight, state dicts (bitsandbytes keys), .to(), and agreement with
bitsandbytes Linear4bit + PEFT LoRA on the same NF4 weight and the same A, B (numerics and saved bytes)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

from qlora_kernels import QLoRALinear, quantize_nf4  # noqa: E402
from qlora_kernels.memory import saved_for_backward_bytes  # noqa: E402
from qlora_kernels.nn import BnbRepackedError, nf4_weight_from_bnb  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from bnb_oracle import bnb_scales, dequantize_bnb, repack_like_bnb_forward  # noqa: E402


def make_linear(n=48, k=192, bias=True, dtype=torch.float32, seed=0):
    # K a multiple of the blocksize: bitsandbytes 0.50.2's AVX-512 CPU nf4 dequantize restarts blocks at each
    # row (the format's blocks run over the flat weight), so it disagrees with the format when K % 64 != 0.
    # Its Linear4bit layers here stay on its standard path on every CPU: train mode (nn.Module's default) or
    # inputs that require grad; its eval forward without grad repacks them on AVX512-BF16 CPUs (bnb_oracle.py).
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def randomize_adapters(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.2)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    return layer


def test_from_linear_init_and_scaling():
    lin = make_linear()
    layer = QLoRALinear.from_linear(lin, r=8, alpha=32)
    assert layer.scaling == 4.0 and layer.r == 8
    assert QLoRALinear.from_linear(lin, r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform(a=sqrt(5)) on [r, K]
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(5, lin.in_features)
    expected = x @ layer.weight.dequantize(torch.float32).t() + lin.bias
    torch.testing.assert_close(layer(x), expected)  # B = 0: the adapter starts as a no-op
    text = repr(layer)
    assert "in_features=192, out_features=48" in text and "r=8, alpha=32, scaling=4" in text
    assert "nf4(blocksize=64, double_quant" in text


def test_constructor_errors():
    w = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"rank r must be an int >= 1, got 0"):
        QLoRALinear(w, r=0)
    with pytest.raises(ValueError, match=r"dropout must be a probability"):
        QLoRALinear(w, dropout=1.5)
    with pytest.raises(TypeError, match=r"weight must be an NF4Weight"):
        QLoRALinear(torch.randn(8, 64))
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear"):
        QLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


def test_merged_weight():
    layer = randomize_adapters(QLoRALinear.from_linear(make_linear(), r=4, alpha=8))
    x = torch.randn(6, 192)
    merged = layer.merged_weight(torch.float32)
    expected = layer.weight.dequantize(torch.float32) + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(layer(x), x @ merged.t() + layer.bias, rtol=1e-5, atol=1e-5)
    assert layer.merged_weight(torch.bfloat16).dtype == torch.bfloat16


def test_state_dict_keys_and_roundtrip():
    layer = randomize_adapters(QLoRALinear.from_linear(make_linear(), r=4))
    sd = layer.state_dict()
    assert list(sd) == [
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A.weight", "lora_B.weight",
    ]
    fresh = QLoRALinear.from_linear(make_linear(seed=5), r=4)  # different base and adapters
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 192)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert torch.equal(fresh.weight_packed, layer.weight_packed)
    # a plain nn.Linear state dict loads too (quantized on load, same bits as from_linear)
    lin = make_linear(seed=9)
    fresh.load_state_dict(lin.state_dict(), strict=False)
    assert torch.equal(fresh.weight_packed, QLoRALinear.from_linear(lin).weight_packed)


def test_state_dict_errors():
    layer = QLoRALinear.from_linear(make_linear(), r=4)
    sd = QLoRALinear.from_linear(make_linear(n=40), r=4).state_dict()
    with pytest.raises(RuntimeError, match=r"NF4 weight has shape \[40, 192\], this layer is \[48, 192\]"):
        layer.load_state_dict(sd)
    sd = layer.state_dict()
    del sd["weight"], sd["weight.absmax"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight\""):
        layer.load_state_dict({k: v for k, v in sd.items() if not k.startswith("weight")})


def test_state_dict_interop_with_bitsandbytes():
    lin = make_linear()
    b4 = bnb.nn.Linear4bit(192, 48, bias=True, compress_statistics=True, quant_type="nf4",
                           compute_dtype=torch.float32)
    b4.load_state_dict(lin.state_dict())
    b4 = b4.to("cpu")  # bitsandbytes quantizes here
    layer = QLoRALinear.from_linear(lin, r=4)
    bsd = b4.state_dict()
    osd = layer.state_dict()
    for key, t in bsd.items():
        assert torch.equal(t, osd[key]), key
    # bitsandbytes -> ours and ours -> bitsandbytes
    fresh = QLoRALinear.from_linear(make_linear(seed=3), r=4)
    fresh.load_state_dict(bsd, strict=False)
    x = torch.randn(4, 192)
    torch.testing.assert_close(fresh(x), b4(x))
    # bitsandbytes reads a quantized checkpoint through Params4bit.from_prequantized (as transformers does)
    b4b = bnb.nn.Linear4bit(192, 48, bias=True, compress_statistics=True, quant_type="nf4",
                            compute_dtype=torch.float32)
    stats = {k[len("weight."):]: v for k, v in osd.items() if k.startswith("weight.")}
    b4b.weight = bnb.nn.Params4bit.from_prequantized(osd["weight"], stats, device="cpu", module=b4b)
    b4b.bias.data = osd["bias"]
    torch.testing.assert_close(b4b(x), layer(x))


def test_from_bnb_shares_the_nf4_tensors():
    lin = make_linear()
    b4 = bnb.nn.Linear4bit(192, 48, bias=True, compress_statistics=True, quant_type="nf4",
                           compute_dtype=torch.float32)
    b4.load_state_dict(lin.state_dict())
    unquantized = QLoRALinear.from_bnb(b4, r=4)  # not yet quantized: quantized here, same bits
    b4 = b4.to("cpu")
    layer = QLoRALinear.from_bnb(b4, r=4, alpha=8)
    assert layer.weight_packed.data_ptr() == b4.weight.data.data_ptr()  # no dequantize / requantize
    assert torch.equal(unquantized.weight_packed, layer.weight_packed)
    assert torch.equal(unquantized.weight_absmax, layer.weight_absmax)
    x = torch.randn(4, 192)
    torch.testing.assert_close(layer(x), b4(x))
    fp4 = bnb.nn.Linear4bit(192, 48, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match=r"only nf4"):
        QLoRALinear.from_bnb(fp4)


# ---------------------------------------------------------- layers bitsandbytes repacked for its CPU kernel
def _bnb4(n, k, double_quant, storage=torch.uint8):
    b4 = bnb.nn.Linear4bit(k, n, bias=True, compress_statistics=double_quant, quant_type="nf4",
                           compute_dtype=torch.float32, quant_storage=storage)
    b4.load_state_dict(make_linear(n=n, k=k).state_dict())
    return b4.to("cpu")  # bitsandbytes quantizes here


def _takeovers():
    """Every function that takes a bitsandbytes layer over (prepare_model: test_prepare_model.py)."""
    from qlora_kernels import nn as qnn

    out = [nf4_weight_from_bnb, QLoRALinear.from_bnb]
    return out + [qnn.NF4Linear.from_bnb] if hasattr(qnn, "NF4Linear") else out


REPACKED = r"Linear4bit\(out_features=64, in_features=192\): bitsandbytes repacked this layer for its CPU kernel " \
           r"during an inference forward \(eval mode, no grad, on a CPU with AVX512-BF16\).*load_pretrained.*train mode"


@pytest.mark.parametrize("converted_back", [False, True], ids=["repacked", "converted-back"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
def test_from_bnb_refuses_a_layer_bitsandbytes_repacked(double_quant, storage, converted_back):
    """The layer as Linear4bit.forward leaves it on an AVX512-BF16 CPU (repacked here on any CPU), and after
    bitsandbytes converted its layout back (its state_dict() does): the scales were re-rounded to bf16 either
    way, so every take-over refuses it, naming the layer, the cause and the ways out."""
    b4 = _bnb4(64, 192, double_quant, storage)
    scales = bnb_scales(b4.weight.quant_state).clone()
    repack_like_bnb_forward(b4)
    qs = b4.weight.quant_state
    assert qs.packing_format_for_cpu and qs.absmax.dtype == torch.bfloat16 and not qs.nested
    if converted_back:
        b4.state_dict()
        assert not qs.packing_format_for_cpu and qs.nested == double_quant
        if double_quant:  # re-quantized from the bf16-rounded scales: would pass every format check, wrongly
            assert qs.absmax.dtype == torch.uint8 and not torch.equal(bnb_scales(qs), scales)
    what = "converted back to the standard layout" if converted_back else "packing_format_for_cpu is set"
    for take_over in _takeovers():
        with pytest.raises(BnbRepackedError, match=REPACKED) as err:
            take_over(b4)
        assert what in str(err.value) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("n, k, fails_at", [(64, 96, "invalid for input of size"), (48, 192, "divisible by block_n")])
def test_from_bnb_after_bitsandbytes_failed_to_repack(n, k, fails_at, double_quant):
    """bitsandbytes' eval forward crashes on an AVX512-BF16 CPU when its repack cannot lay the weight out:
    in_features % blocksize != 0 fails after the nested scales were dequantized and dropped (refused: their
    codes are gone); out_features % 32 != 0 fails before any change (taken over: the bytes and scales are the
    original ones, checked against the format's definition)."""
    b4 = _bnb4(n, k, double_quant)
    packed, want = b4.weight.data.clone(), dequantize_bnb(b4)
    with pytest.raises((RuntimeError, AssertionError), match=fails_at):
        repack_like_bnb_forward(b4)
    if double_quant and k % 64:
        assert not b4.weight.quant_state.nested
        for take_over in _takeovers():
            with pytest.raises(BnbRepackedError, match="failed half-way"):
                take_over(b4)
        return
    for take_over in _takeovers():
        got = take_over(b4)
        got = getattr(got, "weight", got)
        assert torch.equal(got.packed.view(-1), packed.view(-1)) and torch.equal(got.dequantize(), want)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                    reason="bitsandbytes repacks in Linear4bit.forward only on CPUs with AVX512-BF16")
def test_repack_helper_is_what_bitsandbytes_forward_does():
    """Where bitsandbytes' own eval forward repacks, it leaves the layer as repack_like_bnb_forward does (the
    helper the tests above use on every CPU), and the take-over refuses it."""
    ours, theirs = _bnb4(64, 192, True), _bnb4(64, 192, True)
    repack_like_bnb_forward(ours)
    with torch.no_grad():
        theirs.eval()(torch.randn(2, 192))
    a, b = ours.weight.quant_state, theirs.weight.quant_state
    assert torch.equal(ours.weight.data, theirs.weight.data) and torch.equal(a.absmax, b.absmax)
    assert (a.packing_format_for_cpu, a.nested, a.dtype) == (b.packing_format_for_cpu, b.nested, b.dtype)
    with pytest.raises(BnbRepackedError, match=REPACKED):
        QLoRALinear.from_bnb(theirs)


def test_to_dtype_keeps_the_format():
    layer = QLoRALinear.from_linear(make_linear(), r=4)
    packed, absmax = layer.weight_packed.clone(), layer.weight_absmax.clone()
    nested, offset = layer.weight_nested_absmax.clone(), layer.weight_offset.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.lora_A.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.weight_nested_absmax.dtype == layer.weight_offset.dtype == torch.float32
    assert torch.equal(layer.weight_nested_absmax, nested) and torch.equal(layer.weight_offset, offset)
    assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_absmax, absmax)
    assert layer(torch.randn(2, 192, dtype=torch.bfloat16)).dtype == torch.bfloat16
    single = QLoRALinear.from_linear(make_linear(), r=4, double_quant=False).half()
    # float32 scales are stored as their bytes in a uint8 parameter (FSDP2 shards it; no cast can touch it)
    assert single.weight_absmax.dtype == torch.uint8 and single.weight.absmax.dtype == torch.float32
    assert layer.to("meta").weight_packed.device.type == "meta"


# ------------------------------------------------------------------------------- against bitsandbytes + PEFT
class Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def bnb_peft_layer(lin, layer, dtype):
    """bitsandbytes Linear4bit (nf4, double quant) + PEFT LoRA holding exactly layer's W, A, B."""
    b4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                           compress_statistics=True, quant_type="nf4", compute_dtype=dtype)
    b4.load_state_dict(lin.state_dict())
    b4 = b4.to("cpu")
    assert torch.equal(b4.weight.data, layer.weight.packed)
    if b4.bias is not None:
        b4.bias.data = b4.bias.data.to(dtype)
    model = peft.get_peft_model(Wrap(b4), peft.LoraConfig(r=layer.r, lora_alpha=layer.lora_alpha,
                                                         target_modules=["lin"], lora_dropout=0.0))
    model = model.to(dtype) if dtype != torch.float32 else model
    lora = model.base_model.model.lin
    with torch.no_grad():
        lora.lora_A["default"].weight.data = layer.lora_A.weight.detach().clone()
        lora.lora_B["default"].weight.data = layer.lora_B.weight.detach().clone()
    return model, lora


def fwd_bwd(module, params, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("lead", [(2, 9), (1,), (33,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_bitsandbytes_peft(dtype, lead):
    """Ours against bitsandbytes Linear4bit + PEFT LoRA directly (same NF4 bytes, same A and B, adapters in the
    activation dtype on both sides): no truth built from our own scaling or weight. The two compute the same
    formula in the same dtype; they agree to within two roundings of the largest value (fp32 is bit-identical
    today but for one ulp of dx at M = 1; bf16 differs by one ulp in y and dx)."""
    lin = make_linear(n=64, k=192)
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16).to(dtype)
    for adapter in (layer.lora_A, layer.lora_B):  # explicit: not whatever dtype the layer defaults adapters to
        adapter.weight.data = adapter.weight.data.to(dtype)
    randomize_adapters(layer)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == dtype
    model, lora = bnb_peft_layer(lin, layer, dtype)
    assert lora.lora_A["default"].weight.dtype == dtype and lora.scaling["default"] == 2.0
    x = torch.randn(*lead, 192).to(dtype)
    dy = torch.randn(*lead, 64).to(dtype)
    ours = fwd_bwd(layer, [layer.lora_A.weight, layer.lora_B.weight], x, dy)
    theirs = fwd_bwd(model, [lora.lora_A["default"].weight, lora.lora_B["default"].weight], x, dy)
    for name, o, t in zip(("y", "dx", "dA", "dB"), ours, theirs):
        assert o.dtype == t.dtype == dtype and o.shape == t.shape, name
        bound = 2 * torch.finfo(dtype).eps * t.abs().max().item()
        err = (o.double() - t.double()).abs().max().item()
        assert err <= bound, f"{name}: max |ours - bitsandbytes+PEFT| = {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_not_above_bitsandbytes_peft(dtype, dropout):
    lin = make_linear(n=64, k=192)
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16, dropout=dropout).to(dtype)
    model, lora = bnb_peft_layer(lin, layer, dtype)
    if dropout:
        lora.lora_dropout["default"].p = dropout
    x = torch.randn(32, 192, dtype=dtype, requires_grad=True)
    ours, _ = saved_for_backward_bytes(lambda: layer(x))
    theirs, _ = saved_for_backward_bytes(lambda: model(x))
    assert ours <= theirs
    u_bytes = 32 * 8 * x.element_size()
    if dropout == 0.0:
        assert ours == x.numel() * x.element_size() + u_bytes
