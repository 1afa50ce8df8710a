// CPU kernels of the NF4 ops. Portable scalar code (built on every target) plus AVX2 / AVX-512 paths that are
// compiled with per-function target attributes and chosen at run time (__builtin_cpu_supports), so one wheel
// runs on any x86-64 and the file still builds on aarch64. Threads are std::thread chunks, not OpenMP, so
// they do not fight torch's OpenMP pool.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "cpu_threads.h"
#include "nf4_format.h"
#include "nf4_kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

// QK_NO_X86_SIMD builds the portable code only (what an aarch64 build compiles; used to check it here).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(QK_NO_X86_SIMD)
#define QK_X86 1
#include <immintrin.h>
#else
#define QK_X86 0
#endif

// GCC/Clang: compile one function for a wider ISA than the rest of the file.
#define QK_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define QK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))

namespace qk {
namespace {

// ================================================================================================ ISA choice
enum Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

int detect_isa() {
#if QK_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider register state (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return kIsaAvx2;
#endif
  return kIsaScalar;
}

int isa_from_name(const std::string& name) {
  if (name == "auto" || name.empty()) return kIsaAvx512;
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  throw std::invalid_argument("cpu isa must be one of 'auto', 'avx512', 'avx2', 'scalar', got '" + name + "'");
}

const int g_detected = detect_isa();

int initial_cap() {
  const char* env = std::getenv("QLORA_KERNELS_CPU_ISA");
  if (env == nullptr) return kIsaAvx512;
  try {
    return isa_from_name(env);
  } catch (const std::invalid_argument&) {
    return kIsaAvx512;  // a typo in an env var must not break import; set_cpu_isa() reports it properly
  }
}

std::atomic<int> g_cap{initial_cap()};

int active_isa() { return std::min(g_detected, g_cap.load(std::memory_order_relaxed)); }

// ================================================================================================ threads
// parallel_for: csrc/cpu_threads.h

// Non-finite report: count and smallest flat index, merged across threads.
struct NonFinite {
  std::atomic<int64_t> count{0};
  std::atomic<int64_t> first{INT64_MAX};
  void add(int64_t c, int64_t idx) {
    count.fetch_add(c, std::memory_order_relaxed);
    int64_t cur = first.load(std::memory_order_relaxed);
    while (idx < cur && !first.compare_exchange_weak(cur, idx, std::memory_order_relaxed)) {
    }
  }
};

// ================================================================================================ quantize
template <int DT>
void scan_nonfinite(NonFinite& nf, const void* w, int64_t start, int64_t end) {
  int64_t count = 0, first = INT64_MAX;
  for (int64_t i = start; i < end; ++i) {
    if (is_nonfinite_bits(abs_bits(load_as_float<DT>(w, i)))) {
      ++count;
      first = std::min(first, i);
    }
  }
  if (count) nf.add(count, first);
}

// One block [start, end) in portable code, from a float32 copy x of its values: absmax, codes, packed bytes;
// handles partial and odd-length blocks. Simple loops so the compiler vectorizes them: at the baseline ISA for
// the scalar level, with AVX2 when inlined into quantize_range_avx2. SEARCH: the codes by nf4_code_search, the
// CUDA kernel's 4-level search (the scalar level and the AVX-512 partial block run it, so the CPU tests cover
// the GPU's search); else by nf4_code's 15 compares (AVX2: the fastest vectorized form here).
template <int DT, bool SEARCH = false>
__attribute__((always_inline)) inline void quantize_block_portable(uint8_t* packed, float* absmax, NonFinite& nf,
                                                                   const float* x, const void* w, int64_t b,
                                                                   int64_t start, int64_t end, bool full) {
  uint8_t c[4096 + 1];
  const int64_t len = end - start;
  uint32_t am = 0;
  for (int64_t i = 0; i < len; ++i) am = std::max(am, abs_bits(x[i]));
  if (is_nonfinite_bits(am)) scan_nonfinite<DT>(nf, w, start, end);
  const float amax = f_from_bits(am);
  // Full blocks multiply by the reciprocal and store the raw absmax; the partial last block divides by
  // the clamped absmax and stores that (bitsandbytes' CPU arithmetic, see reference.nf4_codes_ref).
  const float stored = full ? amax : clamp_tiny(amax);
  const float inv = f_rcp(clamp_tiny(amax));
  absmax[b] = stored;
  auto code = [](float v) { return SEARCH ? (uint8_t)nf4_code_search_host(v) : nf4_code(v); };
  if (full) {
    for (int64_t i = 0; i < len; ++i) c[i] = code(nf4_scale_full(x[i], inv));
  } else {
    for (int64_t i = 0; i < len; ++i) c[i] = code(nf4_scale_tail(x[i], stored));
  }
  c[len] = kZeroCode;  // odd length: the pad nibble
  uint8_t* out = packed + (start >> 1);
  for (int64_t j = 0; j < (len + 1) / 2; ++j) out[j] = pack_pair(c[2 * j], c[2 * j + 1]);
}

template <int DT>
void quantize_range_scalar(uint8_t* packed, float* absmax, NonFinite& nf, const void* w, int64_t n, int64_t bs,
                           int64_t b0, int64_t b1) {
  float x[4096];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, end = std::min(n, start + bs);
    for (int64_t i = start; i < end; ++i) x[i - start] = load_as_float<DT>(w, i);
    quantize_block_portable<DT, true>(packed, absmax, nf, x, w, b, start, end, end - start == bs);
  }
}

#if QK_X86
// The portable body compiled for AVX2 (F16C widens float16). 4096x4096 bf16, one thread, blocksize 64:
// ~30 ms here vs ~62 ms for the baseline-ISA build of the same loops and ~17 ms for the AVX-512 kernel
// (a per-element loop that the compiler could not vectorize took ~150 ms).
template <int DT>
QK_TARGET_AVX2 void quantize_range_avx2(uint8_t* packed, float* absmax, NonFinite& nf, const void* w, int64_t n,
                                        int64_t bs, int64_t b0, int64_t b1) {
  float x[4096];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, end = std::min(n, start + bs);
    int64_t i = start;
    if constexpr (DT == kFloat16) {
      const uint16_t* h = static_cast<const uint16_t*>(w);
      for (; i + 8 <= end; i += 8)
        _mm256_storeu_ps(x + (i - start), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    }
    for (; i < end; ++i) x[i - start] = load_as_float<DT>(w, i);
    quantize_block_portable<DT>(packed, absmax, nf, x, w, b, start, end, end - start == bs);
  }
}
#endif

#if QK_X86
template <int DT>
QK_TARGET_AVX512 inline __m512 load16_avx512(const void* w, int64_t i) {
  if (DT == kFloat32) return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
  if (DT == kFloat16) return _mm512_cvtph_ps(h);  // exact widening
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Full blocks only (the partial last block goes to the scalar code). Two passes per block: absmax, then
// codes; the second pass re-reads the block from L1 (<= 16 KiB).
template <int DT>
QK_TARGET_AVX512 void quantize_range_avx512(uint8_t* packed, float* absmax, NonFinite& nf, const void* w,
                                            int64_t bs, int64_t b0, int64_t b1) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __m512i one = _mm512_set1_epi32(1);
  __m512 mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = _mm512_set1_ps(kNF4Mid[j]);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, end = start + bs;
    __m512i am = _mm512_setzero_si512();
    for (int64_t i = start; i < end; i += 16)
      am = _mm512_max_epu32(am, _mm512_and_si512(_mm512_castps_si512(load16_avx512<DT>(w, i)), absmask));
    const uint32_t amb = _mm512_reduce_max_epu32(am);
    if (is_nonfinite_bits(amb)) scan_nonfinite<DT>(nf, w, start, end);
    const float amax = f_from_bits(amb);
    absmax[b] = amax;
    const __m512 inv = _mm512_set1_ps(f_rcp(clamp_tiny(amax)));
    for (int64_t i = start; i < end; i += 16) {
      const __m512 s = _mm512_mul_ps(load16_avx512<DT>(w, i), inv);  // no clamp needed: see nf4_scale_full
      // code = number of midpoints strictly below s
      __m512i c = _mm512_setzero_si512();
      for (int j = 0; j < 15; ++j) c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, mid[j], _CMP_GT_OQ), c, one);
      // pairs (even, odd) as one qword: low byte of (q << 4) | (q >> 32) = even << 4 | odd
      const __m512i p = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + (i >> 1)), _mm512_cvtepi64_epi8(p));
    }
  }
}
#endif

