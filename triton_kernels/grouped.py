"""Grouped NF4 kernels for mixture-of-experts layers: one launch computes every expert's
    y[rows_e]  = x[rows_e] @ deq(W_e)^T + scaling * U[rows_e] @ B_e^T          (forward)
    dx[rows_e] = dy[rows_e] @ deq(W_e) + scaling * G[rows_e] @ A_e              (input gradient)
for tokens sorted by expert (offsets int64 [E+1]), with the dense kernels' NF4 tile code (nf4_tile.nf4_w_tile:
the PERM_K two-block tiles on triton >= 3.9, the one-block tiles below, as configs chooses) and LoRA epilogue.
Contract and checks: qlora_kernels/_grouped_ops.py.

Tile schedule without a host sync: the grid covers an upper bound of the M-tiles, T // BLOCK_M + min(E, T)
(expert e needs ceil(rows_e / BLOCK_M) tiles, at most rows_e / BLOCK_M + 1 when it has rows, 0 when empty),
times the N-tiles (forward) or K-tiles (dx). Each program reads the E + 1 offsets as one vector, turns them
into per-expert tile counts and their running sum (tl.cumsum), and finds its expert as the number of experts
whose tiles all lie before its tile; programs past the last tile return at once. An expert with no tokens
has no tile. Inside a tile every row index is clamped to T - 1 for the loads (always in bounds, so the main
loop needs no row mask: rows past the expert's end are computed and not stored).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._grouped_ops import check_grouped
from ._common import dtype_flags, fast_flags, lora_bias_epilogue, on_input_device, r_pad, weight_args, weight_flags
from .configs import LaunchConfig, pick_config
from .nf4_tile import nf4_w_tile, perm_k


@triton.jit
def _tile_expert(offsets_ptr, t, E, T, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row of the tile, the expert's end row) of M-tile t; expert >= E past the last tile."""
    idx = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + idx, mask=idx < E, other=0)
    hi = tl.load(offsets_ptr + idx + 1, mask=idx < E, other=0)
    tiles = ((hi - lo + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
    end = tl.cumsum(tiles, 0)  # tiles of experts 0..e; padding entries repeat the total
    e = tl.sum((end <= t).to(tl.int32), 0)
    mine = idx == e
    first_tile = tl.sum(tl.where(mine, end - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, lo, 0), 0) + (t - first_tile).to(tl.int64) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    # offsets that break the contract (the op's device assert reports them asynchronously) must not make the
    # kernel touch rows outside [0, T): loads clamp to [row0, T - 1], stores and LoRA loads stop at row_end
    return e, tl.maximum(row0, 0), tl.minimum(row_end, T)


@triton.jit
def _grouped_pid(pid, max_tiles, num_cols, GROUP_M: tl.constexpr):
    """(M-tile, column tile) of a program: GROUP_M M-tiles share each column tile (the dense kernels' order)."""
    per_group = GROUP_M * num_cols
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(max_tiles - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _nf4_grouped_linear_kernel(
    y_ptr,
    x_ptr, offsets_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, u_ptr, b_ptr,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_um, stride_ur, stride_be, stride_bn, stride_br,
    stride_pe, stride_ae, stride_ne,
    T, E, N, K, R, scaling, MAX_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, LUT_ASM: tl.constexpr,
    PERM_K: tl.constexpr,
):
    ACT: tl.constexpr = y_ptr.dtype.element_ty
    t, pid_n = _grouped_pid(tl.program_id(0), MAX_TILES, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, row0, row_end = _tile_expert(offsets_ptr, t, E, T, BLOCK_M, E_PAD)
    if e >= E:
        return
    # expert e's weight: its own packed bytes, scales, nested scales and offset (a Linear weight's layout)
    e64 = e.to(tl.int64)
    packed_ptr += e64 * stride_pe
    absmax_ptr += e64 * stride_ae
    if DOUBLE_QUANT:
        nested_ptr += e64 * stride_ne
        offset_ptr += e
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    xk = perm_k(rk, BLOCKSIZE) if PERM_K else rk  # x's columns follow the W tile's (nf4_tile_fast)
    x_ptrs = x_ptr + tl.minimum(rm, T - 1)[:, None] * stride_xm + xk[None, :] * stride_xk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if FAST:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=((k0 + rk) < K)[None, :], other=0.0)
        w = nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, 0, k0, N, K,
                       BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, FAST, EVEN_K, ALIGNED, ACT, LUT_ASM, PERM_K)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(ACT).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(ACT)), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    acc = lora_bias_epilogue(acc, rm, rn, row_end, N, R, scaling, u_ptr, b_ptr + e64 * stride_be, u_ptr,
                             stride_um, stride_ur, stride_bn, stride_br,
                             ACT, R_PAD, R_CHUNK, HAS_LORA, False, True, PRECISION, UPCAST)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(ACT), mask=(rm < row_end)[:, None] & (rn < N)[None, :])


