// CPU kernels of the fused AdamW steps. One call per tensor and step: a scan of the gradient for values that
// would poison the states, then one pass over blocks of 256 values: dequantize both states, update in float32,
// write the parameter in its dtype, requantize (absmax, codes). The x86 paths are AVX2 intrinsics (8 lanes,
// the same IEEE operations in the same order as optim_format.h, so the same bits), compiled for AVX2 and again
// for AVX-512 through target attributes; the portable path is plain loops. Chosen at run time from
// qk::cpu_isa(), like the NF4 kernels. std::thread chunks (cpu_threads.h).
//
// Where the time goes (issue 11; AMD EPYC Zen 3, AVX2, one thread, float32). Method: builds of this file
// loaded side by side in one process, calls interleaved, min of 300 per build at 64K values (L2-resident);
// the 2 vCPUs carried load ~3-4.5 from other jobs, so absolute figures run ~1.3x high, ratios hold.
//   before: 2.26-2.33 ns/value -> bitsandbytes' one-division update (optim_format.h adamw8_update) 2.11-2.18
//   -> quantizer table indexed by the top 16 bits directly (bucket = one shift) 2.00-2.04 -> its entries moved
//   as float lanes (vinsertps, not vpinsrd) 1.92-1.95 -> decode by broadcast loads + blends: 1-4% more.
//   About 16% off the step; torch's fused fp32 AdamW at that size is overhead-bound (~2 ns/value).
// Breakdown of this kernel (stubbed builds, same run, load ~4.5, total 2.49 ns/value): decode lookups 0.77
// (31%), requantize lookups 0.67 (27%), both 1.14 (46%); the square root and division 0 (stubbing them saves
// nothing: they run on FP1 under the lookups' load/blend traffic); gradient scan 0.19 (8%); with all of
// those stubbed 1.00 (40%: three passes of loads/stores over the block, the code arithmetic, packing, absmax).
// llvm-mca -mcpu=znver3 per 8 values: main pass 22.5 cycles (FP1 19.7: sqrt 5 + div 3, multiplies, blends),
// requantize pass 13.1 (16 table loads into vector lanes, 2 per cycle), bucket pass 2: ~4.7 cycles per value
// (this VM exposes no cycle counter, so no measured clock to convert). Floor: the 4 lookups alone are 32
// vector-lane loads per 8 values, 16 cycles (2 per value), with the divider's 8 on FP1 beside them. torch's
// fused fp32 AdamW in cache takes 0.65 ns/value on one thread, 1.6-2.4 cycles at Zen 3 EPYC clocks (2.45-3.7
// GHz): at or below that floor, so parity at 1M is out of reach bit-exactly; streaming (16M/64M, ~1.0-1.3
// ns/value) the floor is about torch's time, and this kernel runs ~2x above it (the three passes'
// loads/stores and the code arithmetic, above). Bit-exactness rules out FMA, approximate
// reciprocals and table-free decoding of the maps (an arithmetic decode of the dynamic maps is exact, with
// linspace's FMA, but costs ~30 vector ops per 8 codes, more than the 8 loads it replaces; vgatherdps ~50%
// slower than the broadcast loads; the quantizer as a per-8 fused pass lost ~15% to store forwarding).
// Streaming (16M/64M) costs 1.1-2.5x the in-cache time depending on the machine's load: 16 B per value at
// 3-5 GB/s, not bandwidth-bound; _mm_prefetch of param/grad/codes 6 blocks ahead gave 2-4% (noise), and
// the gradient scan must read the whole gradient before any write (a skipped step leaves everything as it
// was), so it stays a pass of its own (~0.35-0.45 ns/value streaming). The 2 vCPUs do not scale under load
// (process time ~= wall time); torch's fused AdamW scales no better.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu_threads.h"
#include "nf4_kernels.h"
#include "optim_format.h"
#include "optim_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(QK_NO_X86_SIMD)
#define QK_OPT_X86 1
#include <immintrin.h>
#else
#define QK_OPT_X86 0
#endif

#define QK_ALWAYS_INLINE __attribute__((always_inline)) inline
// x86 vector helpers: inlined into the AVX2 and the AVX-512 kernels (an AVX2 callee inlines into both).
#define QK_AVX2_INLINE __attribute__((target("avx2,f16c"), always_inline)) inline