template <int DT>
void quantize_dispatch(uint8_t* packed, float* absmax, NonFinite& nf, const void* w, int64_t n, int64_t bs,
                       int64_t b0, int64_t b1, int isa) {
#if QK_X86
  if (isa >= kIsaAvx512) {
    const int64_t full_end = std::min(b1, n / bs);  // blocks before this one are full
    if (full_end > b0) quantize_range_avx512<DT>(packed, absmax, nf, w, bs, b0, full_end);
    quantize_range_scalar<DT>(packed, absmax, nf, w, n, bs, std::max(b0, full_end), b1);
    return;
  }
  if (isa >= kIsaAvx2) return quantize_range_avx2<DT>(packed, absmax, nf, w, n, bs, b0, b1);
#endif
  (void)isa;
  quantize_range_scalar<DT>(packed, absmax, nf, w, n, bs, b0, b1);
}

// ================================================================================================ dequantize
struct DeqArgs {
  void* out;
  const uint8_t* packed;
  const void* absmax;    // float32 scales, or uint8 codes when nested != nullptr
  const float* nested;   // double quantization: nested_absmax, one per 256 scales
  const float* map;      // double quantization: the 256-entry dynamic map
  float offset;
  int64_t n;
  int64_t bs;
};

inline float block_scale(const DeqArgs& a, int64_t b) {
  if (a.nested == nullptr) return static_cast<const float*>(a.absmax)[b];
  const uint8_t code = static_cast<const uint8_t*>(a.absmax)[b];
  return rebuild_scale(a.map[code], a.nested[b / kNestedBlock], a.offset);
}

