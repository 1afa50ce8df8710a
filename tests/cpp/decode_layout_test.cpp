// Host test of the CUDA decode kernel's fragment layout and register lookup (csrc/nf4_decode_layout.h).
//
// For random packed codes, block scales and x, it builds every lane's A fragments with the kernel's own
// functions (word_sel, make_table, a_fragment: the PRMT lookup, emulated bit for bit on the host) and B
// fragments from b_k / b_m, runs mma.sync.m16n8k16 for 32 lanes as the PTX ISA defines the fragments
// ("Matrix Fragments for mma.m16n8k16 with floating point type", written out independently below), maps
// the accumulators back with c_row / c_m, and compares with a naive matmul of the reference dequantization.
// Also checks every A element bit for bit against round(T[c] * scale). Exit code 0: pass; 1: mismatch.
// Built by tests/test_decode_layout.py with g++ (-DQK_DEC_TEST_BREAK_B must make it fail).
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <random>

#include "nf4_decode_layout.h"

using namespace qk;

namespace {

// PTX m16n8k16 (.f16 / .bf16 A and B, .f32 C), groupID = lane >> 2, threadID_in_group = lane % 4:
// A element j (0..7; register j / 2, half j % 2): row g + 8 * ((j >> 1) & 1), col 2 t + (j & 1) + 8 * (j >> 2)
// B element j (0..3; register j / 2): row (k) 2 t + (j & 1) + 8 * (j >> 1), col g
// C element j (0..3): row g + 8 * (j >> 1), col 2 t + (j & 1)
int ptx_a_row(int lane, int j) { return (lane >> 2) + 8 * ((j >> 1) & 1); }
int ptx_a_col(int lane, int j) { return 2 * (lane & 3) + (j & 1) + 8 * (j >> 2); }
int ptx_b_row(int lane, int j) { return 2 * (lane & 3) + (j & 1) + 8 * (j >> 1); }
int ptx_b_col(int lane) { return lane >> 2; }
int ptx_c_row(int lane, int j) { return (lane >> 2) + 8 * (j >> 1); }
int ptx_c_col(int lane, int j) { return 2 * (lane & 3) + (j & 1); }

template <int DT>
float bits_to_float(uint32_t h) {
  return DT == kFloat16 ? half_bits_to_float((uint16_t)h) : bf16_bits_to_float((uint16_t)h);
}

// One mma over the warp: frag_a[lane][4], frag_b[lane][2] -> acc[lane][4] += A B (double: exact enough).
template <int DT>
void emulate_mma(const uint32_t (*fa)[4], const uint32_t (*fb)[2], double (*acc)[4]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 8; ++j) A[ptx_a_row(lane, j)][ptx_a_col(lane, j)] = bits_to_float<DT>(fa[lane][j >> 1] >> (16 * (j & 1)));
    for (int j = 0; j < 4; ++j) B[ptx_b_row(lane, j)][ptx_b_col(lane)] = bits_to_float<DT>(fb[lane][j >> 1] >> (16 * (j & 1)));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[ptx_c_row(lane, j)][k] * B[k][ptx_c_col(lane, j)];
      acc[lane][j] += s;
    }
}

