// CUDA kernels of the NF4 ops. Same arguments as the CPU entry points, with the cudaStream_t last.
//
// Each kernel makes one pass over memory with 16-byte loads/stores when every pointer is 16-byte aligned
// (a uniform flag; misaligned inputs and the tail take scalar accesses). Indices are int64 (n up to 2^34);
// n = 0 launches nothing. All float arithmetic goes through nf4_format.h (__f*_rn, built with --fmad=false),
// so results are bit-identical to the CPU kernels. Every launch is followed by cudaGetLastError().
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_launch.h"
#include "nf4_format.h"
#include "nf4_kernels.h"

namespace qk {
namespace {

inline bool aligned16(uintptr_t p) { return (p & 15u) == 0; }
inline int log2i(int64_t v) {
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v, int lanes) {
  for (int off = 1; off < lanes; off <<= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// A float at a shared-memory address (the table reads of nf4_code_search and of the dequantize lookup).
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// ============================================================================================ quantize
// A thread owns 32 consecutive values (64 or 128 bytes in, 16 packed bytes out); a CTA of 128 threads owns
// 4096 values, so every NF4 block (32..4096) lies inside one CTA and is shared by G = blocksize / 32 threads.
constexpr int kQThreads = 128;
constexpr int kQPer = 32;

template <int DT>
__device__ __forceinline__ void load32(float (&x)[kQPer], const void* w, int64_t base, int64_t n, bool vec) {
  if (vec && base + kQPer <= n) {
    if (DT == kFloat32) {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(w) + base);
#pragma unroll
      for (int k = 0; k < kQPer / 4; ++k) {
        const float4 v = __ldg(p + k);
        x[4 * k] = v.x, x[4 * k + 1] = v.y, x[4 * k + 2] = v.z, x[4 * k + 3] = v.w;
      }
    } else {
      const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w) + base);
#pragma unroll
      for (int k = 0; k < kQPer / 8; ++k) {
        const uint4 v = __ldg(p + k);
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const uint16_t lo = (uint16_t)(words[m] & 0xffffu), hi = (uint16_t)(words[m] >> 16);
          x[8 * k + 2 * m] = DT == kFloat16 ? half_bits_to_float(lo) : bf16_bits_to_float(lo);
          x[8 * k + 2 * m + 1] = DT == kFloat16 ? half_bits_to_float(hi) : bf16_bits_to_float(hi);
        }
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kQPer; ++k) x[k] = base + k < n ? load_as_float<DT>(w, base + k) : 0.0f;  // 0: no effect on max
  }
}

template <int DT>
__global__ void __launch_bounds__(kQThreads)
    quantize_nf4_kernel(uint8_t* __restrict__ packed, float* __restrict__ absmax, long long* __restrict__ status,
                        const void* __restrict__ w, int64_t n, int log2bs, bool vec) {
  __shared__ uint32_t s_max[kQThreads / 32];
  __shared__ __align__(256) float s_mid[16];  // nf4_code_search's midpoints: <= 15 words, conflict-free reads
  if (threadIdx.x < 15) s_mid[threadIdx.x] = nf4_mid(threadIdx.x);
  const uint32_t mid = (uint32_t)__cvta_generic_to_shared(s_mid);
  auto code_of = [&](float v) { return (uint8_t)nf4_code_search(v, mid, lds_f32); };
  const int64_t base = ((int64_t)blockIdx.x * kQThreads + threadIdx.x) * kQPer;
  float x[kQPer];
  load32<DT>(x, w, base, n, vec);

  uint32_t am = 0;
#pragma unroll
  for (int k = 0; k < kQPer; ++k) am = max(am, abs_bits(x[k]));
  if (is_nonfinite_bits(am)) {  // rare (past-the-end values load as 0): the caller raises with count and first index
    uint32_t bad = 0;           // bit k set when value k is inf/NaN
#pragma unroll
    for (int k = 0; k < kQPer; ++k) bad |= (uint32_t)is_nonfinite_bits(abs_bits(x[k])) << k;
    atomicAdd(reinterpret_cast<unsigned long long*>(status), (unsigned long long)__popc(bad));
    atomicMin(status + 1, (long long)(base + __ffs(bad) - 1));
  }

  // absmax of the block: shuffles inside a warp, shared memory across the warps of one block.
  const int group = 1 << (log2bs - 5);  // threads per block (uniform across the grid)
  am = warp_max(am, group < 32 ? group : 32);
  if (group > 32) {
    const int warp = threadIdx.x >> 5, wpg = group >> 5;
    if ((threadIdx.x & 31) == 0) s_max[warp] = am;
    __syncthreads();
    const int w0 = warp - warp % wpg;
    am = 0;
    for (int k = 0; k < wpg; ++k) am = max(am, s_max[w0 + k]);
  }
  __syncthreads();         // s_mid is filled
  if (base >= n) return;  // after every shuffle and barrier

  const int64_t bs = int64_t(1) << log2bs;
  const int64_t start = (base >> log2bs) << log2bs;
  const bool full = start + bs <= n;
  const float amax = f_from_bits(am);
  // Full blocks: raw absmax, multiply by its reciprocal. Partial last block: clamped absmax, true division.
  const float stored = full ? amax : clamp_tiny(amax);
  const float inv = f_rcp(clamp_tiny(amax));
  if (base == start) absmax[base >> log2bs] = stored;

  uint32_t words[4] = {0, 0, 0, 0};
  if (full) {  // uniform per block; the common case, fully unrolled
#pragma unroll
    for (int k = 0; k < kQPer; k += 2)
      words[k >> 3] |= (uint32_t)pack_pair(code_of(nf4_scale_full(x[k], inv)), code_of(nf4_scale_full(x[k + 1], inv)))
                       << (4 * (k & 7));
  } else {  // the partial last block: true division; past-the-end values are not stored, odd n pads code 7
#pragma unroll
    for (int k = 0; k < kQPer; k += 2) {
      const uint8_t c0 = code_of(nf4_scale_tail(x[k], stored));
      const uint8_t c1 = base + k + 1 < n ? code_of(nf4_scale_tail(x[k + 1], stored)) : kZeroCode;
      words[k >> 3] |= (uint32_t)pack_pair(c0, c1) << (4 * (k & 7));
    }
  }
  if (vec && base + kQPer <= n) {
    *reinterpret_cast<uint4*>(packed + (base >> 1)) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
#pragma unroll
    for (int j = 0; j < kQPer / 2; ++j)
      if (base + 2 * j < n) packed[(base >> 1) + j] = (uint8_t)(words[j >> 2] >> (8 * (j & 3)));
  }
}

// ============================================================================================ dequantize
// A warp owns tiles of 1024 values = 512 packed bytes, one 16-byte load per lane (lane l: values 32l..32l+31,
// a 32-value chunk with one scale: blocks hold >= 32 values and start at multiples of 32), and walks
// 1..kMaxTilesPerWarp tiles grid-stride, the next tile's loads issued before the current one is computed.
// Per tile, the packed load issues first; the scale's loads (code byte, nested absmax: both from the chunk
// index alone) issue beside it, and the dynamic map is read from shared memory, so one global latency, not
// three, precedes the stores. The 512 bytes pass through shared memory so that every warp store covers 512
// contiguous bytes (lane l stores unit 32k + l: 8 values for 16-bit outputs, 4 for float32); each unit takes
// its chunk's scale by a shuffle. The partial last tile and misaligned pointers take the per-chunk path.
// The double-quantized scale is rebuilt in place (map[code] * nested + offset): one pass, no scratch.
constexpr int kDThreads = 256;
constexpr int kDWarps = kDThreads / 32;
constexpr int kDPer = 32;                 // values per chunk (one lane, one 16-byte load)
constexpr int kDTile = 32 * kDPer;        // values per warp tile
constexpr int kMaxTilesPerWarp = 4;
static_assert(kDThreads == 256, "one thread per dynamic-map entry fills the shared copy");

template <bool NESTED>
__device__ __forceinline__ float chunk_scale(float raw, uint32_t code, const float* s_map, float off) {
  return NESTED ? rebuild_scale(s_map[code], raw, off) : raw;
}

// The scale loads of chunk c (values 32c..32c+31): code byte + nested absmax, or the float32 absmax. 32-bit
// indices: the launcher keeps n < 2^36, so chunks and blocks count below 2^31.
template <bool NESTED>
__device__ __forceinline__ void load_scale(float& raw, uint32_t& code, const void* absmax, const float* nested,
                                           uint32_t c, int log2bs) {
  const uint32_t b = c >> (log2bs - 5);
  if (NESTED) {
    code = __ldg(static_cast<const uint8_t*>(absmax) + b);
    raw = __ldg(nested + (b >> 8));  // kNestedBlock = 256
  } else {
    raw = __ldg(static_cast<const float*>(absmax) + b);
  }
}

// T[c] from the shared table at tab (256-byte aligned shared address) for the nibble index c * 4 held in
// byte j of x: one PRMT puts that byte under the table's upper address bytes, one LDS reads the entry.
__device__ __forceinline__ float tab_at(uint32_t tab, uint32_t x, int j) {
  return lds_f32(__byte_perm(x, tab, 0x7650u + j));
}

template <int DT, bool NESTED>
__global__ void __launch_bounds__(kDThreads, 2048 / kDThreads)  // <= 32 registers: 8 CTAs per SM
    dequantize_nf4_kernel(void* __restrict__ out, const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                          const float* __restrict__ nested, const float* __restrict__ offset,
                          const float* __restrict__ dmap, int64_t n, int log2bs, bool vec) {
  __shared__ __align__(256) float s_tab[16];  // 16 distinct words in 16 banks: lookups never conflict
  __shared__ float s_map[NESTED ? 256 : 1];
  __shared__ uint4 s_tile[kDWarps][32];  // one warp's 512 packed bytes, re-read as store units
  const uint32_t tab = (uint32_t)__cvta_generic_to_shared(s_tab);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t stride = gridDim.x * kDWarps;
  const uint32_t full = vec ? (uint32_t)(n / kDTile) : 0u;  // tiles on the fast path (n < 2^36)
  uint32_t t = blockIdx.x * kDWarps + warp;

  // First tile's loads before the tables are filled: they overlap the table fill and the barrier.
  uint4 q = make_uint4(0, 0, 0, 0);
  float raw = 0.0f;
  uint32_t code = 0;
  if (t < full) {
    q = __ldg(reinterpret_cast<const uint4*>(packed) + (t * 32 + lane));
    load_scale<NESTED>(raw, code, absmax, nested, t * 32 + lane, log2bs);
  }
  if (threadIdx.x < 16) s_tab[threadIdx.x] = nf4_value(threadIdx.x);
  if (NESTED) s_map[threadIdx.x] = __ldg(dmap + threadIdx.x);  // kDThreads == 256 entries
  const float off = NESTED ? __ldg(offset) : 0.0f;
  __syncthreads();

  const char* tile_bytes = reinterpret_cast<const char*>(s_tile[warp]);
  for (; t < full; t += stride) {
    // the next tile's loads first (at most kMaxTilesPerWarp per warp: this is the only load in flight else)
    const uint32_t tn = t + stride;
    uint4 qn = make_uint4(0, 0, 0, 0);
    float rawn = 0.0f;
    uint32_t coden = 0;
    if (tn < full) {
      qn = __ldg(reinterpret_cast<const uint4*>(packed) + (tn * 32 + lane));
      load_scale<NESTED>(rawn, coden, absmax, nested, tn * 32 + lane, log2bs);
    }
    const float scale = chunk_scale<NESTED>(raw, code, s_map, off);
    __syncwarp();  // the previous tile's reads of s_tile are done
    s_tile[warp][lane] = q;
    __syncwarp();
    if (DT == kFloat32) {
      float* o = static_cast<float*>(out) + (uint64_t)t * kDTile;
#pragma unroll
      for (int k = 0; k < 8; ++k) {  // unit 32k + lane: packed bytes 2u, 2u + 1 = values 4u..4u+3
        const int u = 32 * k + lane;
        const uint32_t h = *reinterpret_cast<const uint16_t*>(tile_bytes + 2 * u);
        const float sc = __shfl_sync(0xffffffffu, scale, 4 * k + (lane >> 3));
        const uint32_t hi = (h >> 2) & 0x3c3cu, lo = (h << 2) & 0x3c3cu;  // nibble indices * 4, per byte
        auto v = [&](uint32_t x, int j) { return nf4_dequant(tab_at(tab, x, j), sc); };
        *reinterpret_cast<float4*>(o + 4 * u) = make_float4(v(hi, 0), v(lo, 0), v(hi, 1), v(lo, 1));
      }
    } else {
      uint16_t* o = static_cast<uint16_t*>(out) + (uint64_t)t * kDTile;
      auto cast = [](float v) { return DT == kFloat16 ? float_to_half_bits(v) : float_to_bf16_bits(v); };
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // unit 32k + lane: packed bytes 4u..4u+3 = values 8u..8u+7
        const int u = 32 * k + lane;
        const uint32_t w = *reinterpret_cast<const uint32_t*>(tile_bytes + 4 * u);
        const float sc = __shfl_sync(0xffffffffu, scale, 8 * k + (lane >> 2));
        const uint32_t hi = (w >> 2) & 0x3c3c3c3cu, lo = (w << 2) & 0x3c3c3c3cu;
        auto v = [&](uint32_t x, int j) { return (uint32_t)cast(nf4_dequant(tab_at(tab, x, j), sc)); };
        uint32_t p[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) p[j] = v(hi, j) | (v(lo, j) << 16);
        *reinterpret_cast<uint4*>(o + 8 * u) = make_uint4(p[0], p[1], p[2], p[3]);
      }
    }
    q = qn, raw = rawn, code = coden;
  }