namespace qk {
namespace {

enum OptIsa : int { kOptScalar = 0, kOptAvx2 = 1, kOptAvx512 = 2 };

int opt_isa() {
  const std::string isa = cpu_isa();  // the NF4 kernels' choice (and its set_cpu_isa cap)
  return isa == "avx512" ? kOptAvx512 : (isa == "avx2" ? kOptAvx2 : kOptScalar);
}

constexpr int64_t kGrainElems = int64_t(1) << 16;  // below ~64K elements one thread is faster than two

// ---------------------------------------------------------------------------------------- gradient scan
template <int DT>
QK_ALWAYS_INLINE uint32_t grad_max_bits_body(const void* g, int64_t i0, int64_t i1) {
  uint32_t mx = 0;
  if (DT == kFloat32) {
    const uint32_t* u = static_cast<const uint32_t*>(g);
    for (int64_t i = i0; i < i1; ++i) mx = std::max(mx, u[i] & 0x7fffffffu);
  } else {
    // 16-bit formats: widen the magnitude bits; the comparison happens in float32 terms below.
    const uint16_t* u = static_cast<const uint16_t*>(g);
    uint32_t m16 = 0;
    for (int64_t i = i0; i < i1; ++i) m16 = std::max<uint32_t>(m16, u[i] & 0x7fffu);
    const uint16_t h = (uint16_t)m16;
    mx = abs_bits(DT == kFloat16 ? half_bits_to_float(h) : bf16_bits_to_float(h));
  }
  return mx;
}

template <int DT>
uint32_t grad_max_bits_scalar(const void* g, int64_t i0, int64_t i1) {
  return grad_max_bits_body<DT>(g, i0, i1);
}
#if QK_OPT_X86
template <int DT>
__attribute__((target("avx2"))) uint32_t grad_max_bits_avx2(const void* g, int64_t i0, int64_t i1) {
  return grad_max_bits_body<DT>(g, i0, i1);
}
#endif

// |g| bit patterns order like |g| (integer max); in the 16-bit formats too (sign cleared), so the widened
// maximum is the maximum magnitude: >= kGradLimitBits when some element is NaN, inf or >= 2^63.

// ---------------------------------------------------------------------------------------- 8-bit state codes
// Portable path (and the tails of the vector paths): per element, map[code] to dequantize; base[bucket] and
// one compare against mids[base] to quantize (optim_format.h).
QK_ALWAYS_INLINE void dequant_codes_portable(float* out, const uint8_t* codes, const float* map, float absmax,
                                             int len) {
  for (int i = 0; i < len; ++i) out[i] = state_value(map[codes[i]], absmax);
}
QK_ALWAYS_INLINE uint8_t quant_code_portable(float x, float inv, const int32_t* base, const float* mids) {
  const float sc = f_mul(x, inv);
  const int32_t b = base[bucket_of(sc)];
  return state_code(sc, b, mids[b]);
}

// Vector quantizer table (x86): ONE lookup per value instead of two dependent ones (base, then mids[base]),
// indexed directly by the top 16 bits of s (sign, 8 exponent, 7 mantissa bits): bucket = bits >> 16, one
// shift, no clamp and no sign handling (65536 entries per map cover every float32, NaN included, so no index
// can leave the table; only the lines of the binades in use are ever touched). Every bucket of either map
// holds at most one midpoint (checked when the table is built). Entry = B | thr << 9 (thr arithmetic-shifted
// back), and code = B - sign(s) * (low16(s) > thr) (vpsignd; +0.0 gives 0):
//   positive bucket: B = base (midpoints below the bucket), thr = the midpoint's low 16 bits, 0xffff if none;
//   negative bucket: B = base + 1, thr = the midpoint's low 16 bits - 1, -1 if none (values run downwards:
//   s > mid <=> low16(s) < low16(mid) <=> !(low16(s) > thr)).
// As torch.bucketize(s, mids, right=False): the number of midpoints strictly below s.
constexpr int kQShift = 16;
constexpr int kQEntries = 1 << 16;  // per map

struct QuantTables {
  std::mutex mu;
  const int32_t* source = nullptr;
  std::vector<int32_t> entries;  // [map 0][map 1], kQEntries each
};
QuantTables g_quant_tables;

void build_quant_table(const float* mids /* 255 finite, sorted */, int32_t* out) {
  std::vector<int> inside(kQEntries, -1);  // the midpoint in each bucket
  for (int j = 0; j < 255; ++j) {
    const uint32_t k = f_bits(mids[j]) >> kQShift;
    if (inside[k] >= 0) throw std::logic_error("optimizer quantizer table: two midpoints in one bucket");
    inside[k] = j;
  }
  for (uint32_t k = 0; k < (uint32_t)kQEntries; ++k) {
    const bool neg = k >> 15;
    // the smallest value of the bucket (lowest magnitude bits if positive, highest if negative)
    const float smallest = f_from_bits(neg ? (k << kQShift) | 0xffffu : k << kQShift);
    const int base = smallest != smallest ? 0 : (int)(std::lower_bound(mids, mids + 255, smallest) - mids);
    int32_t entry;
    if (!neg) {
      const int32_t thr = inside[k] >= 0 ? (int32_t)(f_bits(mids[inside[k]]) & 0xffffu) : 0xffff;
      entry = (int32_t)((uint32_t)base | ((uint32_t)thr << 9));
    } else {
      const int32_t thr = inside[k] >= 0 ? (int32_t)(f_bits(mids[inside[k]]) & 0xffffu) - 1 : -1;
      entry = (int32_t)((uint32_t)(base + 1) | ((uint32_t)thr << 9));
    }
    out[k] = entry;
  }
}

// Built once from the int32 table the caller passes (rebuilt if another table arrives).
const int32_t* quant_tables(const int32_t* tab) {
  std::lock_guard<std::mutex> lock(g_quant_tables.mu);
  if (g_quant_tables.source != tab) {
    g_quant_tables.entries.assign(2 * kQEntries, 0);
    for (int m = 0; m < 2; ++m)
      build_quant_table(reinterpret_cast<const float*>(tab + m * kTableStride + kMidOffset),
                        g_quant_tables.entries.data() + m * kQEntries);
    g_quant_tables.source = tab;
  }
  return g_quant_tables.entries.data();
}

#if QK_OPT_X86

// Quantizing 8 scaled values sc: their buckets (table indices), then, from the table entries e, their codes
// (low byte of each int32 lane). The entries are looked up in between with scalar loads (lookup8).
QK_AVX2_INLINE __m256i bucket8(__m256 sc) { return _mm256_srli_epi32(_mm256_castps_si256(sc), kQShift); }
QK_AVX2_INLINE __m256i code8(__m256 sc, __m256i e) {
  const __m256i bits = _mm256_castps_si256(sc);
  const __m256i gt = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0xffff)), _mm256_srai_epi32(e, 9));
  // B - sign(s) * (key > thr): the compare mask is -1 where true; vpsignd negates it for negative s
  return _mm256_sub_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0x1ff)), _mm256_sign_epi32(gt, bits));
}
QK_AVX2_INLINE void store_codes8(uint8_t* out, __m256i code) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}
// Table lookups as 8 scalar loads assembled in a register: no gathers (on Zen 3 an 8-lane gather costs more
// than 8 scalar loads through L1) and no round trip of the entries through a stack array (a scalar pass
// storing all 256 entries, reloaded as vectors, was ~10-20% slower). The quantizer's entries are moved as
// float32 lanes (vmovss / vinsertps from memory: moves, so every bit pattern, NaN ones included, arrives
// intact): Zen 3 issues those at twice the rate of vpinsrd from memory (llvm-mca znver3: the requantize loop
// 18.5 -> 13.1 cycles per 8 values of both states; measured ~4% off the step).
QK_AVX2_INLINE __m256i lookup8(const int32_t* k, const int32_t* table) {
  const float* t = reinterpret_cast<const float*>(table);
  const __m128 lo = _mm_setr_ps(t[k[0]], t[k[1]], t[k[2]], t[k[3]]);
  const __m128 hi = _mm_setr_ps(t[k[4]], t[k[5]], t[k[6]], t[k[7]]);
  return _mm256_castps_si256(_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
}
// map[code] * absmax for 8 codes: 8 broadcast loads (load ports only) merged by a tree of 7 blends (any FP
// pipe), which leaves Zen 3's shuffle pipes (also the divider's FP1) to the rest; vmovss + vinsertps +
// vinsertf128 (7 shuffles) measured 1-4% slower, a vgatherdps ~50% slower. Each code is its own byte load
// (movzbl, a load port): reading the 8 codes as one word and shifting them out cost 2-3 ALU instructions per
// code, ~10% of the step (interleaved A/B, 64K and 1M values: 2.07 vs 2.40 and 3.29 vs 3.56 ns/value).
QK_AVX2_INLINE __m256 decode8(const uint8_t* codes, const float* map, __m256 absmax) {
#define QK_BCAST(i) _mm256_broadcast_ss(map + codes[i])
  const __m256 x = _mm256_blend_ps(QK_BCAST(0), QK_BCAST(1), 0xaa), y = _mm256_blend_ps(QK_BCAST(2), QK_BCAST(3), 0xaa);
  const __m256 z = _mm256_blend_ps(QK_BCAST(4), QK_BCAST(5), 0xaa), u = _mm256_blend_ps(QK_BCAST(6), QK_BCAST(7), 0xaa);
#undef QK_BCAST
  return _mm256_mul_ps(_mm256_blend_ps(_mm256_blend_ps(x, y, 0xcc), _mm256_blend_ps(z, u, 0xcc), 0xf0), absmax);
}

// 8 parameter / gradient values as float32, and back (bf16: round to nearest even, NaN -> 0x7fc0, as
// store_from_float; f16: F16C, as store_half_f16c).
template <int DT>
QK_AVX2_INLINE __m256 load8(const void* src, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(src) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
    if constexpr (DT == kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}
template <int DT>
QK_AVX2_INLINE void store8(void* dst, int64_t i, __m256 v) {
  if constexpr (DT == kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(dst) + i, v);
  } else {
    __m128i h;
    if constexpr (DT == kFloat16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i r = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                               _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))),
          16);
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                             _mm256_set1_epi32(0x7f800000));
      const __m256i b = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
      h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + i), h);
  }
}

