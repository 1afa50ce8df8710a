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
        nested = tl.load(nested_ptr + (b >> 8), mask=mask, other=0.0)  # b >= 0: b // 256 without sign fix-up
        scale = q * nested + tl.load(offset_ptr)
        scale = tl.where(mask, scale, 0.0)
    else:
        scale = tl.load(absmax_ptr + b, mask=mask, other=0.0)
    return scale


@triton.jit
def _nf4_scale_all(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, b, DOUBLE_QUANT: tl.constexpr):
    """_nf4_scale with every block present (the aligned fast path): no masks, no select."""
    if DOUBLE_QUANT:
        q = tl.load(dmap_ptr + tl.load(absmax_ptr + b).to(tl.int32))
        scale = q * tl.load(nested_ptr + (b >> 8)) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + b)
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


# ------------------------------------------------------------------------------------ register lookup (fast path)
# On the aligned fast path (no masks, BLOCK_K a multiple of BLOCKSIZE: one scale per tile row and block) each
# (row, block) first gets its table of the 16 products T[c] = round(NF4[c] * scale) in the activation dtype
# (float32 multiply, one rounding: bit-identical to the reference), held in 8 registers as byte planes (low /
# high byte of each 16-bit value) in halves of 8 codes. A packed int32 word (8 codes) is then looked up with
# byte permutes (lookup_asm: 22 instructions per word, two 16-bit values per output register). No memory
# access per weight.
#
# Thread layout (PERM_K, BLOCK_K = G * BLOCKSIZE with G >= 2): the block row's 32 bytes arrive as two [R, G, 4]
# int32 loads of the same shape, which Triton gives the same 16-byte-per-thread layout, so one thread holds a
# whole (row, block): one table per 64 weights, and adjacent lanes hold adjacent blocks of the row (so the
# dot operand's shared tile stays K-major: 16-byte stores). The two halves' values are joined without a
# permute, which leaves the tile's columns in the order k = g BLOCKSIZE + h BLOCKSIZE / 2 + 8 w + p at
# position g BLOCKSIZE + 16 w + 8 h + p (perm_k); the kernels load their activations (or store dx) in the same
# order. Without PERM_K (one block per tile row) a thread holds half a row and builds a table per 32 weights.
#
# sm_90 SASS of the forward's main loop (64x128x128, 4 warps, PERM_K: 128 weights per thread and iteration,
# 617 instructions = 4.82 per weight; bench/sass_report.py): lookup 352 (16 words x 22), tables 62 (two
# (row, block) tables of 31: 15 FMUL, 8 F2FP, 8 PRMT), the rest 203 = 1.6 per weight (wgmma and its fences,
# cp.async copies of x, words and scales, the tile's 16-byte shared stores, the scale rebuild, address and
# pipeline bookkeeping). Before PERM_K (64x128x64: 64 weights per thread) 373 = 5.83 per weight: two tables
# per 64 weights and the same fixed work over half the weights. Tried, not kept (triton 3.9): a whole row per
# thread with ONE block per tile row (G = 1) makes Triton's dot-operand pass fail ("Illegal shared layout"),
# and behind an opaque op it picks an N-major shared tile (the thread's lanes run along N): 64 STS.U16
# instead of 8 STS.128, 6.4 per weight.
def _nf4_values() -> list:
    # the format's table (_format.NF4_TABLE), as float32 bit patterns; literal so this module imports alone
    bits = (0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
            0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000)
    return ["0f%08X" % b for b in bits]


def table_asm(cvt: str) -> str:
    """$0..$3: low-byte planes of T[0..3], T[4..7], T[8..11], T[12..15]; $4..$7: high-byte planes; $8: scale."""
    v = _nf4_values()
    lines = ["{", ".reg .f32 p<16>;", ".reg .b32 t<8>;"]
    # NF4[15] = 1.0: x * 1.0 == x for every float32 (a NaN scale converts to the same canonical NaN)
    lines += [f"mul.rn.f32 p{c}, $8, {v[c]};" for c in range(15)] + ["mov.b32 p15, $8;"]
    lines += [f"{cvt} t{i}, p{2 * i + 1}, p{2 * i};" for i in range(8)]  # t_i = T[2i] | T[2i+1] << 16
    lines += [f"prmt.b32 ${q}, t{2 * q}, t{2 * q + 1}, 0x6420;" for q in range(4)]
    lines += [f"prmt.b32 ${4 + q}, t{2 * q}, t{2 * q + 1}, 0x7531;" for q in range(4)]
    lines.append("}")
    return "\n".join(lines)


