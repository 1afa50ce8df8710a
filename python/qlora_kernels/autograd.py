"""QLoRALinearFunction: the autograd of one QLoRA layer (DESIGN 3), and `qlora_linear`, its checked entry point.

    U = dropout(x) @ A^T                              [M, r]
    y = x @ deq(W)^T + s * U @ B^T + bias             [M, N]      (qlora::nf4_linear)

    G  = dy @ B                                       [M, r]
    dB = s * dy^T @ U                                 [N, r]
    dA = s * G^T @ dropout(x)                         [r, K]
    dx = dy @ deq(W) + s * mask * (G @ A) / (1 - p)   [M, K]      (qlora::nf4_linear_dx)

The Function is thin: it saves, it calls ops, nothing else. Everything touching W goes through the two ops,
so no dequantized W outlives an op call.

Saved for backward (through `ctx.save_for_backward`, what `saved_tensors_hooks` and activation checkpointing
see): dropout(x) (= x itself when p = 0) only when dA is wanted, U only when dB is wanted, and with dropout
the keep-mask bit-packed 8 per byte (M*K/8 bytes: 1/16 of a bf16 x, where nn.Dropout keeps a 1-byte bool
per element) only when dx is wanted. The mask is stored, not regenerated from a saved RNG state: a stored
mask is exact under torch.compile, checkpointing and any generator, and costs 1 bit per element.
The handles of W (packed codes and scales) and of A and B are kept as ctx attributes: they are parameters
and buffers that live anyway, so they cost no activation memory.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _ops

__all__ = ["QLoRALinearFunction", "NF4LinearFunction", "qlora_linear"]

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -------------------------------------------------------------------------------------------- mask packing
def _pack_mask(mask: Tensor) -> Tensor:
    """bool [M, K] -> uint8 [ceil(M*K / 8)], element i in bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_mask(bits: Tensor, shape, dtype: torch.dtype) -> Tensor:
    """Inverse of _pack_mask: 0/1 values of `dtype` in `shape`."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    n = math.prod(shape)
    return ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].view(shape).to(dtype)


# ------------------------------------------------------------------------------------------------ Function
class QLoRALinearFunction(torch.autograd.Function):
    """y [M, N] = x [M, K] @ deq(W)^T + s * dropout(x) @ A^T @ B^T + bias.

    forward(ctx, x, packed, absmax, nested_absmax, offset, lora_A, lora_B, bias,
            out_features, in_features, blocksize, scaling, dropout_p)
    x: 2-D [M, K] with unit last stride; lora_A [r, K], lora_B [N, r] on x's device in any float dtype (float32
    masters on a bf16 model: cast to x's dtype inside, per call, and never kept: ctx holds the parameters
    themselves, so neither a checkpointed nor a plain step keeps a second copy of every adapter alive);
    bias [N] or None in x's dtype (checked by `qlora_linear`). dropout_p > 0 means dropout is active (the
    caller passes 0 in eval).
    Gradients: x, lora_A, lora_B, bias, each only when ctx.needs_input_grad asks; never the NF4 tensors.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, offset, lora_A, lora_B, bias,
                out_features, in_features, blocksize, scaling, dropout_p):
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        keep_bits = None
        if dropout_p > 0.0:
            keep = torch.rand(x.shape, device=x.device, dtype=torch.float32) >= dropout_p
            xd = x.masked_fill(~keep, 0).mul_(1.0 / (1.0 - dropout_p))
            if need_x:
                keep_bits = _pack_mask(keep)
        else:
            xd = x
        u = xd @ lora_A.to(x.dtype).t()
        y = _ops.nf4_linear(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                            u, lora_B.to(x.dtype), scaling, bias)
        ctx.save_for_backward(xd if need_a else None, u if need_b else None, keep_bits)
        ctx.weight_handles = (packed, absmax, nested_absmax, offset)
        ctx.lora = (lora_A, lora_B)
        ctx.meta = (out_features, in_features, blocksize, scaling, dropout_p, x.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        xd, u, keep_bits = ctx.saved_tensors
        packed, absmax, nested_absmax, offset = ctx.weight_handles
        master_A, master_B = ctx.lora
        lora_A, lora_B = master_A.to(dy.dtype), master_B.to(dy.dtype)  # the compute-dtype copies, again
        out_features, in_features, blocksize, scaling, dropout_p, x_shape = ctx.meta
        need_x, need_a, need_b, need_bias = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        dx = d_a = d_b = d_bias = None
        if dy.stride(-1) != 1:  # e.g. the stride-0 gradient of y.sum(): the ops take a unit last stride
            dy = dy.contiguous()
        g = dy @ lora_B if (need_x or need_a) else None  # [M, r]
        if need_b:
            d_b = (dy.t() @ u).mul_(scaling).to(master_B.dtype)
        if need_a:
            d_a = (g.t() @ xd).mul_(scaling).to(master_A.dtype)
        if need_x:
            if dropout_p > 0.0:
                dx = _ops.nf4_linear_dx(dy, packed, absmax, nested_absmax, offset, out_features, in_features,
                                        blocksize, None, None, 0.0)
                lora_dx = (g @ lora_A).mul_(_unpack_mask(keep_bits, x_shape, dy.dtype))
                dx.add_(lora_dx, alpha=scaling / (1.0 - dropout_p))
            else:
                dx = _ops.nf4_linear_dx(dy, packed, absmax, nested_absmax, offset, out_features, in_features,
                                        blocksize, g, lora_A, scaling)
        if need_bias:
            d_bias = dy.sum(dim=0)
        return dx, None, None, None, None, d_a, d_b, d_bias, None, None, None, None, None


class NF4LinearFunction(torch.autograd.Function):
    """y [M, N] = x [M, K] @ deq(W)^T + bias: the Function of a quantized linear without adapters (NF4Linear).

    forward(ctx, x, packed, absmax, nested_absmax, offset, bias, out_features, in_features, blocksize)
    x: 2-D [M, K] with unit last stride; bias [N] or None in x's dtype. Nothing is saved for backward but
    the handles of W (buffers that live anyway): dx = dy @ deq(W) is recomputed by `qlora::nf4_linear_dx`.
    Gradients: x and bias, each only when ctx.needs_input_grad asks; never the NF4 tensors.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, offset, bias, out_features, in_features, blocksize):
        ctx.weight_handles = (packed, absmax, nested_absmax, offset)
        ctx.meta = (out_features, in_features, blocksize)
        return _ops.nf4_linear(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                               None, None, 0.0, bias)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, nested_absmax, offset = ctx.weight_handles
        out_features, in_features, blocksize = ctx.meta
        dx = d_bias = None
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            dx = _ops.nf4_linear_dx(dy, packed, absmax, nested_absmax, offset, out_features, in_features,
                                    blocksize, None, None, 0.0)
        if ctx.needs_input_grad[5]:
            d_bias = dy.sum(dim=0)
        return dx, None, None, None, None, d_bias, None, None, None


# ----------------------------------------------------------------------------------------------- checks
def _check_base_args(x, weight_shape, bias):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if len(weight_shape) != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight_shape)}")
    n_out, k_in = weight_shape
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(
            f"x has shape {tuple(x.shape)}: its last dimension must equal weight's in_features {k_in} "
            f"(weight shape {tuple(weight_shape)})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n_out):
        raise ValueError(f"bias has shape {tuple(bias.shape)}: it must be [out_features] = [{n_out}]")


def _check_args(x, weight_shape, weight_device, lora_A, lora_B, bias, scaling, dropout):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_base_args(x, weight_shape, bias)
    n_out, k_in = weight_shape
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A must be 2-D [r, in_features], got shape {tuple(lora_A.shape)}")
    if lora_A.shape[0] == 0:
        raise ValueError("rank r must be >= 1: lora_A has 0 rows (r = 0 would be a layer without adapter)")
    if lora_A.shape[1] != k_in:
        raise ValueError(
            f"lora_A has shape {tuple(lora_A.shape)}: it must be [r, in_features] = [r, {k_in}] for weight "
            f"of shape {tuple(weight_shape)}"
        )
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[0] != n_out or lora_B.shape[1] != r:
        raise ValueError(
            f"lora_B has shape {tuple(lora_B.shape)}: it must be [out_features, r] = [{n_out}, {r}] "
            f"(weight {tuple(weight_shape)}, lora_A {tuple(lora_A.shape)})"
        )
    dev = x.device
    for name, d in (("weight", weight_device), ("lora_A", lora_A.device), ("lora_B", lora_B.device),
                    ("bias", None if bias is None else bias.device)):
        if d is not None and torch.device(d) != dev:
            raise ValueError(f"{name} is on {d} but x is on {dev}: all inputs must be on one device")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def _qlora_linear(x, packed, absmax, nested_absmax, offset, weight_shape, blocksize,
                  lora_A, lora_B, scaling, bias=None, dropout=0.0, training=True):
    """`qlora_linear` on the raw NF4 tensors (what QLoRALinear.forward calls: no NF4Weight is rebuilt)."""
    _check_args(x, weight_shape, packed.device, lora_A, lora_B, bias, scaling, dropout)
    n_out, k_in = weight_shape
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        # Autocast: every floating input runs in the autocast dtype, as nn.Linear would.
        cdt = torch.get_autocast_dtype(device_type)
        x = x.to(cdt)  # the adapters are cast inside the Function (not kept alive between forward and backward)
        bias = None if bias is None else bias.to(cdt)
    else:
        if x.dtype not in _ACT_DTYPES:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
            if t is not None and t.dtype not in _ACT_DTYPES:
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        # Float32 master adapters on a half-precision model: the Function computes in x's dtype and hands
        # float32 gradients back, so small updates are not rounded away.
        bias = None if bias is None else bias.to(x.dtype)
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"autocast dtype must be float32, float16 or bfloat16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:  # pass strides, copy only when the last one is not 1
        x2 = x2.contiguous()
    p = float(dropout) if training else 0.0
    with torch.autocast(device_type, enabled=False):
        y = QLoRALinearFunction.apply(
            x2, packed.reshape(-1), absmax, nested_absmax, offset, lora_A, lora_B, bias,
            n_out, k_in, blocksize, float(scaling), p,
        )
    return y.view(*lead, n_out)


def _nf4_linear(x, packed, absmax, nested_absmax, offset, weight_shape, blocksize, bias=None):
    """x @ deq(W)^T + bias on the raw NF4 tensors (what NF4Linear.forward calls). x [..., K] float32/float16/
    bfloat16 (under autocast: the autocast dtype), bias [N] or None (cast to x's dtype). Returns [..., N]."""
    _check_base_args(x, weight_shape, bias)
    n_out, k_in = weight_shape
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}: all inputs must be on one device")
    if packed.device != x.device:
        raise ValueError(f"weight is on {packed.device} but x is on {x.device}: all inputs must be on one device")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(device_type))
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if bias is not None:
        if bias.dtype not in _ACT_DTYPES:
            raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    with torch.autocast(device_type, enabled=False):
        y = NF4LinearFunction.apply(x2, packed.reshape(-1), absmax, nested_absmax, offset, bias, n_out, k_in,
                                    blocksize)
    return y.view(*lead, n_out)


