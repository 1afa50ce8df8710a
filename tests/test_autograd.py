"""QLoRALinearFunction / qlora_linear: numerics against float64 math, saved tensors, autocast, checkpointing,
odd inputs and bad-input errors.

Tolerances are derived (DESIGN 6): the error of our result against float64 math is at most 2x the error of
plain PyTorch doing the same math in the same dtype, plus one rounding of the largest reference value.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels import QLoRALinearFunction, qlora_linear, quantize_nf4  # noqa: E402
from qlora_kernels.autograd import _pack_mask, _unpack_mask  # noqa: E402
from qlora_kernels.memory import saved_for_backward_bytes  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(n=48, k=80, r=4, m=7, dtype=torch.float32, blocksize=64, bias=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.5
    weight = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    shape = (m, k) if lead is None else (*lead, k)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    a = (torch.randn(r, k, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(n, r, generator=g) * 0.3).to(dtype).requires_grad_()
    bb = (torch.randn(n, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    return weight, x, a, b, bb


def math_forward(x, wd, a, b, s, bias, keep=None, p=0.0):
    """The layer written out in plain PyTorch ops (autograd gives the gradients)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = x @ wd.t() + s * ((xd @ a.t()) @ b.t())
    return y if bias is None else y + bias


def run(fn, inputs, dy):
    ins = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    y = fn(*ins)
    y.backward(dy.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in ins]


def max_err(a, ref):
    return (a.double() - ref).abs().max().item() if ref.numel() else 0.0


def assert_derived(ours, plain, ref, dtype, what):
    floor = torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    e_ours, e_plain = max_err(ours, ref), max_err(plain, ref)
    assert e_ours <= 2.0 * e_plain + floor, f"{what}: error {e_ours:.3g} > 2 x plain PyTorch {e_plain:.3g} + {floor:.3g}"


