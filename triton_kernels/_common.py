"""What the launchers share: the per-device lookup tables, argument checks, the constexpr flags of a weight,
and the LoRA + bias epilogue (a jit helper) that the forward, dx and decode kernels end with."""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_interpreting
from .._checks import aligned_packed
from .._format import device_table
from .configs import perm_k_supported

def on_input_device(launcher):
    """Run a launcher with its first argument's CUDA device current: Triton launches on the current device,
    and weights placed on cuda:1 (device_map="auto") must not launch on cuda:0."""

    @functools.wraps(launcher)
    def guarded(x, *args, **kwargs):
        if isinstance(x, Tensor) and x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    return guarded


def weight_flags(n_out: int, k_in: int, blocksize: int, nested_absmax: Optional[Tensor]) -> dict:
    """Constexprs that describe the weight layout (see nf4_tile)."""
    return dict(
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=nested_absmax is not None,
        EVEN_K=k_in % 2 == 0,
        ALIGNED=k_in % blocksize == 0,
    )


def dtype_flags(dtype: torch.dtype) -> dict:
    """fp32 activations take exact ("ieee") dots: tf32 would lose to a plain fp32 torch matmul by ~1e-3.
    The interpreter gets bfloat16 arithmetic wrong: there loaded bf16 values are upcast to fp32 first."""
    return dict(
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=triton_interpreting() and dtype == torch.bfloat16,
    )


def fast_flags(rows: int, k_in: int, blocksize: int, block_rows: int, block_k: int, dtype: torch.dtype) -> dict:
    """FAST: the aligned fast path of the W tile (nf4_tile_fast): no masks on W (rows % block_rows == 0,
    k_in % block_k == 0), whole blocks per tile row (block_k % blocksize == 0), 16-bit activations.
    LUT_ASM: its register lookup in PTX; the interpreter runs the same path with a gather instead.
    PERM_K: two or more blocks per tile row on a triton that compiles nf4_tile's PERM_K layout
    (configs.PERM_K_MIN_TRITON): one thread per (row, block), the tile's columns in perm_k order."""
    fast = (dtype in (torch.float16, torch.bfloat16) and rows % block_rows == 0 and k_in % block_k == 0
            and block_k % blocksize == 0)
    return dict(FAST=fast, LUT_ASM=fast and not triton_interpreting(),
                PERM_K=fast and block_k >= 2 * blocksize and perm_k_supported())


def r_pad(r: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot's minimum); ranks 1..128 supported, more works too."""
    return max(16, triton.next_power_of_2(max(1, r)))


def weight_args(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor], device):
    """The six pointer arguments every kernel takes after its activations; unused ones alias absmax."""
    nf4, dmap = device_table("nf4", device), device_table("map", device)
    packed = aligned_packed(packed.reshape(-1))  # the fast path's int32 vector loads need 16-byte alignment
    absmax = absmax.reshape(-1)
    if nested_absmax is None:
        nested, off = absmax, absmax
    else:
        nested, off = nested_absmax.reshape(-1), offset.reshape(-1)
    return packed, absmax, nested, off, nf4, dmap


def activation(x: Tensor, name: str, features: int) -> Tensor:
    """2-D activations; strided rows are passed as strides, a copy is made only when the last stride is not 1."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.shape[1] != features:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected {features}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(1) != 1 and x.numel() > 0:
        x = x.contiguous()
    return x


@triton.jit
def lora_bias_epilogue(
    acc, rm, rc, M, C, R, scaling,
    u_ptr, v_ptr, bias_ptr,
    stride_um, stride_ur, stride_vc, stride_vr,
    ACT: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """acc [BM, BC] (float32) + bias[rc] + scaling * U[rm, :R] @ V[rc, :R]^T.

    U, V and bias are rounded to the activation dtype ACT first (as the reference casts them), then the
    product accumulates in float32: one tl.dot per R_CHUNK of the padded rank (USE_DOT), or a broadcast
    multiply-sum when BM < 16 (decode with one row).
    """
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rc, mask=rc < C, other=0.0).to(ACT).to(tl.float32)
        acc += bias[None, :]
    if HAS_LORA:
        rm64 = rm.to(tl.int64)
        rc64 = rc.to(tl.int64)
        lora = tl.zeros(acc.shape, dtype=tl.float32)
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            rr = r0 + tl.arange(0, R_CHUNK)
            umask = (rm < M)[:, None] & (rr < R)[None, :]
            u = tl.load(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur, mask=umask, other=0.0).to(ACT)
            if USE_DOT:
                vmask = (rr < R)[:, None] & (rc < C)[None, :]
                vt = tl.load(v_ptr + rr[:, None] * stride_vr + rc64[None, :] * stride_vc, mask=vmask, other=0.0)
                vt = vt.to(ACT)
                if UPCAST:
                    lora = tl.dot(u.to(tl.float32), vt.to(tl.float32), lora, input_precision="ieee")
                else:
                    lora = tl.dot(u, vt, lora, input_precision=PRECISION)
            else:
                vmask = (rc < C)[:, None] & (rr < R)[None, :]
                v = tl.load(v_ptr + rc64[:, None] * stride_vc + rr[None, :] * stride_vr, mask=vmask, other=0.0)
                v = v.to(ACT).to(tl.float32)
                lora += tl.sum(u.to(tl.float32)[:, None, :] * v[None, :, :], axis=2)
        acc += scaling * lora
    return acc