def qlora_linear(
    x: Tensor,
    weight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Optional[Tensor] = None,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """One QLoRA layer: x @ deq(W)^T + scaling * dropout(x) @ lora_A^T @ lora_B^T + bias.

    Args:
        x: [..., K] float32/float16/bfloat16; any strides; leading dims may be empty (M = 0).
        weight: NF4Weight of shape [N, K] on x's device (frozen: it never gets a gradient).
        lora_A: [r, K], r >= 1.  lora_B: [N, r].  bias: [N] or None.
        scaling: s (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout: probability p in [0, 1) applied to x on the adapter path only (when training).
    Dtypes: under torch.autocast, x, A, B and bias are cast to the autocast dtype; otherwise A, B and bias
        (any float dtype, e.g. float32 masters on a bf16 model) are cast to x's dtype for the compute, and
        their gradients come back in their own dtype.
    Returns:
        y [..., N] in x's (compute) dtype. Gradients flow to x, lora_A, lora_B and bias as they require.
    Raises:
        TypeError for a wrong type or dtype; ValueError for mismatched shapes, r = 0, different devices,
        a non-finite scaling or a dropout outside [0, 1).
    """
    from .weight import NF4Weight

    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight (see quantize_nf4), got {type(weight).__name__}")
    return _qlora_linear(x, weight.packed, weight.absmax, weight.nested_absmax, weight.offset, weight.shape,
                         weight.blocksize, lora_A, lora_B, scaling, bias, dropout, training)
