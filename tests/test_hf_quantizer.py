"""NF4Linear (a frozen NF4 linear without adapters) and the transformers integration (qlora_kernels.NF4Config):
from_pretrained streams a plain checkpoint into NF4 (the bytes of quantize_nf4), save_pretrained / reload
without the config, qk.load_pretrained of that checkpoint, what trainers read, bad options."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels import NF4Linear, QLoRALinear, quantize_nf4  # noqa: E402


# ============================================================================================ NF4Linear
def _linear(n=48, k=192, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def test_nf4linear_matches_qlora_linear_with_zero_adapters():
    """NF4Linear is QLoRALinear's base: with B = 0 the fused layer adds exact zeros, so y, dx and dbias agree bit
    for bit; both hold the same NF4 bytes (quantize_nf4's)."""
    lin = _linear(dtype=torch.bfloat16)
    base, lora = NF4Linear.from_linear(lin), QLoRALinear.from_linear(lin)
    assert not isinstance(base, QLoRALinear) and isinstance(lora, NF4Linear)
    ref = quantize_nf4(lin.weight.detach())
    for a, b in zip(base.weight.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    assert [n for n, _ in base.named_parameters()] == ["bias"] and not base.bias.requires_grad
    base.bias.requires_grad_(True)
    lora.bias.requires_grad_(True)
    x = torch.randn(3, 5, 192, dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = base(xa), lora(xb)
    assert torch.equal(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(base.bias.grad, lora.bias.grad)


def test_nf4linear_against_dense_float32():
    """x @ deq(W)^T + b against float64 on the same dequantized W, within 2x PyTorch's own float32 error."""
    from accuracy import assert_close_derived

    lin = _linear()
    layer = NF4Linear.from_linear(lin, blocksize=128, double_quant=False)
    w = layer.weight.dequantize(torch.float32)
    x = torch.randn(7, 192, requires_grad=True)
    y = layer(x)
    exact = x.detach().double() @ w.double().t() + lin.bias.detach().double()
    assert_close_derived(y.detach(), exact, torch.nn.functional.linear(x.detach(), w, lin.bias.detach()), "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close_derived(x.grad, dy.double() @ w.double(), dy @ w, "dx")


def test_nf4linear_saves_nothing_for_backward():
    """The backward recomputes dx through the NF4 op: nothing (no x, no deq(W)) is kept between the passes."""
    layer = NF4Linear.from_linear(_linear())
    x = torch.randn(4, 192, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_nf4linear_state_dict_to_and_errors():
    lin = _linear(bias=False)
    layer = NF4Linear.from_linear(lin)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    other = NF4Linear.empty(192, 48, dtype=torch.float32, device="cpu")
    other.load_state_dict(sd)
    for a, b in zip(other.weight.tensors(), layer.weight.tensors()):
        assert torch.equal(a, b)
    other.to(torch.bfloat16)  # the codes and scales keep their dtypes
    assert other.weight_absmax.dtype == torch.uint8 and other.weight_nested_absmax.dtype == torch.float32
    skeleton = NF4Linear.empty(192, 48, bias=True, dtype=torch.bfloat16)
    assert skeleton.weight_packed.is_meta and set(skeleton.state_dict()) == {"weight", "bias"}
    skeleton.set_weight(quantize_nf4(lin.weight.detach()))  # a meta layer takes the weight's device
    assert skeleton.weight_packed.device.type == "cpu"
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        NF4Linear(lin.weight)
    with pytest.raises(ValueError, match="x has shape"):
        layer(torch.randn(2, 100))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        NF4Linear.from_linear(layer)
    with pytest.raises(ValueError, match="weight has shape"):
        layer.set_weight(quantize_nf4(torch.randn(8, 64)))