  // The rest: the partial last tile, or every tile when a pointer is misaligned. Lane l owns chunk 32t + l.
  const uint32_t ntiles = (uint32_t)((n + kDTile - 1) / kDTile);
  for (; t < ntiles; t += stride) {
    const int64_t base = (int64_t)(t * 32 + lane) * kDPer;
    if (base >= n) continue;
    float r = 0.0f;
    uint32_t cd = 0;
    load_scale<NESTED>(r, cd, absmax, nested, t * 32 + lane, log2bs);
    const float scale = chunk_scale<NESTED>(r, cd, s_map, off);
    const int64_t nbytes = (n + 1) >> 1;
    for (int k = 0; k < kDPer && base + k < n; k += 2) {
      const int64_t idx = (base >> 1) + (k >> 1);
      const uint8_t byte = idx < nbytes ? packed[idx] : 0;
      const float v0 = nf4_dequant(s_tab[unpack_first(byte)], scale);
      const float v1 = nf4_dequant(s_tab[unpack_second(byte)], scale);
      if (DT == kFloat32) {
        float* o = static_cast<float*>(out) + base + k;
        o[0] = v0;
        if (base + k + 1 < n) o[1] = v1;
      } else {
        auto cast = [](float v) { return DT == kFloat16 ? float_to_half_bits(v) : float_to_bf16_bits(v); };
        uint16_t* o = static_cast<uint16_t*>(out) + base + k;
        o[0] = cast(v0);
        if (base + k + 1 < n) o[1] = cast(v1);
      }
    }
  }
}

