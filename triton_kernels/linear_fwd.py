"""Fused QLoRA forward: y = x @ deq(W)^T + scaling * U @ B^T + bias, W dequantized tile by tile in registers.

W is read once at 4.127 bits/param (double quant), y written once in the activation dtype; float32
accumulation. Grouped program order (GROUP_M row-tiles share each W column-tile while it is in L2).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import check_weight, lora_pair
from ._common import (
    activation, dtype_flags, fast_flags, lora_bias_epilogue, on_input_device, r_pad, weight_args, weight_flags,
)
from .configs import LaunchConfig, pick_config
from .nf4_tile import nf4_w_tile, perm_k


@triton.jit
def _nf4_linear_kernel(
    y_ptr,
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, u_ptr, b_ptr, bias_ptr,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_um, stride_ur, stride_bn, stride_br,
    M, N, K, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, LUT_ASM: tl.constexpr,
    PERM_K: tl.constexpr,
    EVEN_M: tl.constexpr,
):
    ACT: tl.constexpr = y_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    # PERM_K: the W tile arrives with its columns in perm_k order (nf4_tile_fast); x's columns follow, the dot
    # sums over them alike
    xk = perm_k(rk, BLOCKSIZE) if PERM_K else rk
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + xk[None, :] * stride_xk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # FAST: N % BLOCK_N == 0, K % BLOCK_K == 0, BLOCK_K == BLOCKSIZE: no W masks, register lookup
        if FAST and EVEN_M:  # M % BLOCK_M == 0: no mask (no per-copy predicate in the pipelined loop)
            x = tl.load(x_ptrs)
        elif FAST:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        w = nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, 0, k0, N, K,
                       BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, FAST, EVEN_K, ALIGNED, ACT, LUT_ASM, PERM_K)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(ACT).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(ACT)), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    acc = lora_bias_epilogue(acc, rm, rn, M, N, R, scaling, u_ptr, b_ptr, bias_ptr,
                             stride_um, stride_ur, stride_bn, stride_br,
                             ACT, R_PAD, R_CHUNK, HAS_LORA, HAS_BIAS, True, PRECISION, UPCAST)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(ACT), mask=m_ok[:, None] & (rn < N)[None, :])


@on_input_device
def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    lora_u: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    scaling: float = 1.0,
    bias: Optional[Tensor] = None,
    *,
    config: Optional[LaunchConfig] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Fused NF4 linear (always the fused kernel; `nf4_linear_triton` in dispatch.py chooses per shape).

    x [M, K] f16/bf16/f32 (any row stride, last stride 1), packed uint8 [(N*K + 1) // 2], absmax float32 [nb]
    or uint8 codes [nb] with nested_absmax float32 [ceil(nb / 256)] and offset float32 [], lora_u [M, r],
    lora_b [N, r], bias [N]. Returns y [M, N] in x.dtype (or writes `out`, a [M, N] tensor of x.dtype).
    """
    M, N, K = x.shape[0], out_features, in_features
    x = activation(x, "x", K)
    check_weight(packed, absmax, nested_absmax, offset, N, K, blocksize, x.device)
    lora_u, lora_b, r = lora_pair(lora_u, lora_b, M, N, "lora_u", "lora_b")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    if bias is not None:
        bias = bias.reshape(-1).contiguous()
    cfg = pick_config("fwd", M, N, K, blocksize, x.device, x.dtype, config)
    rp = r_pad(r)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _nf4_linear_kernel[grid](
        y,
        x, *weight_args(packed, absmax, nested_absmax, offset, x.device),
        x if lora_u is None else lora_u, x if lora_b is None else lora_b, x if bias is None else bias,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        0 if lora_u is None else lora_u.stride(0), 0 if lora_u is None else lora_u.stride(1),
        0 if lora_b is None else lora_b.stride(0), 0 if lora_b is None else lora_b.stride(1),
        M, N, K, r, float(scaling),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **weight_flags(N, K, blocksize, nested_absmax),
        R_PAD=rp, R_CHUNK=min(rp, cfg.r_chunk), HAS_LORA=lora_u is not None, HAS_BIAS=bias is not None,
        **dtype_flags(x.dtype), **fast_flags(N, K, blocksize, cfg.block_n, cfg.block_k, x.dtype),
        EVEN_M=M % cfg.block_m == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return y