struct Scalars8 {
  __m256 beta1, beta2, omb1, omb2, bc2_sqrt, eps, decay, step_size, eps_bc2, step_size_bc2;
};
QK_AVX2_INLINE Scalars8 splat(const AdamScalars& s) {
  return {_mm256_set1_ps(s.beta1),    _mm256_set1_ps(s.beta2), _mm256_set1_ps(s.one_minus_beta1),
          _mm256_set1_ps(s.one_minus_beta2), _mm256_set1_ps(s.bc2_sqrt), _mm256_set1_ps(s.eps),
          _mm256_set1_ps(s.decay),    _mm256_set1_ps(s.step_size), _mm256_set1_ps(s.eps_bc2),
          _mm256_set1_ps(s.step_size_bc2)};
}
// adam_moments on 8 lanes: the same operations in the same order (no FMA), so the same bits.
QK_AVX2_INLINE void adam_moments8(__m256 g, __m256& m, __m256& v, const Scalars8& s) {
  m = _mm256_add_ps(_mm256_mul_ps(m, s.beta1), _mm256_mul_ps(g, s.omb1));
  v = _mm256_add_ps(_mm256_mul_ps(v, s.beta2), _mm256_mul_ps(_mm256_mul_ps(g, g), s.omb2));
}
// adamw_update on 8 lanes.
QK_AVX2_INLINE void adamw_update8(__m256& p, __m256 g, __m256& m, __m256& v, const Scalars8& s) {
  adam_moments8(g, m, v, s);
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), s.bc2_sqrt), s.eps);
  p = _mm256_mul_ps(p, s.decay);
  p = _mm256_sub_ps(p, _mm256_mul_ps(s.step_size, _mm256_div_ps(m, denom)));
}
// adamw8_update on 8 lanes (one division).
QK_AVX2_INLINE void adamw8_update8(__m256& p, __m256 g, __m256& m, __m256& v, const Scalars8& s) {
  adam_moments8(g, m, v, s);
  const __m256 denom = _mm256_add_ps(_mm256_sqrt_ps(v), s.eps_bc2);
  p = _mm256_mul_ps(p, s.decay);
  p = _mm256_sub_ps(p, _mm256_mul_ps(s.step_size_bc2, _mm256_div_ps(m, denom)));
}
QK_AVX2_INLINE uint32_t hmax_epi32(__m256i x) {
  __m128i y = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  y = _mm_max_epi32(y, _mm_shuffle_epi32(y, 0x4e));
  y = _mm_max_epi32(y, _mm_shuffle_epi32(y, 0xb1));
  return (uint32_t)_mm_cvtsi128_si32(y);
}
#endif