// ============================================================================================ double quantization
// One CTA of 256 threads per group of 256 scales (the nested block): absmax by shuffles + shared memory.
constexpr int kNThreads = kNestedBlock;

__global__ void __launch_bounds__(kNThreads)
    double_quantize_kernel(uint8_t* __restrict__ codes, float* __restrict__ nested, const float* __restrict__ absmax,
                           const float* __restrict__ offset, const uint8_t* __restrict__ lut, int64_t nblocks) {
  __shared__ uint32_t s_max[kNThreads / 32];
  const int64_t i = (int64_t)blockIdx.x * kNThreads + threadIdx.x;
  const float v = i < nblocks ? f_sub(__ldg(absmax + i), __ldg(offset)) : 0.0f;
  uint32_t am = warp_max(abs_bits(v), 32);
  if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = am;
  __syncthreads();
  am = 0;
#pragma unroll
  for (int k = 0; k < kNThreads / 32; ++k) am = max(am, s_max[k]);
  const float amax = f_from_bits(am);
  if (threadIdx.x == 0) nested[blockIdx.x] = amax;
  if (i < nblocks)
    codes[i] = amax == 0.0f ? (uint8_t)0 : __ldg(lut + lut_index(clamp_unit(f_mul(v, f_rcp(amax)))));
}