template <int DT>
struct OutType {
  using type = uint16_t;
};
template <>
struct OutType<kFloat32> {
  using type = float;
};

template <int DT>
inline typename OutType<DT>::type cast_out(float v) {
  if constexpr (DT == kFloat32) {
    return v;
  } else if constexpr (DT == kFloat16) {
    return float_to_half_bits(v);
  } else {
    return float_to_bf16_bits(v);
  }
}

// Elements [i, end) of one block through its 16-entry output table (i even: blocks start at even indices).
template <int DT>
inline void dequant_tail(typename OutType<DT>::type* out, const uint8_t* packed, const typename OutType<DT>::type* tab,
                         int64_t i, int64_t end) {
  for (; i + 1 < end; i += 2) {
    const uint8_t byte = packed[i >> 1];
    out[i] = tab[unpack_first(byte)];
    out[i + 1] = tab[unpack_second(byte)];
  }
  if (i < end) out[i] = tab[unpack_first(packed[i >> 1])];
}

// Per block: the 16 possible outputs T[c] * scale (cast once), then two table lookups per packed byte.
// Bit-identical to computing every element, since each lookup's operands are the same.
template <int DT>
void dequant_range_scalar(const DeqArgs& a, int64_t b0, int64_t b1) {
  using T = typename OutType<DT>::type;
  T* out = static_cast<T*>(a.out);
  T tab[16];
  for (int64_t b = b0; b < b1; ++b) {
    const float scale = block_scale(a, b);
    for (int c = 0; c < 16; ++c) tab[c] = cast_out<DT>(nf4_dequant(kNF4Table[c], scale));
    const int64_t start = b * a.bs;
    dequant_tail<DT>(out, a.packed, tab, start, std::min(a.n, start + a.bs));
  }
}