// ---------------------------------------------------------------------------------------- 8-bit step
struct Step8 {
  void* p;
  const void* g;
  uint8_t* c1;
  uint8_t* c2;
  float* a1;
  float* a2;
  const int32_t* tab;  // signed map's table, then the unsigned map's at + kTableStride
  const int32_t* qt;   // quant_tables(tab) on x86 (nullptr otherwise)
  int64_t n;
  AdamScalars s;
};

// One block of up to 256 values, portable: loops over small arrays.
template <int DT>
void step8_block_portable(const Step8& a, int64_t b) {
  const int64_t start = b * kOptBlock;
  const int len = (int)std::min<int64_t>(kOptBlock, a.n - start);
  const float* map1 = reinterpret_cast<const float*>(a.tab + kMapOffset);
  const float* mid1 = reinterpret_cast<const float*>(a.tab + kMidOffset);
  const int32_t* base1 = a.tab + kBaseOffset;
  const float* map2 = reinterpret_cast<const float*>(a.tab + kTableStride + kMapOffset);
  const float* mid2 = reinterpret_cast<const float*>(a.tab + kTableStride + kMidOffset);
  const int32_t* base2 = a.tab + kTableStride + kBaseOffset;
  float m[kOptBlock], v[kOptBlock], p[kOptBlock], g[kOptBlock];
  dequant_codes_portable(m, a.c1 + start, map1, a.a1[b], len);
  dequant_codes_portable(v, a.c2 + start, map2, a.a2[b], len);
  for (int i = 0; i < len; ++i) p[i] = load_as_float<DT>(a.p, start + i);
  for (int i = 0; i < len; ++i) g[i] = load_as_float<DT>(a.g, start + i);
  const AdamScalars s = a.s;
  for (int i = 0; i < len; ++i) adamw8_update(p[i], g[i], m[i], v[i], s);
  for (int i = 0; i < len; ++i) store_from_float<DT>(a.p, start + i, p[i]);
  uint32_t mx1 = 0, mx2 = 0;
  for (int i = 0; i < len; ++i) mx1 = std::max(mx1, abs_bits(m[i]));
  for (int i = 0; i < len; ++i) mx2 = std::max(mx2, abs_bits(v[i]));
  const float new1 = f_from_bits(mx1), new2 = f_from_bits(mx2);
  a.a1[b] = new1;
  a.a2[b] = new2;
  const float inv1 = state_inv_scale(new1), inv2 = state_inv_scale(new2);
  for (int i = 0; i < len; ++i) a.c1[start + i] = quant_code_portable(m[i], inv1, base1, mid1);
  for (int i = 0; i < len; ++i) a.c2[start + i] = quant_code_portable(v[i], inv2, base2, mid2);
}

