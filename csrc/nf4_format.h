// Per-element logic of the NF4 format (bitsandbytes 0.50.2 compatible), shared by the CPU and CUDA kernels.
//
// Every function here is the scalar definition of one step of python/qlora_kernels/reference.py. The CPU
// SIMD paths and the CUDA kernels either call these or are tested bit for bit against them. All float
// arithmetic is one IEEE float32 operation per step, round-to-nearest-even, never fused: the host build uses
// -ffp-contract=off, the device side uses the explicit __f*_rn intrinsics (and nvcc --fmad=false).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline
#endif

namespace qk {

// dtype codes shared with python/qlora_kernels/_format.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kNestedBlock = 256;  // double quantization groups 256 scales (fixed by the format)
constexpr int kLutSize = 65536;    // double quantization rounds through a 65536-entry code LUT
constexpr uint8_t kZeroCode = 7;   // NF4 0.0; pads an odd element count
// Smallest scale bitsandbytes divides by: (float)1e-38, a float32 subnormal (what torch's clamp(min=1e-38) uses).
constexpr float kTiny = 0x1.b38fb8p-127f;

// The NF4 table (bitsandbytes' quant_map for nf4) as exact float32 bit patterns. Scalars rather than one
// array: nvcc lets device code use namespace-scope constexpr scalars, not constexpr arrays.
constexpr float kT0 = -0x1.000000p+0f, kT1 = -0x1.647362p-1f, kT2 = -0x1.0cd660p-1f, kT3 = -0x1.946540p-2f;
constexpr float kT4 = -0x1.23449ap-2f, kT5 = -0x1.7a6a7ep-3f, kT6 = -0x1.74f0e2p-4f, kT7 = 0x0.0p+0f;
constexpr float kT8 = 0x1.45f5fep-4f, kT9 = 0x1.4995c6p-3f, kT10 = 0x1.f809bap-3f, kT11 = 0x1.5a0674p-2f;
constexpr float kT12 = 0x1.c34970p-2f, kT13 = 0x1.200f56p-1f, kT14 = 0x1.722766p-1f, kT15 = 0x1.000000p+0f;

// Midpoints (T[j] + T[j + 1]) / 2 in float32 (both steps exact here; checked by a static_assert below).
constexpr float kM0 = -0x1.b239b0p-1f, kM1 = -0x1.38a4e0p-1f, kM2 = -0x1.d70900p-2f, kM3 = -0x1.5bd4ecp-2f;
constexpr float kM4 = -0x1.e079d8p-3f, kM5 = -0x1.1a7178p-3f, kM6 = -0x1.74f0e2p-5f, kM7 = 0x1.45f5fep-5f;
constexpr float kM8 = 0x1.ec90c4p-4f, kM9 = 0x1.a0cfc0p-3f, kM10 = 0x1.2b05a8p-2f, kM11 = 0x1.8ea7f2p-2f;
constexpr float kM12 = 0x1.00da08p-1f, kM13 = 0x1.491b5ep-1f, kM14 = 0x1.b913b4p-1f;

// Host-side arrays (SIMD paths load them into registers).
constexpr float kNF4Table[16] = {kT0, kT1, kT2,  kT3,  kT4,  kT5,  kT6,  kT7,
                                 kT8, kT9, kT10, kT11, kT12, kT13, kT14, kT15};
constexpr float kNF4Mid[15] = {kM0, kM1, kM2, kM3, kM4, kM5, kM6, kM7, kM8, kM9, kM10, kM11, kM12, kM13, kM14};

constexpr bool midpoints_ok() {
  for (int j = 0; j < 15; ++j)
    if ((kNF4Table[j] + kNF4Table[j + 1]) / 2.0f != kNF4Mid[j]) return false;
  return true;
}
static_assert(midpoints_ok(), "NF4 midpoints must be (T[j] + T[j+1]) / 2 in float32");

// ---- one rounding per operation -------------------------------------------------------------------------
QK_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QK_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
QK_HD float f_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
QK_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// 1 / x correctly rounded (torch computes 1.0 / t as reciprocal(t), an IEEE division).
QK_HD float f_rcp(float x) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(x);
#else
  return 1.0f / x;
#endif
}

QK_HD uint32_t f_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
QK_HD float f_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// |x| as an ordered integer: for non-NaN floats, integer order of these bits is float order of |x|, so a
// block's absmax is an integer max (vectorizes, order independent). >= 0x7f800000 means inf or NaN.
QK_HD uint32_t abs_bits(float x) { return f_bits(x) & 0x7fffffffu; }
QK_HD bool is_nonfinite_bits(uint32_t abs_b) { return abs_b >= 0x7f800000u; }

// torch.clamp(x, -1, 1) for non-NaN x.
QK_HD float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

// ---- dtype conversions ---------------------------------------------------------------------------------
QK_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  // Exact widening (every half is a float32).
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while ((mant & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return f_from_bits(bits);
#endif
}
QK_HD float bf16_bits_to_float(uint16_t b) { return f_from_bits((uint32_t)b << 16); }

// float32 -> bfloat16, round to nearest even (torch's c10::BFloat16 rule; no NaN reaches here).
QK_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = f_bits(f);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

// float32 -> float16, round to nearest even, overflow to inf, subnormal results kept (IEEE; as torch).
QK_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = f_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                    // normal half range (>= 2^-14)
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);        // RNE at bit 13 (carry may bump the exponent)
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
  }
  if (a < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to even = 0)
  // Subnormal half: value = mant * 2^-24. Shift the 24-bit significand right and round to nearest even.
  const uint32_t e = a >> 23;                  // biased float exponent, 102..112
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;             // 14..24
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rounded = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return (uint16_t)(sign | rounded);
#endif
}

