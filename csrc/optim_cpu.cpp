// CPU kernels of the fused AdamW steps. One call per tensor and step: a scan of the gradient for values that
// would poison the states, then one pass over blocks of 256 values: dequantize both states, update in float32,
// write the parameter in its dtype, requantize (absmax, codes). Per-block loops over small arrays so the
// compiler vectorizes them; they are compiled three times (baseline, AVX2, AVX-512 through target attributes)
// and chosen at run time from qk::cpu_isa(), like the NF4 kernels. std::thread chunks (cpu_threads.h).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>
#include <stdexcept>
#include <string>

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
// maximum is the maximum magnitude. True when some element is NaN, inf or >= 2^63.
template <int DT>
bool grad_rejected_any(const void* g, int64_t n, int64_t num_threads, int isa) {
  std::atomic<uint32_t> worst{0};
  parallel_for(n, num_threads, kGrainElems, [&](int64_t i0, int64_t i1) {
    uint32_t mx;
#if QK_OPT_X86
    if (isa >= kOptAvx2)
      mx = grad_max_bits_avx2<DT>(g, i0, i1);
    else
#endif
      mx = grad_max_bits_scalar<DT>(g, i0, i1);
    uint32_t cur = worst.load(std::memory_order_relaxed);
    while (mx > cur && !worst.compare_exchange_weak(cur, mx, std::memory_order_relaxed)) {
    }
  });
  (void)isa;
  return worst.load() >= kGradLimitBits;
}

// ---------------------------------------------------------------------------------------- parameter blocks
// float16 <-> float32 through F16C (vcvtph2ps is exact; vcvtps2ph with round-to-nearest-even keeps subnormals,
// as float_to_half_bits does): the portable conversion has branches the compiler cannot vectorize.
#if QK_OPT_X86
__attribute__((target("avx2,f16c"))) void load_half_f16c(float* dst, const uint16_t* src, int len) {
  int i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < len; ++i) dst[i] = half_bits_to_float(src[i]);
}
__attribute__((target("avx2,f16c"))) void store_half_f16c(uint16_t* dst, const float* src, int len) {
  int i = 0;
  for (; i + 8 <= len; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < len; ++i) dst[i] = float_to_half_bits(src[i]);
}
#endif

template <int DT, int ISA>
QK_ALWAYS_INLINE void load_block(float* dst, const void* src, int64_t start, int len) {
#if QK_OPT_X86
  if constexpr (DT == kFloat16 && ISA >= kOptAvx2) {
    load_half_f16c(dst, static_cast<const uint16_t*>(src) + start, len);
    return;
  }
#endif
  for (int i = 0; i < len; ++i) dst[i] = load_as_float<DT>(src, start + i);
}

template <int DT, int ISA>
QK_ALWAYS_INLINE void store_block(void* dst, const float* src, int64_t start, int len) {
#if QK_OPT_X86
  if constexpr (DT == kFloat16 && ISA >= kOptAvx2) {
    store_half_f16c(static_cast<uint16_t*>(dst) + start, src, len);
    return;
  }
#endif
  for (int i = 0; i < len; ++i) store_from_float<DT>(dst, start + i, src[i]);
}