#if QK_OPT_X86
// One block, AVX2: one pass dequantizes, updates and writes the parameter 8 values at a time, keeping the new
// states in L1 and their absmax in registers; a second pass over the hot states requantizes them.
template <int DT>
QK_AVX2_INLINE void step8_block_avx2(const Step8& a, const Scalars8& vs, int64_t b) {
  const int64_t start = b * kOptBlock;
  const int len = (int)std::min<int64_t>(kOptBlock, a.n - start);
  const int vlen = len & ~7;
  const float* map1 = reinterpret_cast<const float*>(a.tab + kMapOffset);
  const float* map2 = reinterpret_cast<const float*>(a.tab + kTableStride + kMapOffset);
  const uint8_t* c1 = a.c1 + start;
  const uint8_t* c2 = a.c2 + start;
  alignas(32) float m[kOptBlock], v[kOptBlock];
  const float am1 = a.a1[b], am2 = a.a2[b];
  const __m256 vam1 = _mm256_set1_ps(am1), vam2 = _mm256_set1_ps(am2);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  __m256i mx1v = _mm256_setzero_si256(), mx2v = _mm256_setzero_si256();
  for (int i = 0; i < vlen; i += 8) {
    __m256 mi = decode8(c1 + i, map1, vam1);
    __m256 vi = decode8(c2 + i, map2, vam2);
    __m256 pi = load8<DT>(a.p, start + i);
    adamw8_update8(pi, load8<DT>(a.g, start + i), mi, vi, vs);
    store8<DT>(a.p, start + i, pi);
    _mm256_store_ps(m + i, mi);
    _mm256_store_ps(v + i, vi);
    mx1v = _mm256_max_epi32(mx1v, _mm256_and_si256(_mm256_castps_si256(mi), absmask));
    mx2v = _mm256_max_epi32(mx2v, _mm256_and_si256(_mm256_castps_si256(vi), absmask));
  }
  uint32_t mx1 = hmax_epi32(mx1v), mx2 = hmax_epi32(mx2v);
  for (int i = vlen; i < len; ++i) {  // the tensor's last values
    m[i] = state_value(map1[c1[i]], am1);
    v[i] = state_value(map2[c2[i]], am2);
    float pi = load_as_float<DT>(a.p, start + i);
    adamw8_update(pi, load_as_float<DT>(a.g, start + i), m[i], v[i], a.s);
    store_from_float<DT>(a.p, start + i, pi);
    mx1 = std::max(mx1, abs_bits(m[i]));
    mx2 = std::max(mx2, abs_bits(v[i]));
  }
  const float new1 = f_from_bits(mx1), new2 = f_from_bits(mx2);
  a.a1[b] = new1;
  a.a2[b] = new2;
  const float inv1 = state_inv_scale(new1), inv2 = state_inv_scale(new2);
  const __m256 vinv1 = _mm256_set1_ps(inv1), vinv2 = _mm256_set1_ps(inv2);
  const int32_t* qt1 = a.qt;
  const int32_t* qt2 = a.qt + kQEntries;
  uint8_t* o1 = a.c1 + start;
  uint8_t* o2 = a.c2 + start;
  alignas(32) int32_t e1[kOptBlock], e2[kOptBlock];  // buckets
  for (int i = 0; i < vlen; i += 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(e1 + i), bucket8(_mm256_mul_ps(_mm256_load_ps(m + i), vinv1)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(e2 + i), bucket8(_mm256_mul_ps(_mm256_load_ps(v + i), vinv2)));
  }
  for (int i = 0; i < vlen; i += 8) {  // sc = x * inv again (one rounding: the same value) rather than store it
    store_codes8(o1 + i, code8(_mm256_mul_ps(_mm256_load_ps(m + i), vinv1), lookup8(e1 + i, qt1)));
    store_codes8(o2 + i, code8(_mm256_mul_ps(_mm256_load_ps(v + i), vinv2), lookup8(e2 + i, qt2)));
  }
  const int32_t* base1 = a.tab + kBaseOffset;
  const float* mid1 = reinterpret_cast<const float*>(a.tab + kMidOffset);
  const int32_t* base2 = a.tab + kTableStride + kBaseOffset;
  const float* mid2 = reinterpret_cast<const float*>(a.tab + kTableStride + kMidOffset);
  for (int i = vlen; i < len; ++i) {
    o1[i] = quant_code_portable(m[i], inv1, base1, mid1);
    o2[i] = quant_code_portable(v[i], inv2, base2, mid2);
  }
}
#endif

template <int DT>
void step8_range_scalar(const Step8& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) step8_block_portable<DT>(a, b);
}
#if QK_OPT_X86
template <int DT>
__attribute__((target("avx2,f16c"))) void step8_range_avx2(const Step8& a, int64_t b0, int64_t b1) {
  const Scalars8 vs = splat(a.s);
  for (int64_t b = b0; b < b1; ++b) step8_block_avx2<DT>(a, vs, b);
}
// AVX-512 CPUs run the same 8-lane code (EVEX-encoded where the compiler likes): 16-lane gathers are not
// faster per value, and one vector width keeps one set of bits to test.
template <int DT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c"))) void step8_range_avx512(const Step8& a, int64_t b0,
                                                                                           int64_t b1) {
  const Scalars8 vs = splat(a.s);
  for (int64_t b = b0; b < b1; ++b) step8_block_avx2<DT>(a, vs, b);
}
#endif

template <int DT>
void step8_dispatch(const Step8& a, int64_t b0, int64_t b1, int isa) {
#if QK_OPT_X86
  if (isa >= kOptAvx512) return step8_range_avx512<DT>(a, b0, b1);
  if (isa >= kOptAvx2) return step8_range_avx2<DT>(a, b0, b1);
#endif
  (void)isa;
  step8_range_scalar<DT>(a, b0, b1);
}