template <int DT>
int run(uint32_t seed, int mt) {
  std::mt19937 rng(seed);
  const int R = dec::kRows, KT = dec::kTileK, M = 8 * mt;
  uint8_t codes[16][256];
  float scale[16][4];  // per row, per 64-block (blocksize 64)
  uint16_t xb[16][256];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < KT; ++k) codes[r][k] = (uint8_t)(rng() & 15u);
  std::uniform_real_distribution<float> us(-3.0f, 3.0f), ux(-2.0f, 2.0f);
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 4; ++b) scale[r][b] = std::ldexp(1.0f + std::fabs(us(rng)), (int)(rng() % 40) - 20);
  scale[0][0] = 0.0f;  // an all-zero block
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < KT; ++k)
      xb[m][k] = DT == kFloat16 ? float_to_half_bits(ux(rng)) : float_to_bf16_bits(ux(rng));
  // packed bytes of the tile, row-major, first element in the high nibble
  uint8_t packed[16][128];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 128; ++j) packed[r][j] = pack_pair(codes[r][2 * j], codes[r][2 * j + 1]);

  // reference: y[n][m] = sum_k deq(W)[n][k] x[m][k], deq rounded to the 16-bit type
  double ref[16][16] = {};
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < KT; ++k) {
        const float w = f_mul(nf4_value(codes[r][k]), scale[r][k / 64]);
        const uint16_t wb = DT == kFloat16 ? float_to_half_bits(w) : float_to_bf16_bits(w);
        ref[r][m] += (double)bits_to_float<DT>(wb) * (double)bits_to_float<DT>(xb[m][k]);
      }

  int bad = 0;
  double acc[2][32][4] = {};
  dec::Table ta[32], tb[32];
  dec::WordSel sa[32][8], sb[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int t = dec::lane_t(lane);
    ta[lane] = dec::make_table<DT>(scale[dec::a_row(lane, 0)][t]);
    tb[lane] = dec::make_table<DT>(scale[dec::a_row(lane, 1)][t]);
    for (int w = 0; w < 8; ++w) {  // the lane's 32 bytes of each row: words of bytes 32 t + 4 w ..
      uint32_t qa = 0, qb = 0;
      for (int j = 0; j < 4; ++j) {
        qa |= (uint32_t)packed[dec::a_row(lane, 0)][32 * t + 4 * w + j] << (8 * j);
        qb |= (uint32_t)packed[dec::a_row(lane, 1)][32 * t + 4 * w + j] << (8 * j);
      }
      sa[lane][w] = dec::word_sel(qa, 0x32103210u);
      sb[lane][w] = dec::word_sel(qb, 0x32103210u);
    }
  }
  for (int s = 0; s < dec::kSteps; ++s) {
    uint32_t fa[32][4], fb[2][32][2];
    for (int lane = 0; lane < 32; ++lane) {
      dec::a_fragment(ta[lane], tb[lane], sa[lane], sb[lane], s, fa[lane]);
      // every A element is the reference dequantization of the weight a_row / a_k name
      for (int i = 0; i < 4; ++i)
        for (int h = 0; h < 2; ++h) {
          const int r = dec::a_row(lane, i), k = dec::a_k(lane, s, i, h);
          const float w = f_mul(nf4_value(codes[r][k]), scale[r][k / 64]);
          const uint32_t want = DT == kFloat16 ? float_to_half_bits(w) : float_to_bf16_bits(w);
          if (((fa[lane][i] >> (16 * h)) & 0xffffu) != want && bad++ < 5)
            std::printf("A mismatch lane %d step %d reg %d half %d: %04x want %04x\n", lane, s, i, h,
                        (fa[lane][i] >> (16 * h)) & 0xffffu, want);
        }
      for (int nt = 0; nt < mt; ++nt)
        for (int i = 0; i < 2; ++i) {
          const int m = dec::b_m(lane, nt);
          fb[nt][lane][i] = (uint32_t)xb[m][dec::b_k(lane, s, i, 0)] | ((uint32_t)xb[m][dec::b_k(lane, s, i, 1)] << 16);
        }
    }
    for (int nt = 0; nt < mt; ++nt) emulate_mma<DT>(fa, fb[nt], acc[nt]);
  }
  for (int nt = 0; nt < mt; ++nt)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const int r = dec::c_row(lane, i), m = dec::c_m(lane, nt, i);
        const double want = ref[r][m], got = acc[nt][lane][i];
        // same products, summed in another order in double: any layout error is O(1), rounding ~1e-16
        if (std::fabs(got - want) > 1e-9 * (1.0 + std::fabs(want)) && bad++ < 5)
          std::printf("C mismatch n %d m %d: %.9g want %.9g\n", r, m, got, want);
      }
  return bad;
}

}  // namespace

int main() {
  int bad = 0;
  for (uint32_t seed = 1; seed <= 4; ++seed)
    for (int mt = 1; mt <= 2; ++mt) {
      bad += run<kBFloat16>(seed, mt);
      bad += run<kFloat16>(seed + 100, mt);
    }
  // every code through the lookup, for both tables' halves: all 16 codes in every nibble position
  for (int c0 = 0; c0 < 16; ++c0) {
    const dec::Table t = dec::make_table<kBFloat16>(0.37f);
    uint32_t q = 0;
    for (int n = 0; n < 8; ++n) q |= (uint32_t)((c0 + 3 * n) & 15) << (4 * n);
    const dec::WordSel w = dec::word_sel(q, 0x32103210u);
    for (int h = 0; h < 2; ++h) {
      uint32_t r0, r1;
      dec::lookup4(t, w.qm[h], w.sel[h], r0, r1);
      const int c[4] = {(int)(q >> (16 * h + 4)) & 15, (int)(q >> (16 * h)) & 15, (int)(q >> (16 * h + 12)) & 15,
                        (int)(q >> (16 * h + 8)) & 15};  // k, k+1, k+2, k+3
      const uint32_t got[4] = {r0 & 0xffffu, r0 >> 16, r1 & 0xffffu, r1 >> 16};
      for (int j = 0; j < 4; ++j)
        if (got[j] != float_to_bf16_bits(f_mul(nf4_value(c[j]), 0.37f)) && bad++ < 10)
          std::printf("lookup mismatch code %d\n", c[j]);
    }
  }
  std::printf(bad ? "FAIL: %d mismatches\n" : "OK\n", bad);
  return bad ? 1 : 0;
}