// ---------------------------------------------------------------------------------------- 8-bit state codes
// Table lookups (dequantize: map[code]; quantize: base[bucket], mids[base]) as AVX2 gathers: the compiler
// leaves them scalar, and they were most of the step (16M fp32 params, 2 threads: ~460 ms with scalar lookups).
QK_ALWAYS_INLINE void dequant_codes_portable(float* out, const uint8_t* codes, const float* map, float absmax,
                                             int len) {
  for (int i = 0; i < len; ++i) out[i] = state_value(map[codes[i]], absmax);
}
QK_ALWAYS_INLINE void quant_codes_portable(uint8_t* out, const float* x, float inv, const int32_t* base,
                                           const float* mids, int len) {
  for (int i = 0; i < len; ++i) {
    const float sc = f_mul(x[i], inv);
    const int32_t b = base[bucket_of(sc)];
    out[i] = state_code(sc, b, mids[b]);
  }
}
#if QK_OPT_X86
__attribute__((target("avx2"))) void dequant_codes_avx2(float* out, const uint8_t* codes, const float* map,
                                                        float absmax, int len) {
  const __m256 am = _mm256_set1_ps(absmax);
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), am));
  }
  dequant_codes_portable(out + i, codes + i, map, absmax, len - i);
}
// The bucket bases as bytes (codes fit in 8 bits): 26 KiB for both maps instead of 106 KiB of int32, so the
// gathers hit L1. Built once from the int32 table the caller passes (rebuilt if another table arrives);
// padded so a 4-byte gather at the last byte stays inside.
struct ByteBases {
  std::mutex mu;
  const int32_t* source = nullptr;
  std::vector<uint8_t> bytes;
};
ByteBases g_byte_bases;

const uint8_t* byte_bases(const int32_t* tab) {
  std::lock_guard<std::mutex> lock(g_byte_bases.mu);
  if (g_byte_bases.source != tab) {
    g_byte_bases.bytes.assign(2 * 2 * kNumBuckets + 4, 0);
    for (int m = 0; m < 2; ++m)
      for (int k = 0; k < 2 * kNumBuckets; ++k)
        g_byte_bases.bytes[m * 2 * kNumBuckets + k] = (uint8_t)tab[m * kTableStride + kBaseOffset + k];
    g_byte_bases.source = tab;
  }
  return g_byte_bases.bytes.data();
}

__attribute__((target("avx2"))) void quant_codes_avx2(uint8_t* out, const float* x, float inv, const uint8_t* base,
                                                      const float* mids, int len) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256i lo = _mm256_set1_epi32(kBucketLo), hi = _mm256_set1_epi32(kBucketHi - 1);
  const __m256i nb = _mm256_set1_epi32(kNumBuckets);
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);  // one rounding, as f_mul
    const __m256i bits = _mm256_castps_si256(sc);
    __m256i k = _mm256_srli_epi32(_mm256_and_si256(bits, absmask), kBucketShift);
    k = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(k, lo), hi), lo);
    k = _mm256_add_epi32(k, _mm256_and_si256(_mm256_srai_epi32(bits, 31), nb));  // negative: second half
    const __m256i b = _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(base), k, 1),
                                       _mm256_set1_epi32(0xff));
    const __m256 mid = _mm256_i32gather_ps(mids, b, 4);
    // code = b + (mid < sc): the compare mask is -1 where true
    const __m256i code = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(mid, sc, _CMP_LT_OQ)));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w, w));
  }
  for (; i < len; ++i) {
    const float sc = f_mul(x[i], inv);
    const int32_t b = base[bucket_of(sc)];
    out[i] = state_code(sc, b, mids[b]);
  }
}
#endif

template <int ISA>
QK_ALWAYS_INLINE void dequant_codes(float* out, const uint8_t* codes, const float* map, float absmax, int len) {
#if QK_OPT_X86
  if constexpr (ISA >= kOptAvx2) return dequant_codes_avx2(out, codes, map, absmax, len);
#endif
  dequant_codes_portable(out, codes, map, absmax, len);
}
template <int ISA>
QK_ALWAYS_INLINE void quant_codes(uint8_t* out, const float* x, float inv, const int32_t* base,
                                  const uint8_t* base_bytes, const float* mids, int len) {
#if QK_OPT_X86
  if constexpr (ISA >= kOptAvx2) return quant_codes_avx2(out, x, inv, base_bytes, mids, len);
#endif
  (void)base_bytes;
  quant_codes_portable(out, x, inv, base, mids, len);
}