def lookup_asm() -> str:
    """$0..$3 (32-bit): T[code] of the 8 codes of word $4 in memory order, two per register (the lower code in
    the low half: codes 0, 1 in $0, ..., 6, 7 in $3); $5..$12: the table planes.

    Memory order: byte j of the word holds codes 2j (high nibble) and 2j + 1 (low nibble). PRMT reads the 16
    low bits of its selector, one nibble per output byte (lo b0, hi b0, lo b1, hi b1), picks byte (nibble & 7)
    of its two sources and, when nibble bit 3 is set, replicates that byte's sign instead. So the word itself
    selects in the lower half of the table (codes >= 8 come out as sign bytes there), the word XOR 0x8888
    selects in the upper half (codes < 8 come out as sign bytes there), and a bitwise select (LOP3) keeps,
    byte by byte, the half that bit 3 of the code names. Its byte mask is one more PRMT in sign mode: bit 3
    of nibble i is bit 7 of a byte of the word or of the word << 4. Per word (8 codes): 3 shifts, 1 XOR,
    2 mask PRMTs, 8 lookup PRMTs, 4 selects, 4 interleave PRMTs = 22 instructions, no constant to hold.
    """
    lines = ["{", ".reg .b32 v, w1, v1, w4, m, l0, l1, l, h0, h1, h;",
             "xor.b32 v, $4, 0x88888888;",  # codes >= 8 -> index c - 8 of the upper half; codes < 8 -> sign mode
             "shl.b32 w4, $4, 4;",           # bit 3 of the codes in the low nibbles -> bit 7 of a byte
             "shr.u32 w1, $4, 16;", "shr.u32 v1, v, 16;"]
    for g, (sw, sv, msel) in enumerate((("$4", "v", "0x9D8C"), ("w1", "v1", "0xBFAE"))):
        lines += [
            f"prmt.b32 m, $4, w4, {msel};",            # 0xFF in byte i where bit 3 of nibble i of group g is set
            f"prmt.b32 l0, $5, $6, {sw};", f"prmt.b32 l1, $7, $8, {sv};", "lop3.b32 l, l0, l1, m, 0xD8;",
            f"prmt.b32 h0, $9, $10, {sw};", f"prmt.b32 h1, $11, $12, {sv};", "lop3.b32 h, h0, h1, m, 0xD8;",
            f"prmt.b32 ${2 * g}, l, h, 0x4051;",       # codes 4g + 0, 1 (hi nibble, lo nibble of byte 2g)
            f"prmt.b32 ${2 * g + 1}, l, h, 0x6273;",   # codes 4g + 2, 3
        ]
    lines.append("}")
    return "\n".join(lines)


_TABLE_ASM_BF16 = tl.constexpr(table_asm("cvt.rn.bf16x2.f32"))
_TABLE_ASM_FP16 = tl.constexpr(table_asm("cvt.rn.f16x2.f32"))
_LOOKUP_ASM = tl.constexpr(lookup_asm())


@triton.jit
def _interleave8(t0, t1, t2, t3, t4, t5, t6, t7):
    """[..., W] x 8 -> [..., 8 W]: position 8 j + p holds t_p[j] (joins in the minor dimension)."""
    v = tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))
    return v


