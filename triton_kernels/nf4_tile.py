"""The one NF4 tile loader every Triton kernel here uses (forward, dx backward, decode GEMV).

`nf4_tile` returns W[rows, k0:k0 + BLOCK_K] of a row-major [N, K] NF4 weight as float32, dequantized in
registers exactly as `reference.dequantize_nf4_ref` does:

    flat  = row * K + col                  (blocks are runs of BLOCKSIZE flat values; they may straddle rows)
    code  = high nibble of byte flat // 2 when flat is even, else the low nibble
    scale = absmax[flat // BLOCKSIZE]                                             (float32 scales), or
            DYNAMIC_MAP[code8[b]] * nested_absmax[b // 256] + offset            (double quant: two roundings)
    w     = NF4_TABLE[code] * scale                                             (float32, one rounding)

The two roundings of the scale rebuild hold only when the kernel is compiled without FMA contraction:
every launcher here passes `enable_fp_fusion=False` (the matmul itself runs on mma/wgmma, unaffected).
"""

from __future__ import annotations

import triton
import triton.language as tl

NESTED_BLOCKSIZE = 256  # fixed by the format (_format.NESTED_BLOCKSIZE); a literal so the kernels can fold it


@triton.jit
def _nf4_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, b, mask, DOUBLE_QUANT: tl.constexpr):
    """float32 scale of block(s) b (any shape); 0.0 where mask is False."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        q = tl.load(dmap_ptr + code)
        nested = tl.load(nested_ptr + b // 256, mask=mask, other=0.0)
        scale = q * nested + tl.load(offset_ptr)
        scale = tl.where(mask, scale, 0.0)
    else:
        scale = tl.load(absmax_ptr + b, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_tile(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr,
    rows, k0, N, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    """float32 [BLOCK_R, BLOCK_K]: W[rows, k0:k0 + BLOCK_K], exactly 0.0 outside [0, N) x [0, K).

    rows: int [BLOCK_R]; k0: a multiple of BLOCK_K. EVEN_K: K % 2 == 0 (bytes never straddle rows, so a
    tile row is BLOCK_K // 2 contiguous bytes, loaded once and split into nibbles). ALIGNED: K % BLOCKSIZE
    == 0 (no block straddles a row). Needs BLOCK_K <= BLOCKSIZE unless ALIGNED.
    """
    rows64 = rows.to(tl.int64)
    row_ok = rows < N
    start = rows64 * K + k0  # flat index of each tile row's first value
    # --- codes: nibbles of the packed bytes; masked-off bytes read as 0x77 (code 7 = exactly 0.0)
    if EVEN_K:
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)
        bmask = row_ok[:, None] & ((k0 + 2 * j) < K)[None, :]
        byte = tl.load(packed_ptr + rows64[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=bmask, other=0x77)
        byte = byte.to(tl.int32)
        codes = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_R, BLOCK_K))
    else:
        # odd K: a row starts on a high or a low nibble; 64-bit row start + 32-bit in-tile offsets
        rel = tl.arange(0, BLOCK_K)
        par = (start & 1).to(tl.int32)[:, None] + rel[None, :]  # nibble index from the row's first byte
        mask = row_ok[:, None] & ((k0 + rel) < K)[None, :]
        byte = tl.load(packed_ptr + (start >> 1)[:, None] + (par >> 1), mask=mask, other=0x77).to(tl.int32)
        codes = (byte >> ((1 - (par & 1)) * 4)) & 0xF
    q = tl.load(nf4_ptr + codes)  # 16-entry table: stays in L1
    # --- scales: one per (row, block); a BLOCK_K chunk spans at most two blocks when BLOCK_K <= BLOCKSIZE
    b0 = start // BLOCKSIZE
    if BLOCK_K <= BLOCKSIZE:
        s0 = _nf4_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, b0, row_ok, DOUBLE_QUANT)
        if ALIGNED:
            w = q * s0[:, None]
        else:
            nb = (N.to(tl.int64) * K + BLOCKSIZE - 1) // BLOCKSIZE
            s1 = _nf4_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, b0 + 1, row_ok & (b0 + 1 < nb), DOUBLE_QUANT)
            second = ((start % BLOCKSIZE).to(tl.int32)[:, None] + tl.arange(0, BLOCK_K)[None, :]) >= BLOCKSIZE
            w = q * tl.where(second, s1[:, None], s0[:, None])
    else:
        # ALIGNED and BLOCK_K = G * BLOCKSIZE: G scales per row, each repeated over BLOCKSIZE columns
        tl.static_assert(ALIGNED, "BLOCK_K > BLOCKSIZE needs K % BLOCKSIZE == 0")
        G: tl.constexpr = BLOCK_K // BLOCKSIZE
        g = tl.arange(0, G)
        gmask = row_ok[:, None] & ((k0 + g * BLOCKSIZE) < K)[None, :]
        sg = _nf4_scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, b0[:, None] + g[None, :], gmask, DOUBLE_QUANT)
        scale = tl.reshape(tl.broadcast_to(sg[:, :, None], (BLOCK_R, G, BLOCKSIZE)), (BLOCK_R, BLOCK_K))
        w = q * scale
    return w