// ---------------------------------------------------------------------------------------- 32-bit step
struct Step32 {
  void* p;
  const void* g;
  float* m;
  float* v;
  AdamScalars s;
};

template <int DT>
void step32_scalar(const Step32& a, int64_t i0, int64_t i1) {
  const AdamScalars s = a.s;
  float p[kOptBlock], g[kOptBlock];
  for (int64_t start = i0; start < i1; start += kOptBlock) {
    const int len = (int)std::min<int64_t>(kOptBlock, i1 - start);
    for (int i = 0; i < len; ++i) p[i] = load_as_float<DT>(a.p, start + i);
    for (int i = 0; i < len; ++i) g[i] = load_as_float<DT>(a.g, start + i);
    float* m = a.m + start;
    float* v = a.v + start;
    for (int i = 0; i < len; ++i) adamw_update(p[i], g[i], m[i], v[i], s);
    for (int i = 0; i < len; ++i) store_from_float<DT>(a.p, start + i, p[i]);
  }
}
#if QK_OPT_X86
// Straight through memory, 8 values at a time.
template <int DT>
QK_AVX2_INLINE void step32_body_avx2(const Step32& a, int64_t i0, int64_t i1) {
  const Scalars8 vs = splat(a.s);
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    __m256 p = load8<DT>(a.p, i), m = _mm256_loadu_ps(a.m + i), v = _mm256_loadu_ps(a.v + i);
    adamw_update8(p, load8<DT>(a.g, i), m, v, vs);
    store8<DT>(a.p, i, p);
    _mm256_storeu_ps(a.m + i, m);
    _mm256_storeu_ps(a.v + i, v);
  }
  for (; i < i1; ++i) {
    float p = load_as_float<DT>(a.p, i);
    adamw_update(p, load_as_float<DT>(a.g, i), a.m[i], a.v[i], a.s);
    store_from_float<DT>(a.p, i, p);
  }
}
template <int DT>
__attribute__((target("avx2,f16c"))) void step32_avx2(const Step32& a, int64_t i0, int64_t i1) {
  step32_body_avx2<DT>(a, i0, i1);
}
template <int DT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c"))) void step32_avx512(const Step32& a, int64_t i0,
                                                                                      int64_t i1) {
  step32_body_avx2<DT>(a, i0, i1);
}
#endif
template <int DT>
void step32_dispatch(const Step32& a, int64_t i0, int64_t i1, int isa) {
#if QK_OPT_X86
  if (isa >= kOptAvx512) return step32_avx512<DT>(a, i0, i1);
  if (isa >= kOptAvx2) return step32_avx2<DT>(a, i0, i1);
#endif
  (void)isa;
  step32_scalar<DT>(a, i0, i1);
}


void check_hyper(double lr, double beta1, double beta2, double eps, double weight_decay) {
  auto bad = [](double x) { return !(x == x) || x - x != 0.0; };  // NaN or inf
  if (bad(lr) || lr < 0) throw std::invalid_argument("lr must be a finite number >= 0, got " + std::to_string(lr));
  if (bad(beta1) || beta1 < 0 || beta1 >= 1) throw std::invalid_argument("beta1 must be in [0, 1), got " + std::to_string(beta1));
  if (bad(beta2) || beta2 < 0 || beta2 >= 1) throw std::invalid_argument("beta2 must be in [0, 1), got " + std::to_string(beta2));
  if (bad(eps) || eps < 0) throw std::invalid_argument("eps must be a finite number >= 0, got " + std::to_string(eps));
  if (bad(weight_decay) || weight_decay < 0)
    throw std::invalid_argument("weight_decay must be a finite number >= 0, got " + std::to_string(weight_decay));
}

void check_optim_args(int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps, double wd,
                      uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t param, uintptr_t grad) {
  check_n(n);
  check_dtype(dtype, "dtype");
  check_hyper(lr, beta1, beta2, eps, wd);
  check_ptr(step, 1, "step");
  check_ptr(skipped, 1, "skipped");
  check_ptr(flag, 1, "flag");
  check_ptr(param, n, "param");
  check_ptr(grad, n, "grad");
}

// ---------------------------------------------------------------------------------------- many tensors per call
// One call steps every tensor of a parameter group (one Python -> C++ crossing and one thread team per phase
// instead of one per tensor: a LoRA model has hundreds of small tensors). The work of all tensors is laid end
// to end (units: elements for the scan and the 32-bit step, blocks for the 8-bit step) and cut into one
// contiguous chunk per thread; a chunk may span several tensors.
struct Work {
  std::vector<int64_t> offsets;  // offsets[t] = first unit of tensor t; offsets.back() = total
  explicit Work(const std::vector<int64_t>& units) : offsets(units.size() + 1, 0) {
    for (size_t t = 0; t < units.size(); ++t) offsets[t + 1] = offsets[t] + units[t];
  }
  int64_t total() const { return offsets.back(); }
  // fn(tensor, first, end) over the pieces of [u0, u1) in tensor-local units
  template <class F>
  void pieces(int64_t u0, int64_t u1, F&& fn) const {
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), u0) - offsets.begin() - 1;
    for (; u0 < u1 && t + 1 < offsets.size(); ++t) {
      const int64_t e = std::min(u1, offsets[t + 1]);
      if (e > u0) fn(t, u0 - offsets[t], e - offsets[t]);
      u0 = std::max(u0, e);
    }
  }
};