template <int DT>
QK_HD float load_as_float(const void* p, int64_t i) {
  if (DT == kFloat32) return static_cast<const float*>(p)[i];
  if (DT == kFloat16) return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
}

// ---- NF4 code book -------------------------------------------------------------------------------------
// T[c] for c in 0..15 without indexing an array (so device code can call it too: a balanced select tree).
QK_HD float nf4_value(int c) {
  const float lo = (c & 4) ? ((c & 2) ? ((c & 1) ? kT7 : kT6) : ((c & 1) ? kT5 : kT4))
                           : ((c & 2) ? ((c & 1) ? kT3 : kT2) : ((c & 1) ? kT1 : kT0));
  const float hi = (c & 4) ? ((c & 2) ? ((c & 1) ? kT15 : kT14) : ((c & 1) ? kT13 : kT12))
                           : ((c & 2) ? ((c & 1) ? kT11 : kT10) : ((c & 1) ? kT9 : kT8));
  return (c & 8) ? hi : lo;
}

// Midpoint j (0..14) = kNF4Mid[j] without indexing an array: (T[j] + T[j + 1]) / 2, exact (midpoints_ok).
QK_HD float nf4_mid(int j) { return f_mul(f_add(nf4_value(j), nf4_value(j + 1)), 0.5f); }

// NF4 code of a scaled value: the number of midpoints strictly below it (torch.bucketize,
// right=False), so a value exactly on a midpoint takes the lower code. Branchless (vectorizes / no
// divergence); NaN compares false everywhere and gives 0 (never a valid input: the caller reports it).
QK_HD uint8_t nf4_code(float s) {
  int c = (s > kM0) + (s > kM1) + (s > kM2) + (s > kM3) + (s > kM4) + (s > kM5) + (s > kM6) + (s > kM7);
  c += (s > kM8) + (s > kM9) + (s > kM10) + (s > kM11) + (s > kM12) + (s > kM13) + (s > kM14);
  return (uint8_t)c;
}

// The same code as nf4_code by a 4-level binary search over the 15 midpoints: 4 compares, 3 table reads and
// 4 predicated ORs, no branch, instead of 15 compares and 15 adds (the CUDA quantize kernel; the CPU's portable path
// runs it too, so the CPU tests cover it). mid(a) reads midpoint j at address a = base + 4j (base 256-aligned:
// the running address carries the code bits 4c, so each level is compare + OR, and the reads take immediate
// offsets): kNF4Mid on the host, a shared-memory copy on the device. Equal to nf4_code for every float: both
// count the midpoints strictly below s, the midpoints being sorted; NaN compares false everywhere -> 0.
template <class Mid>
QK_HD uint32_t nf4_code_search(float s, uint32_t base, Mid mid) {
  uint32_t a = base;
  if (s > kM7) a |= 32u;          // c >= 8 (each `if` is one predicated OR on the device: no branch)
  if (s > mid(a + 12)) a |= 16u;  // midpoint c + 3
  if (s > mid(a + 4)) a |= 8u;    // midpoint c + 1
  if (s > mid(a)) a |= 4u;        // midpoint c
  return (a & 63u) >> 2;
}
QK_HD uint32_t nf4_code_search_host(float s) {
  return nf4_code_search(s, 0u, [](uint32_t a) { return kNF4Mid[a >> 2]; });
}

// Scaled value of w in a full block: w * (1 / max(absmax, 1e-38)); inv precomputed. The reference then
// clamps to [-1, 1]; that never changes the code (every midpoint lies strictly inside (-1, 1), so s > m_j
// iff clamp(s) > m_j), and leaving it out lets the host compiler vectorize nf4_code loops.
QK_HD float nf4_scale_full(float w, float inv) { return f_mul(w, inv); }
// Partial last block: true division by the stored (clamped) absmax.
QK_HD float nf4_scale_tail(float w, float absmax_clamped) { return f_div(w, absmax_clamped); }
QK_HD float clamp_tiny(float absmax) { return absmax < kTiny ? kTiny : absmax; }

// Nibble packing: first value in the high nibble (bitsandbytes' layout).
QK_HD uint8_t pack_pair(uint8_t first, uint8_t second) { return (uint8_t)((first << 4) | second); }
QK_HD uint8_t unpack_first(uint8_t byte) { return (uint8_t)(byte >> 4); }
QK_HD uint8_t unpack_second(uint8_t byte) { return (uint8_t)(byte & 0xf); }

// ---- double quantization -------------------------------------------------------------------------------
// LUT index of a scaled value: trunc(((s + 1) * 0.5) * 65535 + 0.5), each step rounded to float32.
// Anything outside [0, 65536) (only NaN can get there) maps to 0 instead of reading out of bounds.
QK_HD uint32_t lut_index(float s) {
  const float t = f_add(f_mul(f_mul(f_add(s, 1.0f), 0.5f), 65535.0f), 0.5f);
  return (t >= 0.0f && t < 65536.0f) ? (uint32_t)t : 0u;
}

// Rebuilt block scale: map[code] * nested_absmax + offset (float32 multiply, then float32 add).
QK_HD float rebuild_scale(float map_value, float nested_absmax, float offset) {
  return f_add(f_mul(map_value, nested_absmax), offset);
}

// One dequantized value in float32 before the cast to the output dtype.
QK_HD float nf4_dequant(float table_value, float scale) { return f_mul(table_value, scale); }

}  // namespace qk