// ---------------------------------------------------------------------------------------- 8-bit step
struct Step8 {
  void* p;
  const void* g;
  uint8_t* c1;
  uint8_t* c2;
  float* a1;
  float* a2;
  const int32_t* tab;  // signed map's table, then the unsigned map's at + kTableStride
  const uint8_t* base_bytes;  // byte_bases(tab) on x86 (nullptr otherwise)
  int64_t n;
  AdamScalars s;
};

// One block of up to 256 values. Loops over small arrays; the table lookups become gathers where the ISA
// has them.
template <int DT, int ISA>
QK_ALWAYS_INLINE void step8_block(const Step8& a, int64_t b) {
  const int64_t start = b * kOptBlock;
  const int len = (int)std::min<int64_t>(kOptBlock, a.n - start);
  const float* map1 = reinterpret_cast<const float*>(a.tab + kMapOffset);
  const float* mid1 = reinterpret_cast<const float*>(a.tab + kMidOffset);
  const int32_t* base1 = a.tab + kBaseOffset;
  const float* map2 = reinterpret_cast<const float*>(a.tab + kTableStride + kMapOffset);
  const float* mid2 = reinterpret_cast<const float*>(a.tab + kTableStride + kMidOffset);
  const int32_t* base2 = a.tab + kTableStride + kBaseOffset;
  const uint8_t* c1 = a.c1 + start;
  const uint8_t* c2 = a.c2 + start;
  float m[kOptBlock], v[kOptBlock], p[kOptBlock], g[kOptBlock];
  const float am1 = a.a1[b], am2 = a.a2[b];
  dequant_codes<ISA>(m, c1, map1, am1, len);
  dequant_codes<ISA>(v, c2, map2, am2, len);
  load_block<DT, ISA>(p, a.p, start, len);
  load_block<DT, ISA>(g, a.g, start, len);
  const AdamScalars s = a.s;
  for (int i = 0; i < len; ++i) adamw_update(p[i], g[i], m[i], v[i], s);
  store_block<DT, ISA>(a.p, p, start, len);
  uint32_t mx1 = 0, mx2 = 0;
  for (int i = 0; i < len; ++i) mx1 = std::max(mx1, abs_bits(m[i]));
  for (int i = 0; i < len; ++i) mx2 = std::max(mx2, abs_bits(v[i]));
  const float new1 = f_from_bits(mx1), new2 = f_from_bits(mx2);
  a.a1[b] = new1;
  a.a2[b] = new2;
  const float inv1 = state_inv_scale(new1), inv2 = state_inv_scale(new2);
  quant_codes<ISA>(a.c1 + start, m, inv1, base1, a.base_bytes, mid1, len);
  quant_codes<ISA>(a.c2 + start, v, inv2, base2, a.base_bytes + 2 * kNumBuckets, mid2, len);
}

template <int DT>
void step8_range_scalar(const Step8& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) step8_block<DT, kOptScalar>(a, b);
}
#if QK_OPT_X86
template <int DT>
__attribute__((target("avx2,f16c"))) void step8_range_avx2(const Step8& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) step8_block<DT, kOptAvx2>(a, b);
}
template <int DT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c"))) void step8_range_avx512(const Step8& a, int64_t b0,
                                                                                           int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) step8_block<DT, kOptAvx512>(a, b);
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