#if QK_X86
// Measured (2-core EPYC, 4096x4096 -> bf16 into a reused buffer): ~1.3 ms, i.e. ~30 GB/s of packed bytes
// read + output written: memory-bound. 16 packed bytes -> 32 outputs per step; 16 bytes is the smallest block (32 values), so steps never
// straddle blocks. The partial last block's remainder goes through dequant_tail.
template <int DT>
QK_TARGET_AVX512 void dequant_range_avx512(const DeqArgs& a, int64_t b0, int64_t b1) {
  using T = typename OutType<DT>::type;
  T* out = static_cast<T*>(a.out);
  const __m512 table = _mm512_loadu_ps(kNF4Table);
  alignas(64) T tab[32];
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 t32 = _mm512_mul_ps(table, _mm512_set1_ps(block_scale(a, b)));  // one rounding, as nf4_dequant
    const int64_t start = b * a.bs, end = std::min(a.n, start + a.bs);
    const int64_t vec_end = start + ((end - start) & ~int64_t(31));
    int64_t i = start;
    if constexpr (DT == kFloat32) {
      for (; i < vec_end; i += 16) {
        // 8 bytes -> 8 qwords q = byte; qword index = (q >> 4) | (q << 32): dword 2j = high nibble,
        // dword 2j+1 = byte (vpermps reads its low 4 bits = low nibble).
        const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.packed + (i >> 1))));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32));
        const __m512 v = _mm512_permutexvar_ps(idx, t32);
        _mm512_storeu_ps(out + i, v);
      }
      if (i < end) {
        _mm512_storeu_ps(tab, t32);
        dequant_tail<DT>(out, a.packed, tab, i, end);
      }
    } else {
      __m256i t16;
      if constexpr (DT == kFloat16) {
        t16 = _mm512_cvtps_ph(t32, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // IEEE RNE, keeps subnormals
      } else {
        // bf16 RNE on the bits (u + 0x7fff + lsb) >> 16: torch's rule. Not vcvtneps2bf16, which flushes
        // subnormal inputs to zero.
        const __m512i u = _mm512_castps_si512(t32);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        t16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
      }
      // The table in both 256-bit halves: vpermw reads 5 index bits, so entry c + 16 must equal entry c.
      const __m512i tab16 = _mm512_broadcast_i64x4(t16);
      for (; i < vec_end; i += 32) {
        // 16 bytes -> 16 dwords d = byte; dword index = (d >> 4) | (d << 16): word 2j = high nibble,
        // word 2j+1 = byte (vpermw reads its low 5 bits: the table repeats, so that is the low nibble).
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.packed + (i >> 1))));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
        const __m512i v = _mm512_permutexvar_epi16(idx, tab16);
        _mm512_storeu_si512(reinterpret_cast<__m512i*>(out + i), v);
      }
      if (i < end) {
        _mm512_store_si512(reinterpret_cast<__m512i*>(tab), tab16);
        dequant_tail<DT>(out, a.packed, tab, i, end);
      }
    }
  }
}

// 8 floats -> 8 bf16 words, RNE on the bits (torch's rule).
QK_TARGET_AVX2 inline __m128i bf16_rne_avx2(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // values <= 0xffff
}