@triton.jit
def _nf4_grouped_dx_kernel(
    dx_ptr,
    dy_ptr, offsets_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, g_ptr, a_ptr,
    stride_dym, stride_dyn, stride_dxm, stride_dxk, stride_gm, stride_gr, stride_ae_lora, stride_ar, stride_ak,
    stride_pe, stride_ae, stride_ne,
    T, E, N, K, R, scaling, MAX_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, LUT_ASM: tl.constexpr,
    PERM_K: tl.constexpr,
):
    ACT: tl.constexpr = dx_ptr.dtype.element_ty
    t, pid_k = _grouped_pid(tl.program_id(0), MAX_TILES, tl.cdiv(K, BLOCK_K), GROUP_M)
    e, row0, row_end = _tile_expert(offsets_ptr, t, E, T, BLOCK_M, E_PAD)
    if e >= E:
        return
    e64 = e.to(tl.int64)
    packed_ptr += e64 * stride_pe
    absmax_ptr += e64 * stride_ae
    if DOUBLE_QUANT:
        nested_ptr += e64 * stride_ne
        offset_ptr += e
    rm = row0 + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    # PERM_K: the W tile's columns (dx's) arrive in perm_k order; the epilogue and the store follow it
    rk = k0 + (perm_k(tl.arange(0, BLOCK_K), BLOCKSIZE) if PERM_K else tl.arange(0, BLOCK_K))
    rn = tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + tl.minimum(rm, T - 1)[:, None] * stride_dym + rn[None, :] * stride_dyn

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        if FAST:  # N % BLOCK_N == 0: no mask
            dy = tl.load(dy_ptrs)
        else:
            dy = tl.load(dy_ptrs, mask=((n0 + rn) < N)[None, :], other=0.0)
        w = nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, n0, k0, N, K,
                       BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, FAST, EVEN_K, ALIGNED, ACT, LUT_ASM, PERM_K)
        if UPCAST:
            acc = tl.dot(dy.to(tl.float32), w.to(ACT).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w.to(ACT), acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn

    # G [rows, r] @ A_e [r, K]: A_e is indexed [k, r] by the epilogue, i.e. strides (stride_ak, stride_ar)
    acc = lora_bias_epilogue(acc, rm, rk, row_end, K, R, scaling, g_ptr, a_ptr + e64 * stride_ae_lora, g_ptr,
                             stride_gm, stride_gr, stride_ak, stride_ar,
                             ACT, R_PAD, R_CHUNK, HAS_LORA, False, True, PRECISION, UPCAST)
    dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(ACT), mask=(rm < row_end)[:, None] & (rk < K)[None, :])