def check_against_float64(weight, x, a, b, bias, s, dtype, keep=None, p=0.0, fn=None):
    wd32 = weight.dequantize(torch.float32)
    inputs = [x, a, b, bias]
    dy = torch.randn(*x.shape[:-1], weight.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)
    if fn is None:
        fn = lambda x_, a_, b_, bias_: qlora_linear(x_, weight, a_, b_, s, bias_, dropout=p)  # noqa: E731
    y, grads = run(fn, inputs, dy)
    yp, grads_p = run(lambda x_, a_, b_, bias_: math_forward(x_, wd32.to(dtype), a_, b_, s, bias_, keep, p), inputs, dy)
    ins64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y64 = math_forward(ins64[0], wd32.double(), ins64[1], ins64[2], s, ins64[3], keep, p)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == y64.shape
    assert_derived(y, yp, y64.detach(), dtype, "y")
    for name, g, gp, t64 in zip(("dx", "dA", "dB", "dbias"), grads, grads_p, ins64):
        if t64 is None:
            continue
        assert g is not None and g.dtype == dtype and g.shape == t64.shape, name
        assert_derived(g, gp, t64.grad, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64(dtype, blocksize, m, bias):
    weight, x, a, b, bb = make_case(m=m, dtype=dtype, blocksize=blocksize, bias=bias)
    check_against_float64(weight, x, a, b, bb, 0.75, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_single_quant(dtype):
    g = torch.Generator().manual_seed(3)
    weight = quantize_nf4(torch.randn(33, 70, generator=g), blocksize=32, double_quant=False)  # n odd, K % bs != 0
    _, x, a, b, bb = make_case(n=33, k=70, r=3, dtype=dtype, lead=(2, 3))
    check_against_float64(weight, x, a, b, bb, 2.0, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_float64(dtype):
    weight, x, a, b, bb = make_case(m=9, dtype=dtype)
    p = 0.3
    # the Function draws its keep-mask as torch.rand(x.shape, float32) >= p: replay that draw for the reference
    torch.manual_seed(123)
    keep = torch.rand(x.shape, dtype=torch.float32) >= p

    def fn(x_, a_, b_, bias_):
        torch.manual_seed(123)
        return qlora_linear(x_, weight, a_, b_, 0.5, bias_, dropout=p, training=True)

    check_against_float64(weight, x, a, b, bb, 0.5, dtype, keep=keep, p=p, fn=fn)


def test_dropout_off_in_eval():
    weight, x, a, b, bb = make_case()
    y_eval = qlora_linear(x, weight, a, b, 0.5, bb, dropout=0.5, training=False)
    y_plain = qlora_linear(x, weight, a, b, 0.5, bb, dropout=0.0)
    torch.testing.assert_close(y_eval, y_plain, rtol=0, atol=0)


def test_mask_packing_roundtrip():
    for shape in [(1, 1), (3, 5), (4, 8), (7, 13)]:
        mask = torch.rand(shape) > 0.5
        bits = _pack_mask(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
        assert torch.equal(_unpack_mask(bits, shape, torch.float32), mask.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_are_x_and_u(dtype):
    weight, x, a, b, bb = make_case(m=16, dtype=dtype, r=4)
    nbytes, y = saved_for_backward_bytes(lambda: qlora_linear(x, weight, a, b, 0.5, bb))
    x_bytes = x.numel() * x.element_size()
    u_bytes = x.shape[0] * a.shape[0] * x.element_size()
    assert nbytes == x_bytes + u_bytes
    # with dropout: dropout(x), U and the keep-mask at one bit per element
    nbytes, _ = saved_for_backward_bytes(lambda: qlora_linear(x, weight, a, b, 0.5, bb, dropout=0.1))
    assert nbytes == x_bytes + u_bytes + (x.numel() + 7) // 8


def test_grads_only_where_asked(monkeypatch):
    weight, x, a, b, bb = make_case(m=5)
    calls = []
    real = torch.ops.qlora.nf4_linear_dx
    monkeypatch.setattr(qk.autograd._ops, "nf4_linear_dx", lambda *args: calls.append(1) or real(*args))
    x0 = x.detach()  # no grad for x: the dx op must not run, x must not be needed beyond dA
    nbytes, y = saved_for_backward_bytes(lambda: qlora_linear(x0, weight, a, b.detach(), 0.5, None))
    assert nbytes == x0.numel() * 4  # only x (for dA); no U since B is frozen
    y.sum().backward()
    assert calls == [] and a.grad is not None and b.grad is None
    # B only: U is saved, x is not
    a.grad = None
    nbytes, y = saved_for_backward_bytes(lambda: qlora_linear(x0, weight, a.detach(), b, 0.5, None))
    assert nbytes == x0.shape[0] * a.shape[0] * 4
    y.sum().backward()
    assert b.grad is not None and a.grad is None and calls == []


def test_bias_grad_only_when_required():
    weight, x, a, b, bb = make_case(m=5)
    frozen = bb.detach()
    qlora_linear(x, weight, a, b, 0.5, frozen).sum().backward()
    assert frozen.grad is None and x.grad is not None
    qlora_linear(x, weight, a, b, 0.5, bb).sum().backward()
    torch.testing.assert_close(bb.grad, torch.full_like(bb, 5.0))


def test_non_contiguous_x():
    weight, x, a, b, bb = make_case(m=6, k=80)
    xt = torch.randn(80, 6).t().requires_grad_()  # [6, 80] with strides (1, 6)
    xc = xt.detach().contiguous().requires_grad_()
    y1 = qlora_linear(xt, weight, a, b, 0.5, bb)
    y2 = qlora_linear(xc, weight, a, b, 0.5, bb)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(xt.grad, xc.grad, rtol=0, atol=0)
    xs = torch.randn(6, 160)[:, ::2].requires_grad_()  # last stride 2: copied
    y3 = qlora_linear(xs, weight, a, b, 0.5, bb)
    torch.testing.assert_close(y3, qlora_linear(xs.detach().contiguous(), weight, a, b, 0.5, bb))


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_input(lead):
    weight, x, a, b, bb = make_case(lead=lead)
    y = qlora_linear(x, weight, a, b, 0.5, bb)
    assert y.shape == (*lead, 48)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0 and torch.count_nonzero(bb.grad) == 0


def test_autocast_casts_to_compute_dtype():
    weight, x, a, b, bb = make_case(m=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qlora_linear(x, weight, a, b, 0.5, bb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == bb.grad.dtype == torch.float32
    # same numbers as the layer run in bfloat16 directly
    cast = [t.detach().bfloat16().requires_grad_() for t in (x, a, b, bb)]
    y2 = qlora_linear(*cast[:1], weight, cast[1], cast[2], 0.5, cast[3])
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    y2.float().sum().backward()
    torch.testing.assert_close(a.grad, cast[1].grad.float(), rtol=0, atol=0)


def test_checkpoint_non_reentrant_with_dropout():
    weight, x, a, b, bb = make_case(m=8)

    def layer(x_):
        return torch.nn.functional.gelu(qlora_linear(x_, weight, a, b, 0.5, bb, dropout=0.25))

    torch.manual_seed(7)
    y1 = layer(x)
    y1.square().sum().backward()
    g1 = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b, bb):
        t.grad = None
    torch.manual_seed(7)
    y2 = checkpoint(layer, x, use_reentrant=False)
    y2.square().sum().backward()
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for g, t in zip(g1, (x, a, b)):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)


def test_function_takes_raw_nf4_tensors():
    # the Function takes the NF4 tensors (not an NF4Weight) so torch.compile sees only tensors; checked against
    # the float64 math (qlora_linear calls this Function, so comparing the two would prove nothing)
    weight, x, a, b, bb = make_case()

    def fn(x_, a_, b_, bias_):
        return QLoRALinearFunction.apply(x_, weight.packed.view(-1), weight.absmax, weight.nested_absmax,
                                         weight.offset, a_, b_, bias_, 48, 80, 64, 0.5, 0.0)

    check_against_float64(weight, x, a, b, bb, 0.5, torch.float32, fn=fn)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_shapes():
    weight, x, a, b, bb = make_case()
    with pytest.raises(ValueError, match=r"last dimension must equal weight's in_features 80"):
        qlora_linear(torch.randn(3, 81), weight, a, b, 0.5)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 81\)"):
        qlora_linear(x, weight, torch.randn(4, 81), b, 0.5)
    with pytest.raises(ValueError, match=r"lora_B has shape \(48, 5\).*\[48, 4\]"):
        qlora_linear(x, weight, a, torch.randn(48, 5), 0.5)
    with pytest.raises(ValueError, match=r"lora_B has shape \(47, 4\)"):
        qlora_linear(x, weight, a, torch.randn(47, 4), 0.5)
    with pytest.raises(ValueError, match=r"lora_A must be 2-D"):
        qlora_linear(x, weight, torch.randn(80), b, 0.5)
    with pytest.raises(ValueError, match=r"bias has shape \(47,\)"):
        qlora_linear(x, weight, a, b, 0.5, torch.randn(47))


def test_rank_zero():
    weight, x, a, b, bb = make_case()
    with pytest.raises(ValueError, match=r"rank r must be >= 1"):
        qlora_linear(x, weight, torch.randn(0, 80), torch.randn(48, 0), 0.5)


def test_dtype_mixes():
    """Adapters of another float dtype are cast to x's dtype for the compute (float32 masters on a bf16
    model); their gradients come back in their own dtype. Non-float adapters are refused."""
    weight, x, a, b, bb = make_case()
    b = torch.randn_like(b)
    a16 = a.detach().bfloat16().requires_grad_()
    b16 = b.detach().half().requires_grad_()
    y = qlora_linear(x, weight, a16, b16, 0.5, bb.bfloat16())
    y_same = qlora_linear(x, weight, a16.detach().float(), b16.detach().float(), 0.5, bb.bfloat16().float())
    assert y.dtype == torch.float32
    assert torch.equal(y, y_same)
    y.sum().backward()
    assert a16.grad.dtype == torch.bfloat16 and b16.grad.dtype == torch.float16
    assert a16.grad.abs().sum() > 0 and b16.grad.abs().sum() > 0
    with pytest.raises(TypeError, match=r"lora_A must be float32, float16 or bfloat16, got torch.float64"):
        qlora_linear(x, weight, a.double(), b, 0.5)
    with pytest.raises(TypeError, match=r"lora_B must be float32, float16 or bfloat16, got torch.int64"):
        qlora_linear(x, weight, a, b.long(), 0.5)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16, got torch.float64"):
        qlora_linear(x.double(), weight, a.double(), b.double(), 0.5)
    with pytest.raises(TypeError, match=r"weight must be an NF4Weight"):
        qlora_linear(x, torch.randn(48, 80), a, b, 0.5)


def test_bad_scalars_and_devices():
    weight, x, a, b, bb = make_case()
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        qlora_linear(x, weight, a, b, 0.5, dropout=1.0)
    with pytest.raises(ValueError, match=r"scaling must be a finite float"):
        qlora_linear(x, weight, a, b, float("nan"))
    with pytest.raises(ValueError, match=r"lora_A is on meta but x is on cpu"):
        qlora_linear(x, weight, a.to("meta"), b, 0.5)