// AVX2: byte-wise tables through vpshufb (16-bit outputs) or two vpermps + blend (float32).
template <int DT>
QK_TARGET_AVX2 void dequant_range_avx2(const DeqArgs& a, int64_t b0, int64_t b1) {
  using T = typename OutType<DT>::type;
  T* out = static_cast<T*>(a.out);
  const __m256 table_lo = _mm256_loadu_ps(kNF4Table), table_hi = _mm256_loadu_ps(kNF4Table + 8);
  const __m128i nib = _mm_set1_epi8(0x0f);
  alignas(32) T tab[16];
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 sc = _mm256_set1_ps(block_scale(a, b));
    const __m256 t_lo = _mm256_mul_ps(table_lo, sc), t_hi = _mm256_mul_ps(table_hi, sc);
    const int64_t start = b * a.bs, end = std::min(a.n, start + a.bs);
    const int64_t vec_end = start + ((end - start) & ~int64_t(31));
    int64_t i = start;
    if constexpr (DT == kFloat32) {
      for (; i < vec_end; i += 16) {
        const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.packed + (i >> 1)));
        const __m128i h = _mm_and_si128(_mm_srli_epi16(x, 4), nib), l = _mm_and_si128(x, nib);
        const __m128i c = _mm_unpacklo_epi8(h, l);  // 16 codes in element order
        for (int k = 0; k < 2; ++k) {
          const __m256i idx = _mm256_cvtepu8_epi32(k ? _mm_srli_si128(c, 8) : c);
          const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
          _mm256_storeu_ps(out + i + 8 * k, v);
        }
      }
      if (i < end) {
        _mm256_store_ps(tab, t_lo);
        _mm256_store_ps(tab + 8, t_hi);
        dequant_tail<DT>(out, a.packed, tab, i, end);
      }
    } else {
      __m128i w_lo, w_hi;  // 8 + 8 output words
      if constexpr (DT == kFloat16) {
        w_lo = _mm256_cvtps_ph(t_lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        w_hi = _mm256_cvtps_ph(t_hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        w_lo = bf16_rne_avx2(t_lo);
        w_hi = bf16_rne_avx2(t_hi);
      }
      // Split the 16 words into a low-byte table and a high-byte table for vpshufb.
      const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      const __m128i s0 = _mm_shuffle_epi8(w_lo, split), s1 = _mm_shuffle_epi8(w_hi, split);
      const __m256i tlo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(s0, s1));
      const __m256i thi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(s0, s1));
      for (; i < vec_end; i += 32) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.packed + (i >> 1)));
        const __m128i h = _mm_and_si128(_mm_srli_epi16(x, 4), nib), l = _mm_and_si128(x, nib);
        // codes 0..15 in the low lane, 16..31 in the high lane
        const __m256i c = _mm256_set_m128i(_mm_unpackhi_epi8(h, l), _mm_unpacklo_epi8(h, l));
        const __m256i lob = _mm256_shuffle_epi8(tlo, c), hib = _mm256_shuffle_epi8(thi, c);
        const __m256i w0 = _mm256_unpacklo_epi8(lob, hib);  // elements 0..7 | 16..23
        const __m256i w1 = _mm256_unpackhi_epi8(lob, hib);  // elements 8..15 | 24..31
        const __m256i o0 = _mm256_permute2x128_si256(w0, w1, 0x20), o1 = _mm256_permute2x128_si256(w0, w1, 0x31);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), o0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16), o1);
      }
      if (i < end) {
        _mm_store_si128(reinterpret_cast<__m128i*>(tab), w_lo);
        _mm_store_si128(reinterpret_cast<__m128i*>(tab + 8), w_hi);
        dequant_tail<DT>(out, a.packed, tab, i, end);
      }
    }
  }
}
#endif

template <int DT>
void dequant_dispatch(const DeqArgs& a, int64_t b0, int64_t b1, int isa) {
#if QK_X86
  if (isa >= kIsaAvx512) return dequant_range_avx512<DT>(a, b0, b1);
  if (isa >= kIsaAvx2) return dequant_range_avx2<DT>(a, b0, b1);
#endif
  (void)isa;
  dequant_range_scalar<DT>(a, b0, b1);
}

// Large outputs: ask for transparent huge pages on the 2 MiB-aligned interior before the first write. A fresh
// torch.empty output is untouched memory, and first-touching it 4 KiB at a time dominated the call (measured
// on 2 cores, 4096x4096 -> bf16: 17 ms with 4 KiB faults vs 4.4 ms with THP vs 1.5 ms into a reused buffer).
// A hint only (errors ignored); QLORA_KERNELS_THP=0 turns it off. Streaming (non-temporal) stores were
// measured too: 10% faster into a reused buffer, 15% slower into a fresh one, so they are not used.
const bool g_thp = [] {
  const char* e = std::getenv("QLORA_KERNELS_THP");
  return !(e != nullptr && e[0] == '0');
}();

void advise_huge_pages(uintptr_t p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!g_thp || bytes < int64_t(4) << 20) return;
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + (uintptr_t)bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

constexpr int64_t kGrainElems = int64_t(1) << 16;  // below ~64K elements one thread is faster than two

}  // namespace

// ================================================================================================ entry points
std::string cpu_isa() { return kIsaNames[active_isa()]; }

std::string set_cpu_isa(const std::string& name) {
  g_cap.store(isa_from_name(name));
  return cpu_isa();
}

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> v;
  for (int i = 0; i <= g_detected; ++i) v.emplace_back(kIsaNames[i]);
  return v;
}

