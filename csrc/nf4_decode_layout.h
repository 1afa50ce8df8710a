// Fragment layout and register lookup of the CUDA decode kernel (nf4_decode_cuda.cu), as __host__ __device__
// functions so that a host test (tests/cpp/decode_layout_test.cpp) runs the kernel's own index math and its
// own PRMT lookup against an mma.sync.m16n8k16 emulation written from the PTX ISA fragment tables.
//
// The product is y^T = deq(W) x^T: W [16 rows, 16 k] is the A operand (row major), x^T [16 k, 8 m] the B
// operand, fp32 accumulators C [16 rows, 8 m]. A warp tile is 16 rows x 256 k; lane (g = lane / 4,
// t = lane % 4) owns rows g and g + 8 and, in each row, the 64 consecutive weights k = 64 t .. 64 t + 63
// (32 packed bytes: two 16-byte loads per row, one NF4 block when blocksize >= 64, so one product table).
// The tile's 16 mma steps take the k order freely: step s feeds lane t's four A slots of a row (PTX slots
// 2t, 2t+1, 2t+8, 2t+9) with k = 64 t + 4 s + (0, 1, 2, 3), i.e. packed bytes 2s and 2s+1 of the lane's
// 32. x's B fragment uses the SAME map (b0 = k 64 t + 4 s + (0, 1), b1 = + (2, 3) of x row m = g (+ 8 for
// the second n8 tile)), so each lane's nibbles land in its own fragment registers: no shuffles.
#pragma once

#include <cstdint>

#include "nf4_format.h"

