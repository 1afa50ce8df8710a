// Decode GEMM for M <= 16 (issue 9): y [M, N] = x [M, K] @ deq(W)^T (+ scaling * U @ B^T + bias), x fp16 / bf16.
//
// W is the register-held A operand of mma.sync.m16n8k16 (fp32 accumulate), x^T the B operand (x rows past M
// load as zeros; one n8 tile for M <= 8, two for M <= 16). Layout and lookup: nf4_decode_layout.h (host
// tested). A CTA of 4 warps owns 16 rows of W and a K range (split-K over gridDim.y); warp w takes the range's
// 256-wide tiles w, w + 4, ... Per tile a lane issues its four 16-byte W loads (2 rows x 32 bytes) and eight
// (sixteen) 16-byte x loads before any arithmetic, builds two product tables (16 FMUL + 8 cvt + 8 PRMT each)
// and dequantizes straight into A fragments (2 PRMT per weight). The 4 warps' accumulators are summed in a
// fixed order through shared memory; split > 1 writes fp32 partials [split, M, N], summed in split order
// (deterministic; no atomics on the output) before the LoRA + bias epilogue: by the row group's last CTA
// (a per-row-group arrival counter, reset by that CTA) or, without counters, by nf4_decode_reduce_kernel.
//
// Fast path only: K % 256 == 0, K % blocksize == 0, blocksize >= 64, 16-byte aligned packed / x, M <= 16, fp16 / bf16.
// Other shapes return false ("not supported"): the caller runs the Triton decode.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_launch.h"
#include "nf4_decode_layout.h"
#include "nf4_format.h"
#include "nf4_kernels.h"

