"""bitsandbytes as a test oracle, on every CPU.

bitsandbytes 0.50.2's CPU kernels are not its format's definition everywhere (DESIGN.md section 2):
- its CPU `dequantize_4bit` (libbitsandbytes_cpu `dequantizeBlockwise4bitCpu`, reached by `dequantize_4bit`,
  `matmul_4bit` and `Linear4bit.forward` alike) picks at run time an AVX-512 branch (cpuid AVX512F, in_features
  % 16 == 0, blocksize >= 16) that restarts the blocks at every row: wrong for blocks that straddle rows
  (in_features % blocksize != 0). Its scalar branch (AVX2 CPUs) and its pure-torch fallback (odd in_features,
  blocksize >= 2048 under AVX-512) follow the format.
- `Linear4bit.forward` on a CPU where `bitsandbytes.functional.has_avx512bf16()` (cpuid AVX512-BF16), in eval
  mode, with an input that does not require grad, repacks the weight for its bf16 kernel
  (`_convert_weight_packed_for_cpu`: private layout, scales re-rounded to bfloat16, nested scales dropped).

So value comparisons use `dequantize_bnb` / `dense_copy` below (the format's definition, pure torch, from the
same quant state: no CPU-dependent code), and bitsandbytes' own forward only where it is on its standard path
(train mode or an input that requires grad) with in_features % blocksize == 0, where both of its kernels agree
with the definition. `repack_like_bnb_forward` makes the repacked case on any CPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _packed_and_state(layer_or_packed, quant_state):
    if quant_state is None:
        param = getattr(layer_or_packed, "weight", layer_or_packed)
        layer_or_packed, quant_state = param.data, getattr(param, "quant_state", None)
    assert quant_state is not None, "not a quantized bitsandbytes Linear4bit / Params4bit"
    assert not hasattr(quant_state, "packing_format_for_cpu"), "repacked by bitsandbytes for its CPU kernel"
    return layer_or_packed, quant_state


def bnb_scales(qs) -> torch.Tensor:
    """The float32 block scales of a bitsandbytes QuantState, by the format's definition:
    absmax, or with double quantization nested_map[code] * nested_absmax[b // 256] + offset."""
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    nested = s2.absmax.float().repeat_interleave(s2.blocksize)[: qs.absmax.numel()]
    return s2.code.float()[qs.absmax.long()] * nested + qs.offset.float()


def dequantize_bnb(layer_or_packed, quant_state=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of a bitsandbytes nf4 Linear4bit / Params4bit (or of packed bytes and their QuantState,
    as `quantize_4bit` returns them) by the format's definition: flat value i = quant_map[code i] *
    scale[i // blocksize] in float32 (code i: the high nibble of byte i // 2 when i is even), cast to `dtype`
    (default: the quant state's dtype), in the quant state's shape."""
    packed, qs = _packed_and_state(layer_or_packed, quant_state)
    assert qs.quant_type == "nf4", qs.quant_type
    n = 1
    for d in qs.shape:
        n *= d
    packed = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    scales = bnb_scales(qs).repeat_interleave(qs.blocksize)[:n]
    return (qs.code.float()[codes] * scales).reshape(tuple(qs.shape)).to(dtype or qs.dtype)


def dense_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of `model` whose bitsandbytes Linear4bit modules are nn.Linear holding `dequantize_bnb` of
    their weight (in `dtype`, default the layer's compute dtype): bitsandbytes' model by the format's definition,
    what its standard path computes (dequantize, then torch's linear) where its CPU dequantize is right."""
    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        wdtype = dtype or m.compute_dtype or m.weight.quant_state.dtype
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=wdtype)
        with torch.no_grad():
            lin.weight.copy_(dequantize_bnb(m, dtype=wdtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        lin.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, lin)
    return out


def repack_like_bnb_forward(layer) -> None:
    """What `Linear4bit.forward` does to its weight on an AVX512-BF16 CPU in eval mode without grad (bitsandbytes
    0.50.2, nn/modules.py), done here on any CPU (the conversion is pure torch): the quant state is changed in
    place and weight.data replaced. Raises where bitsandbytes' own forward would (N % 32 != 0, or in_features %
    blocksize != 0), after the same partial changes to the quant state."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)


def assert_not_repacked(model: nn.Module) -> None:
    """Every bitsandbytes 4-bit weight of `model` is still in the standard layout (it ran on the standard path)."""
    for name, p in model.named_parameters():
        qs = getattr(p, "quant_state", None)
        assert qs is None or not hasattr(qs, "packing_format_for_cpu"), f"{name}: repacked by bitsandbytes"