__global__ void double_dequantize_kernel(float* __restrict__ out, const uint8_t* __restrict__ codes,
                                         const float* __restrict__ nested, const float* __restrict__ offset,
                                         const float* __restrict__ dmap, int64_t nblocks) {
  const float off = __ldg(offset);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nblocks; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = rebuild_scale(__ldg(dmap + __ldg(codes + i)), __ldg(nested + i / kNestedBlock), off);
}

// ============================================================================================ pack / unpack
// A thread owns 16 packed bytes = 32 codes.
constexpr int kPThreads = 256;

__global__ void __launch_bounds__(kPThreads)
    pack_nf4_kernel(uint8_t* __restrict__ packed, const uint8_t* __restrict__ codes, int64_t n, bool vec) {
  const int64_t j0 = ((int64_t)blockIdx.x * kPThreads + threadIdx.x) * 16;  // first packed byte
  const int64_t nbytes = (n + 1) >> 1;
  if (j0 >= nbytes) return;
  if (vec && 2 * j0 + 32 <= n) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(codes + 2 * j0));
    const uint4 b = __ldg(reinterpret_cast<const uint4*>(codes + 2 * j0 + 16));
    const uint32_t in[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    uint32_t o[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t pair = in[(4 * m + j) >> 1] >> (16 * (j & 1));  // codes 2j, 2j+1 in the low 16 bits
        word |= (uint32_t)pack_pair((uint8_t)(pair & 0xffu), (uint8_t)((pair >> 8) & 0xffu)) << (8 * j);
      }
      o[m] = word;
    }
    *reinterpret_cast<uint4*>(packed + j0) = make_uint4(o[0], o[1], o[2], o[3]);
  } else {
    for (int64_t j = j0; j < j0 + 16 && j < nbytes; ++j)
      packed[j] = pack_pair(codes[2 * j], 2 * j + 1 < n ? codes[2 * j + 1] : kZeroCode);
  }
}