void quantize_nf4_cpu(uintptr_t packed_p, uintptr_t absmax_p, uintptr_t status_p, uintptr_t w_p, int64_t n,
                      int64_t blocksize, int64_t dtype, int64_t num_threads) {
  check_n(n);
  check_blocksize(blocksize);
  check_dtype(dtype, "dtype");
  check_ptr(packed_p, n, "packed");
  check_ptr(absmax_p, n, "absmax");
  check_ptr(status_p, n, "status");
  check_ptr(w_p, n, "w");
  if (n == 0) return;
  auto* packed = reinterpret_cast<uint8_t*>(packed_p);
  auto* absmax = reinterpret_cast<float*>(absmax_p);
  auto* status = reinterpret_cast<int64_t*>(status_p);
  const void* w = reinterpret_cast<const void*>(w_p);
  advise_huge_pages(packed_p, (n + 1) / 2);
  const int64_t nb = (n + blocksize - 1) / blocksize;
  const int isa = active_isa();
  NonFinite nf;
  parallel_for(nb, num_threads, std::max<int64_t>(1, kGrainElems / blocksize), [&](int64_t b0, int64_t b1) {
    switch (dtype) {
      case kFloat32: return quantize_dispatch<kFloat32>(packed, absmax, nf, w, n, blocksize, b0, b1, isa);
      case kFloat16: return quantize_dispatch<kFloat16>(packed, absmax, nf, w, n, blocksize, b0, b1, isa);
      default: return quantize_dispatch<kBFloat16>(packed, absmax, nf, w, n, blocksize, b0, b1, isa);
    }
  });
  const int64_t count = nf.count.load();
  if (count) {
    status[0] += count;
    status[1] = std::min(status[1], nf.first.load());
  }
}

void dequantize_nf4_cpu(uintptr_t out_p, uintptr_t packed_p, uintptr_t absmax_p, uintptr_t nested_p,
                        uintptr_t offset_p, uintptr_t map_p, int64_t n, int64_t blocksize, int64_t out_dtype,
                        int64_t num_threads) {
  check_n(n);
  check_blocksize(blocksize);
  check_dtype(out_dtype, "out_dtype");
  check_ptr(out_p, n, "out");
  check_ptr(packed_p, n, "packed");
  check_ptr(absmax_p, n, "absmax");
  if (nested_p != 0) {
    check_ptr(offset_p, n, "offset");
    check_ptr(map_p, n, "dynamic_map");
  }
  if (n == 0) return;
  DeqArgs a;
  a.out = reinterpret_cast<void*>(out_p);
  a.packed = reinterpret_cast<const uint8_t*>(packed_p);
  a.absmax = reinterpret_cast<const void*>(absmax_p);
  a.nested = nested_p ? reinterpret_cast<const float*>(nested_p) : nullptr;
  a.map = nested_p ? reinterpret_cast<const float*>(map_p) : nullptr;
  a.offset = nested_p ? *reinterpret_cast<const float*>(offset_p) : 0.0f;
  a.n = n;
  a.bs = blocksize;
  advise_huge_pages(out_p, n * (out_dtype == kFloat32 ? 4 : 2));
  const int64_t nb = (n + blocksize - 1) / blocksize;
  const int isa = active_isa();
  parallel_for(nb, num_threads, std::max<int64_t>(1, kGrainElems / blocksize), [&](int64_t b0, int64_t b1) {
    switch (out_dtype) {
      case kFloat32: return dequant_dispatch<kFloat32>(a, b0, b1, isa);
      case kFloat16: return dequant_dispatch<kFloat16>(a, b0, b1, isa);
      default: return dequant_dispatch<kBFloat16>(a, b0, b1, isa);
    }
  });
}