@triton.jit
def _table(scale, ACT: tl.constexpr):
    """The 8 byte planes of T[c] = round(NF4[c] * scale) in ACT, for scale [R, G] (float32)."""
    if ACT == tl.bfloat16:
        planes = tl.inline_asm_elementwise(_TABLE_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [scale],
                                           dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        planes = tl.inline_asm_elementwise(_TABLE_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [scale],
                                           dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return planes


@triton.jit
def _halves(pair, ACT: tl.constexpr):
    """int32 holding two 16-bit values -> (low, high) in ACT (register views, no arithmetic after ptxas)."""
    lo = (pair & 0xFFFF).to(tl.int16).to(ACT, bitcast=True)
    hi = (pair >> 16).to(tl.int16).to(ACT, bitcast=True)
    return lo, hi


@triton.jit
def _lookup(words, p0, p1, p2, p3, p4, p5, p6, p7, ACT: tl.constexpr):
    """int32 words [...] -> values in ACT [..., 2, 2, 2] (codes 8 j + 4 c + 2 b + a of word j at [j, c, b, a]),
    with the table planes p0..p7 broadcast to the words' shape (_table)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _lookup_parts(words, p0, p1, p2, p3, p4, p5, p6, p7, ACT)
    return _interleave8(t0, t1, t2, t3, t4, t5, t6, t7)


@triton.jit
def _lookup_parts(words, p0, p1, p2, p3, p4, p5, p6, p7, ACT: tl.constexpr):
    """The 8 values of each word (codes 0..7 in memory order) as 8 tensors of the words' shape."""
    q0, q1, q2, q3 = tl.inline_asm_elementwise(
        _LOOKUP_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [words, p0, p1, p2, p3, p4, p5, p6, p7],
        dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    t0, t1 = _halves(q0, ACT)
    t2, t3 = _halves(q1, ACT)
    t4, t5 = _halves(q2, ACT)
    t6, t7 = _halves(q3, ACT)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _code_parts(words):
    """The 8 codes of each word in memory order (byte j = code 2j << 4 | code 2j + 1, little-endian)."""
    return ((words >> 4) & 0xF, words & 0xF, (words >> 12) & 0xF, (words >> 8) & 0xF,
            (words >> 20) & 0xF, (words >> 16) & 0xF, (words >> 28) & 0xF, (words >> 24) & 0xF)


@triton.jit
def perm_k(rk, BLOCKSIZE: tl.constexpr):
    """Column of W (and x) at tile position rk on the PERM_K path (runs of 8 stay contiguous)."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    k = (rk // BLOCKSIZE) * BLOCKSIZE + ((rk // 8) % 2) * HALF + ((rk % BLOCKSIZE) // 16) * 8 + rk % 8
    return tl.max_contiguous(tl.multiple_of(k, 8), 8)  # runs of 8 from multiples of 8: 16-byte loads


@triton.jit
def nf4_tile_fast(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr,
    rows, row0, k0, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, ACT: tl.constexpr, LUT_ASM: tl.constexpr, PERM_K: tl.constexpr = False,
):
    """W[row0 + rows, k0:k0 + BLOCK_K] in ACT (float16 / bfloat16), on the aligned fast path only:
    every row < N, K % BLOCK_K == 0, BLOCK_K a multiple of BLOCKSIZE, k0 a multiple of BLOCK_K (no masks).

    The packed bytes load as int32 words (8 codes each; 16-byte vector loads, which Triton can pipeline);
    LUT_ASM: the register lookup above (PTX); else the same values computed by the reference's gather (the
    interpreter runs this path). PERM_K (needs BLOCK_K >= 2 BLOCKSIZE): one thread per (row, block) and the
    tile's columns in perm_k order (see above); the caller orders its activations alike.
    """
    tl.static_assert(BLOCK_K % BLOCKSIZE == 0, "the fast path needs BLOCK_K a multiple of BLOCKSIZE")
    G: tl.constexpr = BLOCK_K // BLOCKSIZE  # blocks per tile row (2 at the default configs)
    WB: tl.constexpr = BLOCKSIZE // 8  # int32 words per block
    rows64 = rows.to(tl.int64)
    g = tl.arange(0, G)
    # [R, G]: the tile row's blocks. K % BLOCKSIZE == 0, so (row K + k0) / BLOCKSIZE splits into a per-row
    # part, which the compiler hoists out of the K loop, and a uniform k0 / BLOCKSIZE (no 64-bit division).
    # (row0: a scalar row offset, so the loop-varying part stays uniform when the rows move, as in dx)
    b = (rows64 * (K // BLOCKSIZE) + (row0 * (K // BLOCKSIZE) + k0 // BLOCKSIZE))[:, None] + g[None, :]  # < 2^31: N K / BLOCKSIZE blocks
    scale = _nf4_scale_all(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, b, DOUBLE_QUANT)
    word_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    first = tl.multiple_of(b * WB, [4, 4])  # K % 32 == 0: every block starts on a 16-byte boundary
    if PERM_K:
        # the block's two 16-byte halves as two loads of one shape (one layout: a thread holds both); their
        # values joined half-innermost of the word index: position 16 w + 8 h + p holds k = 32 h + 8 w + p
        tl.static_assert(G >= 2, "PERM_K needs two blocks per tile row (see the thread layout above)")
        WH: tl.constexpr = WB // 2
        wa = tl.load(word_ptr + first[:, :, None] + tl.arange(0, WH)[None, None, :])
        wb = tl.load(word_ptr + first[:, :, None] + WH + tl.arange(0, WH)[None, None, :])
        if LUT_ASM:
            scale = tl.max(tl.broadcast_to(scale[:, :, None], (BLOCK_R, G, WH)), axis=2)
            p0, p1, p2, p3, p4, p5, p6, p7 = _table(scale, ACT)
            ta = _lookup_parts(wa, p0[:, :, None], p1[:, :, None], p2[:, :, None], p3[:, :, None],
                               p4[:, :, None], p5[:, :, None], p6[:, :, None], p7[:, :, None], ACT)
            tb = _lookup_parts(wb, p0[:, :, None], p1[:, :, None], p2[:, :, None], p3[:, :, None],
                               p4[:, :, None], p5[:, :, None], p6[:, :, None], p7[:, :, None], ACT)
        else:
            ta = _code_parts(wa)
            tb = _code_parts(wb)
        v = _interleave8(tl.join(ta[0], tb[0]), tl.join(ta[1], tb[1]), tl.join(ta[2], tb[2]), tl.join(ta[3], tb[3]),
                         tl.join(ta[4], tb[4]), tl.join(ta[5], tb[5]), tl.join(ta[6], tb[6]), tl.join(ta[7], tb[7]))
        if LUT_ASM:
            w = tl.reshape(v, (BLOCK_R, BLOCK_K))
        else:
            codes = tl.reshape(v, (BLOCK_R, G, BLOCKSIZE))
            w = tl.reshape((tl.load(nf4_ptr + codes) * scale[:, :, None]).to(ACT), (BLOCK_R, BLOCK_K))
        return w
    words = tl.load(word_ptr + first[:, :, None] + tl.arange(0, WB)[None, None, :])  # [R, G, WB]
    if LUT_ASM:
        # The table is built where the words are: Triton spreads a row's words over 2 threads (16 bytes each),
        # and a table built in the scale's layout (one row per thread) would move its 8 planes through shared
        # memory (~40 instructions per tile row). Reducing a broadcast of the scale over the words' last axis
        # puts the scale in the words' layout (one float moved, a few max instructions) before the table.
        scale = tl.max(tl.broadcast_to(scale[:, :, None], (BLOCK_R, G, WB)), axis=2)
        p0, p1, p2, p3, p4, p5, p6, p7 = _table(scale, ACT)
        v = _lookup(words, p0[:, :, None], p1[:, :, None], p2[:, :, None], p3[:, :, None],
                    p4[:, :, None], p5[:, :, None], p6[:, :, None], p7[:, :, None], ACT)
        w = tl.reshape(v, (BLOCK_R, BLOCK_K))
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = _code_parts(words)
        codes = tl.reshape(_interleave8(c0, c1, c2, c3, c4, c5, c6, c7), (BLOCK_R, G, BLOCKSIZE))
        w = tl.reshape((tl.load(nf4_ptr + codes) * scale[:, :, None]).to(ACT), (BLOCK_R, BLOCK_K))
    return w


@triton.jit
def nf4_w_tile(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr,
    rn, n0, k0, N, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    FAST: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, ACT: tl.constexpr, LUT_ASM: tl.constexpr,
    PERM_K: tl.constexpr = False,
):
    """W[n0 + rn, k0:k0 + BLOCK_K]: the register-lookup fast path when FAST (every kernel's aligned case; n0
    stays a separate scalar so the block index stays uniform), else the general masked loader (float32)."""
    if FAST:
        w = nf4_tile_fast(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, rn, n0, k0, K,
                          BLOCK_R, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ACT, LUT_ASM, PERM_K)
    else:
        w = nf4_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, nf4_ptr, dmap_ptr, n0 + rn, k0, N, K,
                     BLOCK_R, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, EVEN_K, ALIGNED)
    return w