__global__ void __launch_bounds__(kPThreads)
    unpack_nf4_kernel(uint8_t* __restrict__ codes, const uint8_t* __restrict__ packed, int64_t n, bool vec) {
  const int64_t j0 = ((int64_t)blockIdx.x * kPThreads + threadIdx.x) * 16;
  const int64_t nbytes = (n + 1) >> 1;
  if (j0 >= nbytes) return;
  if (vec && 2 * j0 + 32 <= n) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(packed + j0));
    const uint32_t in[4] = {v.x, v.y, v.z, v.w};
    uint32_t o[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) {  // output word m = codes of packed bytes 2m, 2m + 1
      const uint32_t b0 = (in[m >> 1] >> (16 * (m & 1))) & 0xffu, b1 = (in[m >> 1] >> (16 * (m & 1) + 8)) & 0xffu;
      o[m] = (uint32_t)unpack_first((uint8_t)b0) | ((uint32_t)unpack_second((uint8_t)b0) << 8) |
             ((uint32_t)unpack_first((uint8_t)b1) << 16) | ((uint32_t)unpack_second((uint8_t)b1) << 24);
    }
    *reinterpret_cast<uint4*>(codes + 2 * j0) = make_uint4(o[0], o[1], o[2], o[3]);
    *reinterpret_cast<uint4*>(codes + 2 * j0 + 16) = make_uint4(o[4], o[5], o[6], o[7]);
  } else {
    for (int64_t j = j0; j < j0 + 16 && j < nbytes; ++j) {
      codes[2 * j] = unpack_first(packed[j]);
      if (2 * j + 1 < n) codes[2 * j + 1] = unpack_second(packed[j]);
    }
  }
}

// SMs of the current device (the caller made the tensor's device current), cached per device.
inline int sm_count() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return 132;
  }
  if (cache[dev] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) {
      cudaGetLastError();
      v = 132;
    }
    cache[dev] = v;
  }
  return cache[dev];
}

