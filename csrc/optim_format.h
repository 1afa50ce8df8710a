// Per-element logic of the fused AdamW steps (8-bit blockwise and 32-bit states), shared by the CPU and CUDA
// kernels. Each function is one step of python/qlora_kernels/optim/reference.py, in the same order, one
// IEEE rounding per operation (host: -ffp-contract=off; device: __f*_rn / __d*_rn intrinsics, --fmad=false),
// so every device produces the reference's bits.
#pragma once

#include <cstdint>
#include <type_traits>

#include "nf4_format.h"

namespace qk {

// ---- the 8-bit state format (python/qlora_kernels/optim/_format.py) ---------------------------------------
constexpr int kOptBlock = 256;          // values per absmax
constexpr int kBucketShift = 15;        // bucket = top 16 bits of |s| below the sign bit
constexpr int kBucketLo = (127 - 25) << 8;
constexpr int kBucketHi = 128 << 8;
constexpr int kNumBuckets = kBucketHi - kBucketLo;  // per sign
constexpr int kMapOffset = 0;                      // table layout per map: map[256] | mids[256] | base[2 * kNumBuckets]
constexpr int kMidOffset = 256;
constexpr int kBaseOffset = 512;
constexpr int kTableStride = 512 + 2 * kNumBuckets;  // the signed map's table, then the unsigned one
// |g| >= 2^63 (or inf / NaN: larger bit patterns) skips the step: g * g would overflow float32.
constexpr uint32_t kGradLimitBits = 0x5f000000u;

// Host dispatch on the runtime dtype code to a kernel templated on it (the CPU and CUDA launchers).
template <class F>
void by_dtype(int64_t dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(std::integral_constant<int, kFloat32>{});
    case kFloat16: return f(std::integral_constant<int, kFloat16>{});
    default: return f(std::integral_constant<int, kBFloat16>{});
  }
}

// ---- double arithmetic of the per-step scalars, one rounding per operation ----------------------------------
QK_HD double d_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
QK_HD double d_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, -b);
#else
  return a - b;
#endif
}
QK_HD double d_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
QK_HD double d_sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return __builtin_sqrt(a);
#endif
}
QK_HD float f_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// base^exp by binary exponentiation (reference.ipow does the same multiplications).
QK_HD double ipow(double base, int64_t exp) {
  double result = 1.0;
  while (exp) {
    if (exp & 1) result = d_mul(result, base);
    base = d_mul(base, base);
    exp >>= 1;
  }
  return result;
}

// The float32 scalars of step t (>= 1): computed in double, rounded once (reference.step_scalars).
// eps_bc2 and step_size_bc2 are the 8-bit update's (bitsandbytes' blockwise form, adamw8_update).
struct AdamScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, bc2_sqrt, eps, decay, step_size, eps_bc2, step_size_bc2;
};

QK_HD AdamScalars adam_scalars(int64_t t, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const double bc1 = d_sub(1.0, ipow(beta1, t));
  const double bc2 = d_sqrt(d_sub(1.0, ipow(beta2, t)));
  AdamScalars s;
  s.beta1 = (float)beta1;
  s.beta2 = (float)beta2;
  s.one_minus_beta1 = (float)d_sub(1.0, beta1);
  s.one_minus_beta2 = (float)d_sub(1.0, beta2);
  s.bc2_sqrt = (float)bc2;
  s.eps = (float)eps;
  s.decay = (float)d_sub(1.0, d_mul(lr, weight_decay));
  s.step_size = (float)d_div(lr, bc1);
  s.eps_bc2 = (float)d_mul(eps, bc2);
  s.step_size_bc2 = (float)d_div(d_mul(lr, bc2), bc1);
  return s;
}

// The moments of one element, shared by both update forms (reference.adam_moments_ref order).
QK_HD void adam_moments(float g, float& m, float& v, const AdamScalars& s) {
  m = f_add(f_mul(m, s.beta1), f_mul(g, s.one_minus_beta1));
  v = f_add(f_mul(v, s.beta2), f_mul(f_mul(g, g), s.one_minus_beta2));
}

// One element of AdamW in float32 (reference.adamw_update_ref).
QK_HD void adamw_update(float& p, float g, float& m, float& v, const AdamScalars& s) {
  adam_moments(g, m, v, s);
  const float denom = f_add(f_div(f_sqrt(v), s.bc2_sqrt), s.eps);
  p = f_mul(p, s.decay);
  p = f_sub(p, f_mul(s.step_size, f_div(m, denom)));
}

// One element of the 8-bit AdamW step (reference.adamw8_update_ref): bitsandbytes' blockwise 8-bit form,
// the bias corrections folded into the scalars, so ONE division and a square root per value:
// p = p * decay - (lr * bc2 / bc1) * (m / (sqrt(v) + eps * bc2)), algebraically adamw_update. The 32-bit step
// keeps adamw_update (torch.optim.AdamW's order of operations).
QK_HD void adamw8_update(float& p, float g, float& m, float& v, const AdamScalars& s) {
  adam_moments(g, m, v, s);
  const float denom = f_add(f_sqrt(v), s.eps_bc2);
  p = f_mul(p, s.decay);
  p = f_sub(p, f_mul(s.step_size_bc2, f_div(m, denom)));
}

QK_HD bool grad_rejected(float g) { return abs_bits(g) >= kGradLimitBits; }

// ---- 8-bit states ----------------------------------------------------------------------------------------
QK_HD float state_value(float map_value, float absmax) { return f_mul(map_value, absmax); }
// 1 / absmax; 0 for an all-zero block (its values then scale to 0 and take the code of 0).
QK_HD float state_inv_scale(float absmax) { return absmax > 0.0f ? f_rcp(absmax) : 0.0f; }

// Bucket of a scaled value s: sign, then the top 16 bits of |s| below the sign, clamped to the table's range.
QK_HD int bucket_of(float s) {
  const uint32_t bits = f_bits(s);
  int k = (int)((bits & 0x7fffffffu) >> kBucketShift);
  k = k < kBucketLo ? kBucketLo : (k >= kBucketHi ? kBucketHi - 1 : k);
  return (k - kBucketLo) + ((bits >> 31) ? kNumBuckets : 0);
}

// Code of s under one map's table (int32: map and midpoints as float bits, then the bucket bases): the number
// of midpoints strictly below s (torch.bucketize(s, mids, right=False)). mids[255] is +inf.
QK_HD uint8_t state_code(float s, int32_t base, float mid_at_base) {
  return (uint8_t)(base + (mid_at_base < s ? 1 : 0));
}

// ---- parameter dtypes --------------------------------------------------------------------------------------
// float32 -> the bits of a 16-bit parameter dtype (DT != kFloat32).
template <int DT>
QK_HD uint16_t bits16_from_float(float v) {
  if (DT == kFloat16) return float_to_half_bits(v);
  // NaN -> 0x7fc0 as torch does (the rounding add could carry a NaN's payload into the sign)
  return abs_bits(v) > 0x7f800000u ? (uint16_t)0x7fc0u : float_to_bf16_bits(v);
}
template <int DT>
QK_HD float float_from_bits16(uint16_t b) {
  return DT == kFloat16 ? half_bits_to_float(b) : bf16_bits_to_float(b);
}

template <int DT>
QK_HD void store_from_float(void* p, int64_t i, float v) {
  if (DT == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = bits16_from_float<DT>(v);
  }
}

}  // namespace qk
