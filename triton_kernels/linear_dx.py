"""Fused QLoRA input gradient: dx = dy @ deq(W) + scaling * G @ A, the forward kernel's twin.

Each program owns a [BLOCK_M, BLOCK_K] tile of dx and walks the N (reduction) axis in BLOCK_N steps,
dequantizing W[n0:n0 + BLOCK_N, k-tile] in registers with the same nf4_tile helper as the forward.
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
def _nf4_linear_dx_kernel(
    dx_ptr,
    dy_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, g_ptr, a_ptr,
    stride_dym, stride_dyn, stride_dxm, stride_dxk, stride_gm, stride_gr, stride_ar, stride_ak,
    M, N, K, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, LUT_ASM: tl.constexpr,
    PERM_K: tl.constexpr,
    EVEN_M: tl.constexpr,
):
    ACT: tl.constexpr = dx_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * num_k
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_k = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    # PERM_K: the W tile's columns (dx's) arrive in perm_k order (nf4_tile_fast); the epilogue and the store
    # use the same order
    rk = k0 + (perm_k(tl.arange(0, BLOCK_K), BLOCKSIZE) if PERM_K else tl.arange(0, BLOCK_K))
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    dy_ptrs = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :] * stride_dyn

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        if FAST and EVEN_M:  # N % BLOCK_N == 0 and M % BLOCK_M == 0: no mask (no predicated copies)
            dy = tl.load(dy_ptrs)
        elif FAST:
            dy = tl.load(dy_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            dy = tl.load(dy_ptrs, mask=m_ok[:, None] & ((n0 + rn) < N)[None, :], other=0.0)
        w = nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, n0, k0, N, K,
                       BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, FAST, EVEN_K, ALIGNED, ACT, LUT_ASM, PERM_K)
        if UPCAST:
            acc = tl.dot(dy.to(tl.float32), w.to(ACT).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w.to(ACT), acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn

    # G [M, r] @ A [r, K]: A is indexed [k, r] by the epilogue, i.e. strides (stride_ak, stride_ar)
    acc = lora_bias_epilogue(acc, rm, rk, M, K, R, scaling, g_ptr, a_ptr, a_ptr,
                             stride_gm, stride_gr, stride_ak, stride_ar,
                             ACT, R_PAD, R_CHUNK, HAS_LORA, False, True, PRECISION, UPCAST)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(ACT), mask=m_ok[:, None] & (rk < K)[None, :])


@on_input_device
def nf4_linear_dx(
    dy: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    lora_g: Optional[Tensor] = None,
    lora_a: Optional[Tensor] = None,
    scaling: float = 1.0,
    *,
    config: Optional[LaunchConfig] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Fused NF4 input gradient. dy [M, N] f16/bf16/f32 (last stride 1), lora_g [M, r], lora_a [r, K].

    Returns dx [M, K] in dy.dtype (or writes `out`).
    """
    M, N, K = dy.shape[0], out_features, in_features
    dy = activation(dy, "dy", N)
    check_weight(packed, absmax, nested_absmax, offset, N, K, blocksize, dy.device)
    lora_g, a_t, r = lora_pair(lora_g, None if lora_a is None else lora_a.t(), M, K, "lora_g", "lora_a")
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device) if out is None else out
    if M == 0 or K == 0:
        return dx
    cfg = pick_config("dx", M, N, K, blocksize, dy.device, dy.dtype, config)
    rp = r_pad(r)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(K, cfg.block_k),)
    _nf4_linear_dx_kernel[grid](
        dx,
        dy, *weight_args(packed, absmax, nested_absmax, offset, dy.device),
        dy if lora_g is None else lora_g, dy if lora_a is None else lora_a,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        0 if lora_g is None else lora_g.stride(0), 0 if lora_g is None else lora_g.stride(1),
        0 if lora_a is None else lora_a.stride(0), 0 if lora_a is None else lora_a.stride(1),
        M, N, K, r, float(scaling),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **weight_flags(N, K, blocksize, nested_absmax),
        R_PAD=rp, R_CHUNK=min(rp, cfg.r_chunk), HAS_LORA=lora_g is not None,
        **dtype_flags(dy.dtype), **fast_flags(N, K, blocksize, cfg.block_n, cfg.block_k, dy.dtype),
        EVEN_M=M % cfg.block_m == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return dx