inline unsigned grid_for(int64_t items, int64_t per_cta) {
  const int64_t ctas = (items + per_cta - 1) / per_cta;
  if (ctas > INT32_MAX)  // 2^31 CTAs of >= 4096 values: far beyond any GPU's memory
    throw std::invalid_argument("n is too large for one launch: " + std::to_string(items));
  return (unsigned)ctas;
}

}  // namespace

// ============================================================================================ entry points
void quantize_nf4_cuda(uintptr_t packed, uintptr_t absmax, uintptr_t status, uintptr_t w, int64_t n, int64_t blocksize,
                       int64_t dtype, uintptr_t stream) {
  check_n(n);
  check_blocksize(blocksize);
  check_dtype(dtype, "dtype");
  check_ptr(packed, n, "packed");
  check_ptr(absmax, n, "absmax");
  check_ptr(status, n, "status");
  check_ptr(w, n, "w");
  if (n == 0) return;
  const bool vec = aligned16(w) && aligned16(packed);
  const unsigned grid = grid_for(n, int64_t(kQThreads) * kQPer);
  auto* p = reinterpret_cast<uint8_t*>(packed);
  auto* a = reinterpret_cast<float*>(absmax);
  auto* s = reinterpret_cast<long long*>(status);
  const void* x = reinterpret_cast<const void*>(w);
  const int lb = log2i(blocksize);
  switch (dtype) {
    case kFloat32: quantize_nf4_kernel<kFloat32><<<grid, kQThreads, 0, as_stream(stream)>>>(p, a, s, x, n, lb, vec); break;
    case kFloat16: quantize_nf4_kernel<kFloat16><<<grid, kQThreads, 0, as_stream(stream)>>>(p, a, s, x, n, lb, vec); break;
    default: quantize_nf4_kernel<kBFloat16><<<grid, kQThreads, 0, as_stream(stream)>>>(p, a, s, x, n, lb, vec); break;
  }
  check_launch("quantize_nf4");
}

void dequantize_nf4_cuda(uintptr_t out, uintptr_t packed, uintptr_t absmax, uintptr_t nested_absmax, uintptr_t offset,
                         uintptr_t dynamic_map, int64_t n, int64_t blocksize, int64_t out_dtype, uintptr_t stream) {
  check_n(n);
  check_blocksize(blocksize);
  check_dtype(out_dtype, "out_dtype");
  check_ptr(out, n, "out");
  check_ptr(packed, n, "packed");
  check_ptr(absmax, n, "absmax");
  if (nested_absmax != 0) {
    check_ptr(offset, n, "offset");
    check_ptr(dynamic_map, n, "dynamic_map");
  }
  if (n == 0) return;
  if (n >= (int64_t(1) << 36))  // the kernel counts chunks in 32 bits; 2^36 values outgrow any GPU's memory
    throw std::invalid_argument("n is too large for one launch: " + std::to_string(n));
  const bool vec = aligned16(out) && aligned16(packed);
  // Enough CTAs for one full wave (8 resident per SM), then 2..kMaxTilesPerWarp tiles per warp.
  const int64_t ctas = (n + int64_t(kDThreads) * kDPer - 1) / (int64_t(kDThreads) * kDPer);
  const int64_t wave = int64_t(sm_count()) * (2048 / kDThreads);
  const int64_t per = std::min<int64_t>(kMaxTilesPerWarp, std::max<int64_t>(1, (ctas + wave - 1) / wave));
  const unsigned grid = grid_for(ctas, per);
  const cudaStream_t st = as_stream(stream);
  void* o = reinterpret_cast<void*>(out);
  const auto* p = reinterpret_cast<const uint8_t*>(packed);
  const void* a = reinterpret_cast<const void*>(absmax);
  const auto* ne = reinterpret_cast<const float*>(nested_absmax);
  const auto* of = reinterpret_cast<const float*>(offset);
  const auto* m = reinterpret_cast<const float*>(dynamic_map);
  const int lb = log2i(blocksize);
#define QK_DEQ(DT, NESTED) dequantize_nf4_kernel<DT, NESTED><<<grid, kDThreads, 0, st>>>(o, p, a, ne, of, m, n, lb, vec)
  if (nested_absmax != 0) {
    switch (out_dtype) {
      case kFloat32: QK_DEQ(kFloat32, true); break;
      case kFloat16: QK_DEQ(kFloat16, true); break;
      default: QK_DEQ(kBFloat16, true); break;
    }
  } else {
    switch (out_dtype) {
      case kFloat32: QK_DEQ(kFloat32, false); break;
      case kFloat16: QK_DEQ(kFloat16, false); break;
      default: QK_DEQ(kBFloat16, false); break;
    }
  }
#undef QK_DEQ
  check_launch("dequantize_nf4");
}