namespace qk {
namespace dec {

constexpr int kRows = 16;    // W rows per warp tile (mma M)
constexpr int kTileK = 256;  // k per warp tile
constexpr int kSteps = 16;   // mma k16 steps per tile
constexpr int kLaneK = 64;   // weights per lane per row per tile

QK_HD int lane_g(int lane) { return lane >> 2; }
QK_HD int lane_t(int lane) { return lane & 3; }

// A register i (0..3) of `lane`: which tile row it holds. (PTX: a0, a2 row g; a1, a3 row g + 8.)
QK_HD int a_row(int lane, int i) { return lane_g(lane) + 8 * (i & 1); }
// Element h (0 low half, 1 high half) of A register i at step s: its k inside the 256-wide tile.
QK_HD int a_k(int lane, int s, int i, int h) { return kLaneK * lane_t(lane) + 4 * s + 2 * (i >> 1) + h; }
// Element h of B register i (0..1) at step s: its k (must equal a_k of the matching PTX slot) ...
QK_HD int b_k(int lane, int s, int i, int h) {
#ifdef QK_DEC_TEST_BREAK_B  // the host test's negative control: x in a k order that differs from W's
  return kLaneK * lane_t(lane) + 4 * s + 2 * (1 - i) + h;
#else
  return kLaneK * lane_t(lane) + 4 * s + 2 * i + h;
#endif
}
// ... and its x row (m) for n8 tile nt.
QK_HD int b_m(int lane, int nt) { return lane_g(lane) + 8 * nt; }
// Accumulator i (0..3) of n8 tile nt: tile row (output column n) and x row m. (PTX: c0, c1 row g; c2, c3 row
// g + 8; columns 2t, 2t + 1.)
QK_HD int c_row(int lane, int i) { return lane_g(lane) + 8 * (i >> 1); }
QK_HD int c_m(int lane, int nt, int i) { return 8 * nt + 2 * lane_t(lane) + (i & 1); }

// The lane's packed bytes of one row in a tile: bytes [32 t, 32 t + 32) of the row's 128-byte tile slice,
// i.e. 8 words w[0..7]; step s reads the 16 bits (w[s / 2] >> (16 * (s % 2))) & 0xffff = packed bytes 2s, 2s+1
// = codes of k 4s+1, 4s, 4s+3, 4s+2 in nibbles 0..3 (the first element of a byte sits in its high nibble).

// PRMT in its default mode (PTX prmt.b32): byte n of the result is byte (s >> 4n) & 7 of the 8-byte value
// {y:x} (x = bytes 0..3), or, when bit 3 of that selector nibble is set, that byte's sign bit replicated
// (0x00 / 0xff). Raw PRMT, not __byte_perm: __byte_perm clears bit 3 with an extra LOP3 per use; here one
// LOP3 per 8 codes clears it (word_sel).
QK_HD uint32_t prmt(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t v = ((uint64_t)y << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t nib = (s >> (4 * n)) & 15u;
    uint32_t b = (uint32_t)(v >> (8 * (nib & 7))) & 0xffu;
    if (nib & 8) b = (b & 0x80u) ? 0xffu : 0u;
    r |= b << (8 * n);
  }
  return r;
#endif
}

// Per (row, NF4 block): the 16 products P[c] = round(T[c] * scale) (fp32 multiply, one rounding to the
// 16-bit type: bit-identical to the reference dequantization) as byte planes: lo[j] holds the low bytes of
// P[4j .. 4j+3], hi[j] their high bytes. Planes, because a PRMT looks up 4 bytes in an 8-byte table.
struct Table {
  uint32_t lo[4], hi[4];
};

// Two 16-bit values packed (a in the low half), rounded to nearest even from fp32.
template <int DT>
QK_HD uint32_t pack2(float a, float b) {
#if defined(__CUDA_ARCH__)
  if (DT == kFloat16) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
#else
  if (DT == kFloat16) return (uint32_t)float_to_half_bits(a) | ((uint32_t)float_to_half_bits(b) << 16);
  return (uint32_t)float_to_bf16_bits(a) | ((uint32_t)float_to_bf16_bits(b) << 16);
#endif
}

template <int DT>
QK_HD Table make_table(float scale) {
  uint32_t p[8];  // p[j] = P[2j] | P[2j+1] << 16
#define QK_P(j, a, b) p[j] = pack2<DT>(f_mul(a, scale), f_mul(b, scale))
  p[0] = pack2<DT>(-scale, f_mul(kT1, scale));  // T0 = -1, T15 = 1: exact products
  QK_P(1, kT2, kT3);
  QK_P(2, kT4, kT5);
  QK_P(3, kT6, kT7);
  QK_P(4, kT8, kT9);
  QK_P(5, kT10, kT11);
  QK_P(6, kT12, kT13);
  p[7] = pack2<DT>(f_mul(kT14, scale), scale);
#undef QK_P
  Table t;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    t.lo[j] = prmt(p[2 * j], p[2 * j + 1], 0x6420u);
    t.hi[j] = prmt(p[2 * j], p[2 * j + 1], 0x7531u);
  }
  return t;
}

// The selectors of one packed word q (8 codes; a PRMT reads the low 16 bits of its selector, so the upper 4
// codes take the word shifted by 16):
// - qm = q & 0x7777...: the lookup index c & 7 (bit 3 clear: PRMT's default mode would otherwise return the
//   byte's sign replicated), the same for the low-half and the high-half tables;
// - sel: nibble n = n % 4 + 4 * (bit 3 of code n): byte n % 4 of the low-half lookup, or of the high-half
//   lookup 4 bytes further. `base` = 0x32103210 (a register: one LOP3 instead of two).
// 5 instructions per 8 codes (qm, qm >> 16, q >> 1, sel, sel >> 16).
struct WordSel {
  uint32_t qm[2], sel[2];  // [0]: codes 0..3 (bits 0..15), [1]: codes 4..7
};
QK_HD WordSel word_sel(uint32_t q, uint32_t base) {
  WordSel w;
  w.qm[0] = q & 0x77777777u, w.qm[1] = w.qm[0] >> 16;
  w.sel[0] = ((q >> 1) & 0x44444444u) | base, w.sel[1] = w.sel[0] >> 16;
  return w;
}

// Four weights from 16 bits of packed codes (nibbles: k+1, k, k+3, k+2; selectors from word_sel):
// r0 = {P(k), P(k+1)}, r1 = {P(k+2), P(k+3)} as 16-bit pairs (low half first): the A registers of slots
// (2t, 2t+1) and (2t+8, 2t+9). 8 PRMTs: per byte plane 2 lookups + 1 select, then 2 interleaves.
QK_HD void lookup4(const Table& t, uint32_t qm, uint32_t sel, uint32_t& r0, uint32_t& r1) {
  const uint32_t lo = prmt(prmt(t.lo[0], t.lo[1], qm), prmt(t.lo[2], t.lo[3], qm), sel);
  const uint32_t hi = prmt(prmt(t.hi[0], t.hi[1], qm), prmt(t.hi[2], t.hi[3], qm), sel);
  r0 = prmt(lo, hi, 0x4051u);  // {lo1, hi1, lo0, hi0}: nibble 1 (k) in the low half, nibble 0 (k+1) high
  r1 = prmt(lo, hi, 0x6273u);  // {lo3, hi3, lo2, hi2}
}

// A registers of step s from the selectors of the lane's two rows' words (sa: row g, sb: row g + 8; step s
// reads word s / 2, half s % 2).
QK_HD void a_fragment(const Table& ta, const Table& tb, const WordSel (&sa)[8], const WordSel (&sb)[8], int s,
                      uint32_t (&a)[4]) {
  const WordSel& wa = sa[s >> 1];
  const WordSel& wb = sb[s >> 1];
  const int h = s & 1;
  lookup4(ta, wa.qm[h], wa.sel[h], a[0], a[2]);
  lookup4(tb, wb.qm[h], wb.sel[h], a[1], a[3]);
}

}  // namespace dec
}  // namespace qk