template <int DT, int ISA>
QK_ALWAYS_INLINE void step32_body(const Step32& a, int64_t i0, int64_t i1) {
  const AdamScalars s = a.s;
  float p[kOptBlock], g[kOptBlock];
  for (int64_t start = i0; start < i1; start += kOptBlock) {
    const int len = (int)std::min<int64_t>(kOptBlock, i1 - start);
    load_block<DT, ISA>(p, a.p, start, len);
    load_block<DT, ISA>(g, a.g, start, len);
    float* m = a.m + start;
    float* v = a.v + start;
    for (int i = 0; i < len; ++i) adamw_update(p[i], g[i], m[i], v[i], s);
    store_block<DT, ISA>(a.p, p, start, len);
  }
}
template <int DT>
void step32_scalar(const Step32& a, int64_t i0, int64_t i1) {
  step32_body<DT, kOptScalar>(a, i0, i1);
}
#if QK_OPT_X86
template <int DT>
__attribute__((target("avx2,f16c"))) void step32_avx2(const Step32& a, int64_t i0, int64_t i1) {
  step32_body<DT, kOptAvx2>(a, i0, i1);
}
template <int DT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c"))) void step32_avx512(const Step32& a, int64_t i0,
                                                                                      int64_t i1) {
  step32_body<DT, kOptAvx512>(a, i0, i1);
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

// A gradient holding NaN, inf or |g| >= 2^63 skips the whole step for this tensor: count it and say so.
bool skip_rejected_grad(uintptr_t grad, int64_t n, int64_t dtype, uintptr_t skipped, int64_t num_threads, int isa) {
  bool rejected = false;
  by_dtype(dtype, [&](auto dt) {
    rejected = grad_rejected_any<decltype(dt)::value>(reinterpret_cast<const void*>(grad), n, num_threads, isa);
  });
  if (rejected) *reinterpret_cast<int64_t*>(skipped) += 1;
  return rejected;
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

void adamw8bit_step_cpu(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                        uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                        int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t num_threads) {
  check_adamw8bit_args(param, grad, state1, state2, absmax1, absmax2, step, skipped, flag, table, n, dtype, lr, beta1,
                       beta2, eps, weight_decay);
  auto* step_p = reinterpret_cast<int64_t*>(step);
  const int isa = opt_isa();
  if (skip_rejected_grad(grad, n, dtype, skipped, num_threads, isa)) return;
  Step8 a;
  a.p = reinterpret_cast<void*>(param);
  a.g = reinterpret_cast<const void*>(grad);
  a.c1 = reinterpret_cast<uint8_t*>(state1);
  a.c2 = reinterpret_cast<uint8_t*>(state2);
  a.a1 = reinterpret_cast<float*>(absmax1);
  a.a2 = reinterpret_cast<float*>(absmax2);
  a.tab = reinterpret_cast<const int32_t*>(table);
#if QK_OPT_X86
  a.base_bytes = isa >= kOptAvx2 ? byte_bases(a.tab) : nullptr;
#else
  a.base_bytes = nullptr;
#endif
  a.n = n;
  a.s = adam_scalars(*step_p + 1, lr, beta1, beta2, eps, weight_decay);
  const int64_t nb = (n + kOptBlock - 1) / kOptBlock;
  by_dtype(dtype, [&](auto dt) {
    parallel_for(nb, num_threads, kGrainElems / kOptBlock,
                 [&](int64_t b0, int64_t b1) { step8_dispatch<decltype(dt)::value>(a, b0, b1, isa); });
  });
  *step_p += 1;
}

void adamw32bit_step_cpu(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                         uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t num_threads) {
  check_adamw32bit_args(param, grad, exp_avg, exp_avg_sq, step, skipped, flag, n, dtype, lr, beta1, beta2, eps,
                        weight_decay);
  auto* step_p = reinterpret_cast<int64_t*>(step);
  const int isa = opt_isa();
  if (skip_rejected_grad(grad, n, dtype, skipped, num_threads, isa)) return;
  Step32 a;
  a.p = reinterpret_cast<void*>(param);
  a.g = reinterpret_cast<const void*>(grad);
  a.m = reinterpret_cast<float*>(exp_avg);
  a.v = reinterpret_cast<float*>(exp_avg_sq);
  a.s = adam_scalars(*step_p + 1, lr, beta1, beta2, eps, weight_decay);
  by_dtype(dtype, [&](auto dt) {
    parallel_for(n, num_threads, kGrainElems,
                 [&](int64_t i0, int64_t i1) { step32_dispatch<decltype(dt)::value>(a, i0, i1, isa); });
  });
  *step_p += 1;
}

}  // namespace qk