void double_quantize_cuda(uintptr_t codes, uintptr_t nested_absmax, uintptr_t absmax, uintptr_t offset, uintptr_t lut,
                          int64_t nblocks, uintptr_t stream) {
  check_n(nblocks, "nblocks");
  check_ptr(codes, nblocks, "codes");
  check_ptr(nested_absmax, nblocks, "nested_absmax");
  check_ptr(absmax, nblocks, "absmax");
  check_ptr(offset, nblocks, "offset");
  check_ptr(lut, nblocks, "lut");
  if (nblocks == 0) return;
  double_quantize_kernel<<<grid_for(nblocks, kNThreads), kNThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<uint8_t*>(codes), reinterpret_cast<float*>(nested_absmax),
      reinterpret_cast<const float*>(absmax), reinterpret_cast<const float*>(offset),
      reinterpret_cast<const uint8_t*>(lut), nblocks);
  check_launch("double_quantize");
}

void double_dequantize_cuda(uintptr_t absmax_out, uintptr_t codes, uintptr_t nested_absmax, uintptr_t offset,
                            uintptr_t dynamic_map, int64_t nblocks, uintptr_t stream) {
  check_n(nblocks, "nblocks");
  check_ptr(absmax_out, nblocks, "absmax_out");
  check_ptr(codes, nblocks, "codes");
  check_ptr(nested_absmax, nblocks, "nested_absmax");
  check_ptr(offset, nblocks, "offset");
  check_ptr(dynamic_map, nblocks, "dynamic_map");
  if (nblocks == 0) return;
  const int64_t ctas = std::min<int64_t>((nblocks + 255) / 256, 65535);  // grid-stride beyond this
  double_dequantize_kernel<<<(unsigned)ctas, 256, 0, as_stream(stream)>>>(
      reinterpret_cast<float*>(absmax_out), reinterpret_cast<const uint8_t*>(codes),
      reinterpret_cast<const float*>(nested_absmax), reinterpret_cast<const float*>(offset),
      reinterpret_cast<const float*>(dynamic_map), nblocks);
  check_launch("double_dequantize");
}

void pack_nf4_cuda(uintptr_t packed, uintptr_t codes, int64_t n, uintptr_t stream) {
  check_n(n);
  check_ptr(packed, n, "packed");
  check_ptr(codes, n, "codes");
  if (n == 0) return;
  const bool vec = aligned16(packed) && aligned16(codes);
  pack_nf4_kernel<<<grid_for((n + 1) / 2, int64_t(kPThreads) * 16), kPThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<uint8_t*>(packed), reinterpret_cast<const uint8_t*>(codes), n, vec);
  check_launch("pack_nf4");
}

void unpack_nf4_cuda(uintptr_t codes, uintptr_t packed, int64_t n, uintptr_t stream) {
  check_n(n);
  check_ptr(codes, n, "codes");
  check_ptr(packed, n, "packed");
  if (n == 0) return;
  const bool vec = aligned16(packed) && aligned16(codes);
  unpack_nf4_kernel<<<grid_for((n + 1) / 2, int64_t(kPThreads) * 16), kPThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<uint8_t*>(codes), reinterpret_cast<const uint8_t*>(packed), n, vec);
  check_launch("unpack_nf4");
}

bool has_cuda() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error: no driver or no device is not a failure here
    return 0;
  }
  return count;
}

std::string cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace qk