def max_tiles(T: int, E: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(rows_e / block_m) over E experts holding T rows (no host sync)."""
    return T // block_m + min(E, T)


def _prepare(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, dx, validate):
    if validate:
        check_grouped(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, dx=dx)
    E = packed.shape[0]
    if x.stride(1) != 1 and x.numel():
        x = x.contiguous()
    packed, absmax, offsets = packed.contiguous(), absmax.contiguous(), offsets.contiguous()
    if nested_absmax is not None:
        nested_absmax, offset = nested_absmax.contiguous(), offset.contiguous()
    return E, x, offsets, packed, absmax, nested_absmax, offset


def _expert_strides(packed, absmax, nested_absmax) -> tuple:
    return packed.stride(0), absmax.stride(0), 0 if nested_absmax is None else nested_absmax.stride(0)


@on_input_device
def nf4_grouped_linear_triton(
    x: Tensor,
    offsets: Tensor,
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
    *,
    config: Optional[LaunchConfig] = None,
    validate: bool = True,
) -> Tensor:
    """Grouped NF4 forward, one launch: y [T, N] in x.dtype (what qlora::nf4_grouped_linear runs on CUDA).

    x [T, K] f16/bf16/f32 sorted by expert, offsets int64 [E+1]; packed uint8 [E, N*K/2], absmax [E, nb] (float32,
    or uint8 with nested_absmax float32 [E, ceil(nb/256)] and offset float32 [E]); lora_u [T, r], lora_b [E, N, r].
    validate=False skips the argument checks (the op has made them: _grouped_ops.check_grouped).
    """
    N, K = out_features, in_features
    E, x, offsets, packed, absmax, nested_absmax, offset = _prepare(
        x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_b, False, validate)
    T = x.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0 or N == 0:
        return y
    r = 0 if lora_u is None else lora_u.shape[1]
    cfg = pick_config("gfwd", T, N, K, blocksize, x.device, x.dtype, config)
    tiles = max_tiles(T, E, cfg.block_m)
    rp = r_pad(r)
    _nf4_grouped_linear_kernel[(tiles * triton.cdiv(N, cfg.block_n),)](
        y,
        x, offsets, *weight_args(packed, absmax, nested_absmax, offset, x.device),
        x if lora_u is None else lora_u, x if lora_b is None else lora_b,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        *((0, 0) if lora_u is None else lora_u.stride()), *((0, 0, 0) if lora_b is None else lora_b.stride()),
        *_expert_strides(packed, absmax, nested_absmax),
        T, E, N, K, r, float(scaling), tiles,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        E_PAD=triton.next_power_of_2(E),
        **weight_flags(N, K, blocksize, nested_absmax),
        R_PAD=rp, R_CHUNK=min(rp, cfg.r_chunk), HAS_LORA=lora_u is not None,
        **dtype_flags(x.dtype), **fast_flags(N, K, blocksize, cfg.block_n, cfg.block_k, x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return y


@on_input_device
def nf4_grouped_linear_dx_triton(
    dy: Tensor,
    offsets: Tensor,
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
    validate: bool = True,
) -> Tensor:
    """Grouped NF4 input gradient, one launch: dx [T, K] in dy.dtype (qlora::nf4_grouped_linear_dx on CUDA).

    dy [T, N] sorted by expert, offsets int64 [E+1], the weight tensors as the forward, lora_g [T, r] and
    lora_a [E, r, K]; validate as the forward."""
    N, K = out_features, in_features
    E, dy, offsets, packed, absmax, nested_absmax, offset = _prepare(
        dy, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_g, lora_a, True, validate)
    T = dy.shape[0]
    dx = torch.empty(T, K, dtype=dy.dtype, device=dy.device)
    if T == 0 or K == 0:
        return dx
    r = 0 if lora_g is None else lora_g.shape[1]
    cfg = pick_config("gdx", T, N, K, blocksize, dy.device, dy.dtype, config)
    tiles = max_tiles(T, E, cfg.block_m)
    rp = r_pad(r)
    _nf4_grouped_dx_kernel[(tiles * triton.cdiv(K, cfg.block_k),)](
        dx,
        dy, offsets, *weight_args(packed, absmax, nested_absmax, offset, dy.device),
        dy if lora_g is None else lora_g, dy if lora_a is None else lora_a,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        *((0, 0) if lora_g is None else lora_g.stride()), *((0, 0, 0) if lora_a is None else lora_a.stride()),
        *_expert_strides(packed, absmax, nested_absmax),
        T, E, N, K, r, float(scaling), tiles,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        E_PAD=triton.next_power_of_2(E),
        **weight_flags(N, K, blocksize, nested_absmax),
        R_PAD=rp, R_CHUNK=min(rp, cfg.r_chunk), HAS_LORA=lora_g is not None,
        **dtype_flags(dy.dtype), **fast_flags(N, K, blocksize, cfg.block_n, cfg.block_k, dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return dx