// Gradients holding NaN, inf or |g| >= 2^63 skip their tensor's whole step: skipped += 1 there, and
// rejected[t] is set. The scan reads every gradient before any tensor is written (a skipped step leaves the
// tensor exactly as it was).
std::vector<char> reject_bad_grads(const std::vector<uintptr_t>& grad, const std::vector<int64_t>& n,
                                   const std::vector<int64_t>& dtype, const std::vector<uintptr_t>& skipped,
                                   int64_t num_threads, int isa) {
  const size_t T = grad.size();
  std::vector<std::atomic<uint32_t>> worst(T);
  for (auto& w : worst) w.store(0);
  const Work work(n);
  parallel_for(work.total(), num_threads, kGrainElems, [&](int64_t u0, int64_t u1) {
    work.pieces(u0, u1, [&](size_t t, int64_t i0, int64_t i1) {
      uint32_t mx = 0;
      by_dtype(dtype[t], [&](auto dt) {
        constexpr int DT = decltype(dt)::value;
        const void* g = reinterpret_cast<const void*>(grad[t]);
#if QK_OPT_X86
        if (isa >= kOptAvx2) {
          mx = grad_max_bits_avx2<DT>(g, i0, i1);
          return;
        }
#endif
        mx = grad_max_bits_scalar<DT>(g, i0, i1);
      });
      uint32_t cur = worst[t].load(std::memory_order_relaxed);
      while (mx > cur && !worst[t].compare_exchange_weak(cur, mx, std::memory_order_relaxed)) {
      }
    });
  });
  (void)isa;
  std::vector<char> rejected(T, 0);
  for (size_t t = 0; t < T; ++t) {
    if (worst[t].load() >= kGradLimitBits) {
      rejected[t] = 1;
      *reinterpret_cast<int64_t*>(skipped[t]) += 1;
    }
  }
  return rejected;
}

// After the scan: fn(tensor, first, end) over every tensor's work units laid end to end, on the thread team
// (rejected tensors get none), then step += 1 on every tensor that was not skipped.
template <class F>
void run_steps(const std::vector<char>& rejected, std::vector<int64_t> units, int64_t grain, int64_t num_threads,
               const std::vector<uintptr_t>& step, F&& fn) {
  for (size_t t = 0; t < units.size(); ++t)
    if (rejected[t]) units[t] = 0;
  const Work work(units);
  parallel_for(work.total(), num_threads, grain, [&](int64_t u0, int64_t u1) { work.pieces(u0, u1, fn); });
  for (size_t t = 0; t < step.size(); ++t)
    if (!rejected[t]) *reinterpret_cast<int64_t*>(step[t]) += 1;
}

}  // namespace

void check_adamw8bit_args(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                          uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                          int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps, double wd) {
  check_optim_args(n, dtype, lr, beta1, beta2, eps, wd, step, skipped, flag, param, grad);
  check_ptr(state1, n, "state1");
  check_ptr(state2, n, "state2");
  check_ptr(absmax1, n, "absmax1");
  check_ptr(absmax2, n, "absmax2");
  check_ptr(table, n, "table");
}

void check_adamw32bit_args(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                           uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                           double beta2, double eps, double wd) {
  check_optim_args(n, dtype, lr, beta1, beta2, eps, wd, step, skipped, flag, param, grad);
  check_ptr(exp_avg, n, "exp_avg");
  check_ptr(exp_avg_sq, n, "exp_avg_sq");
}

namespace {
void check_lists(size_t T, std::initializer_list<std::pair<size_t, const char*>> lists) {
  for (const auto& [size, name] : lists)
    if (size != T)
      throw std::invalid_argument(std::string(name) + " has " + std::to_string(size) + " entries; expected one per tensor (" +
                                  std::to_string(T) + ")");
}
}  // namespace

void check_adamw8bit_lists(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                           const std::vector<uintptr_t>& state1, const std::vector<uintptr_t>& state2,
                           const std::vector<uintptr_t>& absmax1, const std::vector<uintptr_t>& absmax2,
                           const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                           const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                           uintptr_t table, double lr, double beta1, double beta2, double eps, double wd) {
  const size_t T = param.size();
  check_lists(T, {{grad.size(), "grad"}, {state1.size(), "state1"}, {state2.size(), "state2"},
                  {absmax1.size(), "absmax1"}, {absmax2.size(), "absmax2"}, {step.size(), "step"},
                  {skipped.size(), "skipped"}, {n.size(), "n"}, {dtype.size(), "dtype"}});
  for (size_t t = 0; t < T; ++t)
    check_adamw8bit_args(param[t], grad[t], state1[t], state2[t], absmax1[t], absmax2[t], step[t], skipped[t], flag,
                         table, n[t], dtype[t], lr, beta1, beta2, eps, wd);
}

