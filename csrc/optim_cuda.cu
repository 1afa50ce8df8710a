// CUDA kernels of the fused AdamW steps. Same arguments as the CPU entry points, with the cudaStream_t last.
//
// Per call, three launches on the stream, no host synchronization:
//   grad_scan_kernel    sets *flag when the gradient holds NaN, inf or |g| >= 2^63;
//   adamw8bit_kernel /  every thread reads *flag (skip) and *step (t = step + 1) from device memory; one warp
//   adamw32bit_kernel   per 256-value state block: dequantize, update in float32, store the parameter, warp
//                       max of the new states' |x|, requantize (bucket table through the read-only cache);
//   finish_step_kernel  step += 1, or skipped += 1 and *flag = 0.
// Arithmetic through optim_format.h (__f*_rn / __d*_rn, --fmad=false): the CPU kernels' bits exactly.
// Loads and stores are per element (coalesced across the warp: lane l owns values 8l..8l+7 of the block);
// vectorized 16-byte accesses are left for when a GPU can measure them.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_launch.h"
#include "nf4_kernels.h"
#include "optim_format.h"
#include "optim_kernels.h"

namespace qk {
namespace {


constexpr int kThreads = 256;
constexpr int kPerLane = kOptBlock / 32;  // 8 values per lane, one 256-value block per warp

template <int DT>
__global__ void __launch_bounds__(kThreads) grad_scan_kernel(int* __restrict__ flag, const void* __restrict__ g,
                                                             int64_t n) {
  uint32_t worst = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    worst = max(worst, abs_bits(load_as_float<DT>(g, i)));
  if (__any_sync(0xffffffffu, worst >= kGradLimitBits) && (threadIdx.x & 31) == 0) atomicOr(flag, 1);
}

__global__ void finish_step_kernel(long long* step, long long* skipped, int* flag) {
  if (*flag) {
    *skipped += 1;
    *flag = 0;
  } else {
    *step += 1;
  }
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
};

template <int DT>
__global__ void __launch_bounds__(kThreads)
    adamw8bit_kernel(void* __restrict__ p, const void* __restrict__ g, uint8_t* __restrict__ c1,
                     uint8_t* __restrict__ c2, float* __restrict__ a1, float* __restrict__ a2,
                     const long long* __restrict__ step, const int* __restrict__ flag, const int32_t* __restrict__ tab,
                     int64_t n, Hyper h) {
  __shared__ float s_map1[256], s_map2[256], s_mid1[256], s_mid2[256];
  if (*flag) return;  // uniform across the grid: the whole tensor skips this step
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    s_map1[i] = __int_as_float(__ldg(tab + kMapOffset + i));
    s_mid1[i] = __int_as_float(__ldg(tab + kMidOffset + i));
    s_map2[i] = __int_as_float(__ldg(tab + kTableStride + kMapOffset + i));
    s_mid2[i] = __int_as_float(__ldg(tab + kTableStride + kMidOffset + i));
  }
  __syncthreads();
  const AdamScalars s = adam_scalars(*step + 1, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
  const int64_t b = (int64_t)blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  const int64_t start = b * kOptBlock;
  if (start >= n) return;  // after the only __syncthreads; warp-uniform
  const int lane = threadIdx.x & 31;
  const float am1 = a1[b], am2 = a2[b];
  float m[kPerLane], v[kPerLane];
  uint32_t mx1 = 0, mx2 = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = start + lane * kPerLane + k;
    m[k] = 0.0f;
    v[k] = 0.0f;
    if (i < n) {
      m[k] = state_value(s_map1[c1[i]], am1);
      v[k] = state_value(s_map2[c2[i]], am2);
      float pv = load_as_float<DT>(p, i);
      adamw_update(pv, load_as_float<DT>(g, i), m[k], v[k], s);
      store_from_float<DT>(p, i, pv);
      mx1 = max(mx1, abs_bits(m[k]));
      mx2 = max(mx2, abs_bits(v[k]));
    }
  }
  mx1 = warp_max_u32(mx1);
  mx2 = warp_max_u32(mx2);
  const float new1 = f_from_bits(mx1), new2 = f_from_bits(mx2);
  if (lane == 0) {
    a1[b] = new1;
    a2[b] = new2;
  }
  const float inv1 = state_inv_scale(new1), inv2 = state_inv_scale(new2);
  const int32_t* base1 = tab + kBaseOffset;
  const int32_t* base2 = tab + kTableStride + kBaseOffset;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = start + lane * kPerLane + k;
    if (i < n) {
      const float s1 = f_mul(m[k], inv1);
      const int32_t b1 = __ldg(base1 + bucket_of(s1));
      c1[i] = state_code(s1, b1, s_mid1[b1]);
      const float s2 = f_mul(v[k], inv2);
      const int32_t b2 = __ldg(base2 + bucket_of(s2));
      c2[i] = state_code(s2, b2, s_mid2[b2]);
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
    adamw32bit_kernel(void* __restrict__ p, const void* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                      const long long* __restrict__ step, const int* __restrict__ flag, int64_t n, Hyper h) {
  if (*flag) return;
  const AdamScalars s = adam_scalars(*step + 1, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float pv = load_as_float<DT>(p, i);
    float mv = m[i], vv = v[i];
    adamw_update(pv, load_as_float<DT>(g, i), mv, vv, s);
    m[i] = mv;
    v[i] = vv;
    store_from_float<DT>(p, i, pv);
  }
}


unsigned grid_for(int64_t n, int64_t per_cta) {
  const int64_t blocks = (n + per_cta - 1) / per_cta;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20));
}

}  // namespace