namespace qk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <int DT>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if (DT == kFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <bool NESTED>
__device__ __forceinline__ float block_scale(const void* absmax, const float* nested, const float* dmap, float off,
                                             uint32_t b) {
  if (NESTED) {
    const uint32_t code = __ldg(static_cast<const uint8_t*>(absmax) + b);
    return rebuild_scale(__ldg(dmap + code), __ldg(nested + (b >> 8)), off);  // kNestedBlock = 256
  }
  return __ldg(static_cast<const float*>(absmax) + b);
}

template <int DT>
__device__ __forceinline__ float to_float(uint16_t v) {
  return DT == kFloat16 ? half_bits_to_float(v) : bf16_bits_to_float(v);
}
template <int DT>
__device__ __forceinline__ uint16_t from_float(float v) {
  return DT == kFloat16 ? float_to_half_bits(v) : float_to_bf16_bits(v);
}

struct Epilogue {
  const uint16_t* u;  // lora_u [M, R] (x dtype), strides su_m, su_r
  const uint16_t* lb;  // lora_b [N, R], strides sb_n, sb_r
  const uint16_t* bias;
  int64_t su_m, su_r, sb_n, sb_r;
  int R;
  float scaling;
};

// y[m, n] from the fp32 sum: + scaling * U[m] . B[n] (fp32) + bias[n], rounded once to the output type.
template <int DT>
__device__ __forceinline__ void finish(uint16_t* y, int64_t ldy, const Epilogue& e, int m, int n, float acc) {
  if (e.R > 0) {
    float d = 0.0f;
    for (int r = 0; r < e.R; ++r)
      d = f_add(d, f_mul(to_float<DT>(e.u[m * e.su_m + r * e.su_r]), to_float<DT>(e.lb[n * e.sb_n + r * e.sb_r])));
    acc = f_add(acc, f_mul(e.scaling, d));
  }
  if (e.bias != nullptr) acc = f_add(acc, to_float<DT>(e.bias[n]));
  y[m * ldy + n] = from_float<DT>(acc);
}

// MT: n8 tiles (1: M <= 8, 2: M <= 16).
template <int DT, bool NESTED, int MT>
__global__ void __launch_bounds__(kThreads)
    nf4_decode_kernel(uint16_t* __restrict__ y, float* __restrict__ part, unsigned* __restrict__ counters,
                      const uint16_t* __restrict__ x,
                      const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                      const float* __restrict__ nested, const float* __restrict__ offset,
                      const float* __restrict__ dmap, Epilogue e, int64_t ldx, int64_t ldy, int M, int N, int K,
                      int tiles_per_split, int log2bs, uint32_t sel_base) {
  __shared__ float s_acc[kWarps][dec::kRows][8 * MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * dec::kRows;
  const int ktiles = K / dec::kTileK;
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = min(ktiles, t_begin + tiles_per_split);
  const float off = NESTED ? __ldg(offset) : 0.0f;

  // This lane's rows (clamped: rows past N read row N - 1 and are never stored) and x rows (past M: row M - 1;
  // they only feed accumulator columns m >= M, which are never stored). Pointers advance by whole tiles.
  const int t0 = t_begin + warp;
  const int count = t0 < t_end ? (t_end - t0 + kWarps - 1) / kWarps : 0;
  const int ra = min(n0 + dec::a_row(lane, 0), N - 1), rb = min(n0 + dec::a_row(lane, 1), N - 1);
  const uint4* pa = reinterpret_cast<const uint4*>(packed + (int64_t)ra * (K / 2)) + 2 * dec::lane_t(lane) + 8 * t0;
  const uint4* pb = reinterpret_cast<const uint4*>(packed + (int64_t)rb * (K / 2)) + 2 * dec::lane_t(lane) + 8 * t0;
  const uint4* px[MT];
#pragma unroll
  for (int nt = 0; nt < MT; ++nt)
    px[nt] = reinterpret_cast<const uint4*>(x + (int64_t)min(dec::b_m(lane, nt), M - 1) * ldx) + 8 * dec::lane_t(lane) +
             32 * t0;
  // NF4 block of (row, k) = row * (K / blocksize) + k / blocksize (K % blocksize == 0; < 2^31 blocks)
  const int ba = ra * (K >> log2bs), bb = rb * (K >> log2bs);
  int k_lane = t0 * dec::kTileK + dec::kLaneK * dec::lane_t(lane);
  // word_sel's constant in a register (N >> 31 is 0, unknown to the compiler): else sm_80 takes it from the
  // constant bank, and LOP3 cannot take that and the mask immediate at once (2 LOP3 per 8 codes instead of 1)
  const uint32_t base = sel_base | ((uint32_t)N >> 31);

  float c[MT][4];
#pragma unroll
  for (int nt = 0; nt < MT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;

  for (int it = 0; it < count; ++it) {
    // the tile's loads first: 4 x 16 bytes of W, 8 x 16 bytes of x per n8 tile, the two block scales
    uint32_t wa[8], wb[8];
    {
      const uint4 a0 = __ldg(pa), a1 = __ldg(pa + 1), b0 = __ldg(pb), b1 = __ldg(pb + 1);
      wa[0] = a0.x, wa[1] = a0.y, wa[2] = a0.z, wa[3] = a0.w, wa[4] = a1.x, wa[5] = a1.y, wa[6] = a1.z, wa[7] = a1.w;
      wb[0] = b0.x, wb[1] = b0.y, wb[2] = b0.z, wb[3] = b0.w, wb[4] = b1.x, wb[5] = b1.y, wb[6] = b1.z, wb[7] = b1.w;
    }
    uint4 xv[MT][8];
#pragma unroll
    for (int nt = 0; nt < MT; ++nt)
#pragma unroll
      for (int j = 0; j < 8; ++j) xv[nt][j] = __ldg(px[nt] + j);
    const int kb = k_lane >> log2bs;
    const dec::Table ta = dec::make_table<DT>(block_scale<NESTED>(absmax, nested, dmap, off, ba + kb));
    const dec::Table tb = dec::make_table<DT>(block_scale<NESTED>(absmax, nested, dmap, off, bb + kb));
    dec::WordSel sa[8], sb[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) sa[j] = dec::word_sel(wa[j], base), sb[j] = dec::word_sel(wb[j], base);
#pragma unroll
    for (int s = 0; s < dec::kSteps; ++s) {
      uint32_t a[4];
      dec::a_fragment(ta, tb, sa, sb, s, a);
#pragma unroll
      for (int nt = 0; nt < MT; ++nt) {
        // b_k: x k 64 t + 4 s + (0..3) = 16-byte load s / 2, words 2 (s % 2), 2 (s % 2) + 1
        const uint4 v = xv[nt][s >> 1];
        const uint32_t b0 = (s & 1) ? v.z : v.x, b1 = (s & 1) ? v.w : v.y;
        mma16816<DT>(c[nt], a, b0, b1);
      }
    }
    pa += 8 * kWarps, pb += 8 * kWarps, k_lane += dec::kTileK * kWarps;
#pragma unroll
    for (int nt = 0; nt < MT; ++nt) px[nt] += 32 * kWarps;
  }

  // fixed-order reduction of the 4 warps, then y (one split) or the fp32 partials
#pragma unroll
  for (int nt = 0; nt < MT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) s_acc[warp][dec::c_row(lane, i)][dec::c_m(lane, nt, i)] = c[nt][i];
  __syncthreads();
  for (int o = threadIdx.x; o < dec::kRows * 8 * MT; o += kThreads) {
    const int row = o / (8 * MT), m = o % (8 * MT), n = n0 + row;
    if (m >= M || n >= N) continue;
    float acc = s_acc[0][row][m];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) acc = f_add(acc, s_acc[w][row][m]);
    if (gridDim.y == 1)
      finish<DT>(y, ldy, e, m, n, acc);
    else
      part[((int64_t)blockIdx.y * M + m) * N + n] = acc;
  }
  if (gridDim.y == 1 || counters == nullptr) return;  // one slice, or nf4_decode_reduce_kernel sums the slices
  // Split-K in this launch: the last CTA of the row group to finish sums the slices in slice order (the
  // result does not depend on which CTA is last) and resets the counter for the next launch / graph replay.
  __shared__ bool s_last;
  __threadfence();  // this CTA's partials are visible device-wide before the count says so
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int o = threadIdx.x; o < dec::kRows * 8 * MT; o += kThreads) {
    const int row = o / (8 * MT), m = o % (8 * MT), n = n0 + row;
    if (m >= M || n >= N) continue;
    const float* p = part + (int64_t)m * N + n;
    float acc = __ldcg(p);  // L2: other SMs wrote these
    for (unsigned sl = 1; sl < gridDim.y; ++sl) acc = f_add(acc, __ldcg(p + (int64_t)sl * M * N));
    finish<DT>(y, ldy, e, m, n, acc);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0u;
}

template <int DT>
__global__ void __launch_bounds__(256) nf4_decode_reduce_kernel(uint16_t* __restrict__ y, const float* __restrict__ part,
                                                                Epilogue e, int64_t ldy, int M, int N, int split) {
  const int64_t o = (int64_t)blockIdx.x * 256 + threadIdx.x;
  if (o >= (int64_t)M * N) return;
  const int m = (int)(o / N), n = (int)(o % N);
  float acc = part[o];
  for (int s = 1; s < split; ++s) acc = f_add(acc, part[(int64_t)s * M * N + o]);  // split order: deterministic
  finish<DT>(y, ldy, e, m, n, acc);
}

template <int DT, bool NESTED>
void launch(int mt, dim3 grid, cudaStream_t st, uint16_t* y, float* part, unsigned* cnt, const uint16_t* x, const uint8_t* p,
            const void* a, const float* ne, const float* of, const float* dm, const Epilogue& e, int64_t ldx,
            int64_t ldy, int M, int N, int K, int tps, int lb) {
  if (mt == 1)
    nf4_decode_kernel<DT, NESTED, 1><<<grid, kThreads, 0, st>>>(y, part, cnt, x, p, a, ne, of, dm, e, ldx, ldy, M, N, K, tps, lb, 0x32103210u);
  else
    nf4_decode_kernel<DT, NESTED, 2><<<grid, kThreads, 0, st>>>(y, part, cnt, x, p, a, ne, of, dm, e, ldx, ldy, M, N, K, tps, lb, 0x32103210u);
}

}  // namespace

bool nf4_decode_cuda_supported(int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t dtype) {
  return m >= 1 && m <= 16 && n >= 1 && k >= dec::kTileK && k % dec::kTileK == 0 && blocksize >= 64 &&
         k % blocksize == 0 && (dtype == kFloat16 || dtype == kBFloat16) && n * (k / blocksize) < (int64_t(1) << 31) &&
         k < (int64_t(1) << 30) && n < (int64_t(1) << 30);
}

bool nf4_decode_cuda(uintptr_t y, uintptr_t part, uintptr_t counters, uintptr_t x, uintptr_t packed, uintptr_t absmax,
                     uintptr_t nested_absmax, uintptr_t offset, uintptr_t dynamic_map, uintptr_t lora_u,
                     uintptr_t lora_b, uintptr_t bias, int64_t m, int64_t n, int64_t k, int64_t r, int64_t ldx,
                     int64_t ldy, int64_t su_m, int64_t su_r, int64_t sb_n, int64_t sb_r, double scaling,
                     int64_t blocksize, int64_t dtype, int64_t split, uintptr_t stream) {
  check_blocksize(blocksize);
  check_dtype(dtype, "dtype");
  if (m < 0 || n < 0 || k < 0) throw std::invalid_argument("m, n, k must be >= 0");
  if (!nf4_decode_cuda_supported(m, n, k, blocksize, dtype)) return false;
  if ((packed & 15u) || (x & 15u) || ldx % 8 != 0) return false;  // 16-byte loads of W and x
  check_ptr(y, 1, "y");
  check_ptr(x, 1, "x");
  check_ptr(packed, 1, "packed");
  check_ptr(absmax, 1, "absmax");
  if (nested_absmax != 0) {
    check_ptr(offset, 1, "offset");
    check_ptr(dynamic_map, 1, "dynamic_map");
  }
  if (r < 0) throw std::invalid_argument("r must be >= 0");
  if (r > 0) {
    check_ptr(lora_u, 1, "lora_u");
    check_ptr(lora_b, 1, "lora_b");
  }
  if (ldy < n) throw std::invalid_argument("ldy must be >= n");
  const int64_t ktiles = k / dec::kTileK;
  if (split < 1 || split > ktiles)
    throw std::invalid_argument("split must be in [1, " + std::to_string(ktiles) + "], got " + std::to_string(split));
  if (split > 1) check_ptr(part, 1, "part");
  const int tps = (int)((ktiles + split - 1) / split);
  const int used = (int)((ktiles + tps - 1) / tps);  // the caller's partial buffer holds `split` >= used slices
  const dim3 grid((unsigned)((n + dec::kRows - 1) / dec::kRows), (unsigned)used);
  if (grid.x > 0x7fffffffu || used > 65535) throw std::invalid_argument("n or split too large for one launch");
  Epilogue e{reinterpret_cast<const uint16_t*>(lora_u), reinterpret_cast<const uint16_t*>(lora_b),
             reinterpret_cast<const uint16_t*>(bias), su_m, su_r, sb_n, sb_r, (int)r, (float)scaling};
  const cudaStream_t st = as_stream(stream);
  auto* yp = reinterpret_cast<uint16_t*>(y);
  auto* pp = reinterpret_cast<float*>(part);
  auto* cp = reinterpret_cast<unsigned*>(counters);
  const auto* xp = reinterpret_cast<const uint16_t*>(x);
  const auto* p = reinterpret_cast<const uint8_t*>(packed);
  const void* a = reinterpret_cast<const void*>(absmax);
  const auto* ne = reinterpret_cast<const float*>(nested_absmax);
  const auto* of = reinterpret_cast<const float*>(offset);
  const auto* dm = reinterpret_cast<const float*>(dynamic_map);
  const int mt = m <= 8 ? 1 : 2, M = (int)m, N = (int)n, K = (int)k;
  int lb = 0;
  while ((int64_t(1) << lb) < blocksize) ++lb;
  const bool dq = nested_absmax != 0;
  if (dtype == kFloat16) {
    if (dq) launch<kFloat16, true>(mt, grid, st, yp, pp, cp, xp, p, a, ne, of, dm, e, ldx, ldy, M, N, K, tps, lb);
    else launch<kFloat16, false>(mt, grid, st, yp, pp, cp, xp, p, a, ne, of, dm, e, ldx, ldy, M, N, K, tps, lb);
  } else {
    if (dq) launch<kBFloat16, true>(mt, grid, st, yp, pp, cp, xp, p, a, ne, of, dm, e, ldx, ldy, M, N, K, tps, lb);
    else launch<kBFloat16, false>(mt, grid, st, yp, pp, cp, xp, p, a, ne, of, dm, e, ldx, ldy, M, N, K, tps, lb);
  }
  check_launch("nf4_decode");
  if (used > 1 && counters == 0) {
    const unsigned rg = (unsigned)((m * n + 255) / 256);
    if (dtype == kFloat16)
      nf4_decode_reduce_kernel<kFloat16><<<rg, 256, 0, st>>>(yp, pp, e, ldy, M, N, used);
    else
      nf4_decode_reduce_kernel<kBFloat16><<<rg, 256, 0, st>>>(yp, pp, e, ldy, M, N, used);
    check_launch("nf4_decode_reduce");
  }
  return true;
}

}  // namespace qk