void double_quantize_cpu(uintptr_t codes_p, uintptr_t nested_p, uintptr_t absmax_p, uintptr_t offset_p,
                         uintptr_t lut_p, int64_t nblocks, int64_t num_threads) {
  check_n(nblocks, "nblocks");
  check_ptr(codes_p, nblocks, "codes");
  check_ptr(nested_p, nblocks, "nested_absmax");
  check_ptr(absmax_p, nblocks, "absmax");
  check_ptr(offset_p, nblocks, "offset");
  check_ptr(lut_p, nblocks, "lut");
  if (nblocks == 0) return;
  auto* codes = reinterpret_cast<uint8_t*>(codes_p);
  auto* nested = reinterpret_cast<float*>(nested_p);
  const auto* absmax = reinterpret_cast<const float*>(absmax_p);
  const auto* lut = reinterpret_cast<const uint8_t*>(lut_p);
  const float offset = *reinterpret_cast<const float*>(offset_p);
  const int64_t ng = (nblocks + kNestedBlock - 1) / kNestedBlock;
  parallel_for(ng, num_threads, kGrainElems / kNestedBlock, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t start = g * kNestedBlock, end = std::min(nblocks, start + kNestedBlock);
      uint32_t am = 0;
      for (int64_t i = start; i < end; ++i) am = std::max(am, abs_bits(f_sub(absmax[i], offset)));
      const float amax = f_from_bits(am);
      nested[g] = amax;
      if (amax == 0.0f) {  // an all-equal group: every code 0 (the reference's codes[absmax == 0] = 0)
        std::fill(codes + start, codes + end, uint8_t(0));
        continue;
      }
      const float inv = f_rcp(amax);
      for (int64_t i = start; i < end; ++i)
        codes[i] = lut[lut_index(clamp_unit(f_mul(f_sub(absmax[i], offset), inv)))];
    }
  });
}

void double_dequantize_cpu(uintptr_t out_p, uintptr_t codes_p, uintptr_t nested_p, uintptr_t offset_p,
                           uintptr_t map_p, int64_t nblocks, int64_t num_threads) {
  check_n(nblocks, "nblocks");
  check_ptr(out_p, nblocks, "absmax_out");
  check_ptr(codes_p, nblocks, "codes");
  check_ptr(nested_p, nblocks, "nested_absmax");
  check_ptr(offset_p, nblocks, "offset");
  check_ptr(map_p, nblocks, "dynamic_map");
  if (nblocks == 0) return;
  auto* out = reinterpret_cast<float*>(out_p);
  const auto* codes = reinterpret_cast<const uint8_t*>(codes_p);
  const auto* nested = reinterpret_cast<const float*>(nested_p);
  const auto* map = reinterpret_cast<const float*>(map_p);
  const float offset = *reinterpret_cast<const float*>(offset_p);
  parallel_for(nblocks, num_threads, kGrainElems, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = rebuild_scale(map[codes[i]], nested[i / kNestedBlock], offset);
  });
}

void pack_nf4_cpu(uintptr_t packed_p, uintptr_t codes_p, int64_t n, int64_t num_threads) {
  check_n(n);
  check_ptr(packed_p, n, "packed");
  check_ptr(codes_p, n, "codes");
  if (n == 0) return;
  auto* packed = reinterpret_cast<uint8_t*>(packed_p);
  const auto* codes = reinterpret_cast<const uint8_t*>(codes_p);
  const int64_t nbytes = (n + 1) / 2, full = n / 2;
  parallel_for(nbytes, num_threads, kGrainElems, [&](int64_t j0, int64_t j1) {
    const int64_t jf = std::min(j1, full);
    for (int64_t j = j0; j < jf; ++j) packed[j] = pack_pair(codes[2 * j], codes[2 * j + 1]);
    if (j1 > full) packed[full] = pack_pair(codes[2 * full], kZeroCode);  // odd n: pad with the zero code
  });
}

void unpack_nf4_cpu(uintptr_t codes_p, uintptr_t packed_p, int64_t n, int64_t num_threads) {
  check_n(n);
  check_ptr(codes_p, n, "codes");
  check_ptr(packed_p, n, "packed");
  if (n == 0) return;
  auto* codes = reinterpret_cast<uint8_t*>(codes_p);
  const auto* packed = reinterpret_cast<const uint8_t*>(packed_p);
  const int64_t nbytes = (n + 1) / 2, full = n / 2;
  parallel_for(nbytes, num_threads, kGrainElems, [&](int64_t j0, int64_t j1) {
    const int64_t jf = std::min(j1, full);
    for (int64_t j = j0; j < jf; ++j) {
      codes[2 * j] = unpack_first(packed[j]);
      codes[2 * j + 1] = unpack_second(packed[j]);
    }
    if (j1 > full) codes[2 * full] = unpack_first(packed[full]);
  });
}

}  // namespace qk