void adamw8bit_step_cuda(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                         uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                         int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps,
                         double weight_decay, uintptr_t stream) {
  check_adamw8bit_args(param, grad, state1, state2, absmax1, absmax2, step, skipped, flag, table, n, dtype, lr, beta1,
                       beta2, eps, weight_decay);
  const cudaStream_t st = as_stream(stream);
  auto* flag_p = reinterpret_cast<int*>(flag);
  const Hyper h{lr, beta1, beta2, eps, weight_decay};
  by_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (n > 0) {
      grad_scan_kernel<DT><<<grid_for(n, kThreads * 8), kThreads, 0, st>>>(flag_p, reinterpret_cast<const void*>(grad), n);
      check_launch("grad_scan_kernel");
      const int64_t nb = (n + kOptBlock - 1) / kOptBlock;
      const unsigned grid = (unsigned)((nb + kThreads / 32 - 1) / (kThreads / 32));
      adamw8bit_kernel<DT><<<grid, kThreads, 0, st>>>(
          reinterpret_cast<void*>(param), reinterpret_cast<const void*>(grad), reinterpret_cast<uint8_t*>(state1),
          reinterpret_cast<uint8_t*>(state2), reinterpret_cast<float*>(absmax1), reinterpret_cast<float*>(absmax2),
          reinterpret_cast<const long long*>(step), flag_p, reinterpret_cast<const int32_t*>(table), n, h);
      check_launch("adamw8bit_kernel");
    }
  });
  finish_step_kernel<<<1, 1, 0, st>>>(reinterpret_cast<long long*>(step), reinterpret_cast<long long*>(skipped), flag_p);
  check_launch("finish_step_kernel");
}

void adamw32bit_step_cuda(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                          uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                          double beta2, double eps, double weight_decay, uintptr_t stream) {
  check_adamw32bit_args(param, grad, exp_avg, exp_avg_sq, step, skipped, flag, n, dtype, lr, beta1, beta2, eps,
                        weight_decay);
  const cudaStream_t st = as_stream(stream);
  auto* flag_p = reinterpret_cast<int*>(flag);
  const Hyper h{lr, beta1, beta2, eps, weight_decay};
  by_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (n > 0) {
      grad_scan_kernel<DT><<<grid_for(n, kThreads * 8), kThreads, 0, st>>>(flag_p, reinterpret_cast<const void*>(grad), n);
      check_launch("grad_scan_kernel");
      adamw32bit_kernel<DT><<<grid_for(n, kThreads * 4), kThreads, 0, st>>>(
          reinterpret_cast<void*>(param), reinterpret_cast<const void*>(grad), reinterpret_cast<float*>(exp_avg),
          reinterpret_cast<float*>(exp_avg_sq), reinterpret_cast<const long long*>(step), flag_p, n, h);
      check_launch("adamw32bit_kernel");
    }
  });
  finish_step_kernel<<<1, 1, 0, st>>>(reinterpret_cast<long long*>(step), reinterpret_cast<long long*>(skipped), flag_p);
  check_launch("finish_step_kernel");
}

}  // namespace qk