void check_adamw32bit_lists(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                            const std::vector<uintptr_t>& exp_avg, const std::vector<uintptr_t>& exp_avg_sq,
                            const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                            const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                            double lr, double beta1, double beta2, double eps, double wd) {
  const size_t T = param.size();
  check_lists(T, {{grad.size(), "grad"}, {exp_avg.size(), "exp_avg"}, {exp_avg_sq.size(), "exp_avg_sq"},
                  {step.size(), "step"}, {skipped.size(), "skipped"}, {n.size(), "n"}, {dtype.size(), "dtype"}});
  for (size_t t = 0; t < T; ++t)
    check_adamw32bit_args(param[t], grad[t], exp_avg[t], exp_avg_sq[t], step[t], skipped[t], flag, n[t], dtype[t],
                          lr, beta1, beta2, eps, wd);
}

void adamw8bit_steps_cpu(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                         const std::vector<uintptr_t>& state1, const std::vector<uintptr_t>& state2,
                         const std::vector<uintptr_t>& absmax1, const std::vector<uintptr_t>& absmax2,
                         const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                         const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                         uintptr_t table, double lr, double beta1, double beta2, double eps, double weight_decay,
                         int64_t num_threads) {
  check_adamw8bit_lists(param, grad, state1, state2, absmax1, absmax2, step, skipped, n, dtype, flag, table, lr, beta1,
                        beta2, eps, weight_decay);
  const size_t T = param.size();
  const int isa = opt_isa();
  const std::vector<char> rejected = reject_bad_grads(grad, n, dtype, skipped, num_threads, isa);
  const int32_t* tab = reinterpret_cast<const int32_t*>(table);
#if QK_OPT_X86
  const int32_t* qt = isa >= kOptAvx2 && T ? quant_tables(tab) : nullptr;
#else
  const int32_t* qt = nullptr;
#endif
  std::vector<Step8> args(T);
  std::vector<int64_t> blocks(T);
  for (size_t t = 0; t < T; ++t) {
    Step8& a = args[t];
    a.p = reinterpret_cast<void*>(param[t]);
    a.g = reinterpret_cast<const void*>(grad[t]);
    a.c1 = reinterpret_cast<uint8_t*>(state1[t]);
    a.c2 = reinterpret_cast<uint8_t*>(state2[t]);
    a.a1 = reinterpret_cast<float*>(absmax1[t]);
    a.a2 = reinterpret_cast<float*>(absmax2[t]);
    a.tab = tab;
    a.qt = qt;
    a.n = n[t];
    a.s = adam_scalars(*reinterpret_cast<int64_t*>(step[t]) + 1, lr, beta1, beta2, eps, weight_decay);
    blocks[t] = (n[t] + kOptBlock - 1) / kOptBlock;
  }
  run_steps(rejected, blocks, kGrainElems / kOptBlock, num_threads, step, [&](size_t t, int64_t b0, int64_t b1) {
    by_dtype(dtype[t], [&](auto dt) { step8_dispatch<decltype(dt)::value>(args[t], b0, b1, isa); });
  });
}

void adamw32bit_steps_cpu(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                          const std::vector<uintptr_t>& exp_avg, const std::vector<uintptr_t>& exp_avg_sq,
                          const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                          const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag, double lr,
                          double beta1, double beta2, double eps, double weight_decay, int64_t num_threads) {
  check_adamw32bit_lists(param, grad, exp_avg, exp_avg_sq, step, skipped, n, dtype, flag, lr, beta1, beta2, eps,
                         weight_decay);
  const size_t T = param.size();
  const int isa = opt_isa();
  const std::vector<char> rejected = reject_bad_grads(grad, n, dtype, skipped, num_threads, isa);
  std::vector<Step32> args(T);
  for (size_t t = 0; t < T; ++t) {
    Step32& a = args[t];
    a.p = reinterpret_cast<void*>(param[t]);
    a.g = reinterpret_cast<const void*>(grad[t]);
    a.m = reinterpret_cast<float*>(exp_avg[t]);
    a.v = reinterpret_cast<float*>(exp_avg_sq[t]);
    a.s = adam_scalars(*reinterpret_cast<int64_t*>(step[t]) + 1, lr, beta1, beta2, eps, weight_decay);
  }
  run_steps(rejected, n, kGrainElems, num_threads, step, [&](size_t t, int64_t i0, int64_t i1) {
    by_dtype(dtype[t], [&](auto dt) { step32_dispatch<decltype(dt)::value>(args[t], i0, i1, isa); });
  });
}

void adamw8bit_step_cpu(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                        uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                        int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t num_threads) {
  adamw8bit_steps_cpu({param}, {grad}, {state1}, {state2}, {absmax1}, {absmax2}, {step}, {skipped}, {n}, {dtype}, flag,
                      table, lr, beta1, beta2, eps, weight_decay, num_threads);
}

void adamw32bit_step_cpu(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                         uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t num_threads) {
  adamw32bit_steps_cpu({param}, {grad}, {exp_avg}, {exp_avg_sq}, {step}, {skipped}, {n}, {dtype}, flag, lr, beta1,
                       beta2, eps, weight_decay, num_threads);
}

}  // namespace qk
