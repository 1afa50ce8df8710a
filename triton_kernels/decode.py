"""Decode GEMV for M <= 16: y = x @ deq(W)^T + scaling * U @ B^T + bias, memory-bound on W.

Grid (N / BLOCK_N, SPLIT_K): each program streams BLOCK_N rows x one K chunk of packed bytes (the whole
row when SPLIT_K == 1, so a program reads one contiguous run of BLOCK_N * K / 2 bytes), dequantizes with
nf4_tile and reduces in float32:
- BLOCK_M == 16 (the default for every M <= 16): tl.dot on mma tiles, rows past M masked to zero. The
  tensor cores have ample headroom here, and a dot operand's loads are software-pipelined (cp.async,
  num_stages deep), which keeps enough bytes in flight per SM to stream W at HBM speed;
- BLOCK_M == 1 (M == 1, when a config asks for it): a [BLOCK_N, BLOCK_K] multiply-accumulate in registers,
  summed once after the loop; no tensor cores, but its loads are not pipelined (ptxas shows no cp.async).
SPLIT_K == 1 finishes in the same kernel (LoRA + bias epilogue). SPLIT_K > 1 (few rows, long K: not enough
programs to cover the SMs) writes float32 partials [SPLIT_K, M, N] (a few MB at most, which stay in L2)
and a second small kernel sums them in a fixed order (deterministic, no atomics) and runs the epilogue.
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
def _nf4_decode_kernel(
    y_ptr, part_ptr,
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, u_ptr, b_ptr, bias_ptr,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_um, stride_ur, stride_bn, stride_br,
    M, N, K, R, scaling, K_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, LUT_ASM: tl.constexpr,
    PERM_K: tl.constexpr,
):
    ACT: tl.constexpr = y_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # PERM: the W tile's columns arrive in perm_k order (nf4_tile_fast); x's follow. Not for the register-FMA
    # variant (BLOCK_M == 1): its [BLOCK_N, BLOCK_K] tile then loads in 8-byte pieces (ptxas) for no gain
    PERM: tl.constexpr = PERM_K and BLOCK_M > 1
    xk = perm_k(rk, BLOCKSIZE) if PERM else rk
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_start + xk)[None, :] * stride_xk

    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x = tl.load(x_ptrs, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            w = nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, 0, k0, N, K,
                           BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, FAST, EVEN_K, ALIGNED, ACT, LUT_ASM, PERM)
            acc2 += w.to(ACT).to(tl.float32) * x.to(tl.float32)
            x_ptrs += BLOCK_K * stride_xk
        acc = tl.reshape(tl.sum(acc2, axis=1), (1, BLOCK_N))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x = tl.load(x_ptrs, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            w = nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, 0, k0, N, K,
                           BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, FAST, EVEN_K, ALIGNED, ACT, LUT_ASM, PERM)
            if UPCAST:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(ACT).to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(ACT)), acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk

    mask = m_ok[:, None] & (rn < N)[None, :]
    if SPLIT_K == 1:
        acc = lora_bias_epilogue(acc, rm, rn, M, N, R, scaling, u_ptr, b_ptr, bias_ptr,
                                 stride_um, stride_ur, stride_bn, stride_br,
                                 ACT, R_PAD, R_CHUNK, HAS_LORA, HAS_BIAS, BLOCK_M >= 16, PRECISION, UPCAST)
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(ACT), mask=mask)
    else:
        p_ptrs = part_ptr + (pid_s * M + rm).to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(p_ptrs, acc, mask=mask)


@triton.jit
def _nf4_decode_reduce_kernel(
    y_ptr,
    part_ptr, u_ptr, b_ptr, bias_ptr,
    stride_ym, stride_yn, stride_um, stride_ur, stride_bn, stride_br,
    M, N, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    ACT: tl.constexpr = y_ptr.dtype.element_ty
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    p_ptrs = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: the result does not depend on scheduling
        acc += tl.load(p_ptrs + s * M * N, mask=mask, other=0.0)
    acc = lora_bias_epilogue(acc, rm, rn, M, N, R, scaling, u_ptr, b_ptr, bias_ptr,
                             stride_um, stride_ur, stride_bn, stride_br,
                             ACT, R_PAD, R_CHUNK, HAS_LORA, HAS_BIAS, BLOCK_M >= 16, PRECISION, UPCAST)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(ACT), mask=mask)


@on_input_device
def nf4_decode(
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
    """Same contract as `nf4_linear` (y [M, N] in x.dtype), for M <= 16."""
    M, N, K = x.shape[0], out_features, in_features
    if M > 16:
        raise ValueError(f"nf4_decode takes at most 16 rows, got {M}")
    x = activation(x, "x", K)
    check_weight(packed, absmax, nested_absmax, offset, N, K, blocksize, x.device)
    lora_u, lora_b, r = lora_pair(lora_u, lora_b, M, N, "lora_u", "lora_b")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    if bias is not None:
        bias = bias.reshape(-1).contiguous()
    cfg = pick_config("decode", M, N, K, blocksize, x.device, x.dtype, config)
    split = max(1, min(cfg.split_k, triton.cdiv(K, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg.block_k) * cfg.block_k
    split = max(1, triton.cdiv(K, k_per_split))
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    rp = r_pad(r)
    ptrs = (x if lora_u is None else lora_u, x if lora_b is None else lora_b, x if bias is None else bias)
    lora_strides = (
        0 if lora_u is None else lora_u.stride(0), 0 if lora_u is None else lora_u.stride(1),
        0 if lora_b is None else lora_b.stride(0), 0 if lora_b is None else lora_b.stride(1),
    )
    flags = dict(R_PAD=rp, R_CHUNK=min(rp, cfg.r_chunk), HAS_LORA=lora_u is not None, HAS_BIAS=bias is not None,
                 **dtype_flags(x.dtype))
    _nf4_decode_kernel[(triton.cdiv(N, cfg.block_n), split)](
        y, part,
        x, *weight_args(packed, absmax, nested_absmax, offset, x.device), *ptrs,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), *lora_strides,
        M, N, K, r, float(scaling), k_per_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        **weight_flags(N, K, blocksize, nested_absmax), **flags,
        **fast_flags(N, K, blocksize, cfg.block_n, cfg.block_k, x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    if split > 1:
        reduce_m = 1 if M == 1 else 16
        reduce_n = 128
        _nf4_decode_reduce_kernel[(triton.cdiv(N, reduce_n),)](
            y,
            part, *ptrs,
            y.stride(0), y.stride(1), *lora_strides,
            M, N, r, float(scaling),
            BLOCK_M=reduce_m, BLOCK_N=reduce_n, SPLIT_K=split, **flags,
            num_warps=4, num_stages=1, enable_fp_fusion=False,
        )
    return y
