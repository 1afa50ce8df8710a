// CUDA kernels of the fused AdamW steps. Same arguments as the CPU entry points, with the cudaStream_t last.
//
// Per call, three launches on the stream, no host synchronization:
//   grad_scan_kernel    sets *flag when the gradient holds NaN, inf or |g| >= 2^63;
//   adamw8bit_kernel /  every thread reads *flag (skip) and *step (t = step + 1) from device memory; one warp
//   adamw32bit_kernel   per 256-value state block: dequantize, update in float32, store the parameter, warp
//                       max of the new states' |x|, requantize (bucket table through the read-only cache);
//   finish_step_kernel  step += 1, or skipped += 1 and *flag = 0.
// Arithmetic through optim_format.h (__f*_rn / __d*_rn, --fmad=false): the CPU kernels' bits exactly.
// Global memory in 16-byte accesses where the pointers allow (checked on the host: 16-byte aligned parameter and
// gradient, 8-byte aligned codes / 16-byte aligned float32 states): in the 8-bit kernel lane l owns values
// 8l..8l+7 of its block (two float4 or one uint4 of parameter, one uint2 of codes); the 32-bit kernel takes 4
// consecutive values per thread. A partial last block, the 32-bit kernel's tail and unaligned tensors go
// element by element through the same per-element functions, so both ways give the same bits.
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

// ---- vector access: N consecutive values of dtype DT at element i (16 bytes per access) --------------------
template <int DT, int N>
__device__ __forceinline__ void load_vec(const void* base, int64_t i, float (&out)[N]) {
  if constexpr (DT == kFloat32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
#pragma unroll
    for (int h = 0; h < N / 4; ++h) {
      const float4 f = q[h];
      out[4 * h] = f.x, out[4 * h + 1] = f.y, out[4 * h + 2] = f.z, out[4 * h + 3] = f.w;
    }
  } else {
    uint32_t w[N / 2];
    if constexpr (N == 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + i);
      w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    } else {
      static_assert(N == 4, "4 or 8 values");
      const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + i);
      w[0] = u.x, w[1] = u.y;
    }
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      out[2 * k] = float_from_bits16<DT>((uint16_t)(w[k] & 0xffffu));
      out[2 * k + 1] = float_from_bits16<DT>((uint16_t)(w[k] >> 16));
    }
  }
}
template <int DT, int N>
__device__ __forceinline__ void store_vec(void* base, int64_t i, const float (&in)[N]) {
  if constexpr (DT == kFloat32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
#pragma unroll
    for (int h = 0; h < N / 4; ++h) q[h] = make_float4(in[4 * h], in[4 * h + 1], in[4 * h + 2], in[4 * h + 3]);
  } else {
    uint32_t w[N / 2];
#pragma unroll
    for (int k = 0; k < N / 2; ++k)
      w[k] = (uint32_t)bits16_from_float<DT>(in[2 * k]) | ((uint32_t)bits16_from_float<DT>(in[2 * k + 1]) << 16);
    if constexpr (N == 8)
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i) = make_uint4(w[0], w[1], w[2], w[3]);
    else
      *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + i) = make_uint2(w[0], w[1]);
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
    adamw8bit_kernel(void* __restrict__ p, const void* __restrict__ g, uint8_t* __restrict__ c1,
                     uint8_t* __restrict__ c2, float* __restrict__ a1, float* __restrict__ a2,
                     const long long* __restrict__ step, const int* __restrict__ flag, const int32_t* __restrict__ tab,
                     int64_t n, Hyper h, bool vec) {
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
  const int64_t first = start + lane * kPerLane;
  const bool full = vec && start + kOptBlock <= n;  // warp-uniform
  const float am1 = a1[b], am2 = a2[b];
  float m[kPerLane], v[kPerLane];
  uint32_t mx1 = 0, mx2 = 0;
  if (full) {
    const uint2 q1 = *reinterpret_cast<const uint2*>(c1 + first), q2 = *reinterpret_cast<const uint2*>(c2 + first);
    float pv[kPerLane], gv[kPerLane];
    load_vec<DT>(p, first, pv);
    load_vec<DT>(g, first, gv);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const uint32_t w1 = k < 4 ? q1.x : q1.y, w2 = k < 4 ? q2.x : q2.y;
      m[k] = state_value(s_map1[(w1 >> (8 * (k & 3))) & 0xffu], am1);
      v[k] = state_value(s_map2[(w2 >> (8 * (k & 3))) & 0xffu], am2);
      adamw8_update(pv[k], gv[k], m[k], v[k], s);
      mx1 = max(mx1, abs_bits(m[k]));
      mx2 = max(mx2, abs_bits(v[k]));
    }
    store_vec<DT>(p, first, pv);
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = first + k;
      m[k] = 0.0f;
      v[k] = 0.0f;
      if (i < n) {
        m[k] = state_value(s_map1[c1[i]], am1);
        v[k] = state_value(s_map2[c2[i]], am2);
        float pv = load_as_float<DT>(p, i);
        adamw8_update(pv, load_as_float<DT>(g, i), m[k], v[k], s);
        store_from_float<DT>(p, i, pv);
        mx1 = max(mx1, abs_bits(m[k]));
        mx2 = max(mx2, abs_bits(v[k]));
      }
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
  uint8_t o1[kPerLane], o2[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float s1 = f_mul(m[k], inv1);
    const int32_t b1 = __ldg(base1 + bucket_of(s1));
    o1[k] = state_code(s1, b1, s_mid1[b1]);
    const float s2 = f_mul(v[k], inv2);
    const int32_t b2 = __ldg(base2 + bucket_of(s2));
    o2[k] = state_code(s2, b2, s_mid2[b2]);
  }
  if (full) {
    auto pack = [](const uint8_t* o, int h) {
      return (uint32_t)o[4 * h] | ((uint32_t)o[4 * h + 1] << 8) | ((uint32_t)o[4 * h + 2] << 16) |
             ((uint32_t)o[4 * h + 3] << 24);
    };
    *reinterpret_cast<uint2*>(c1 + first) = make_uint2(pack(o1, 0), pack(o1, 1));
    *reinterpret_cast<uint2*>(c2 + first) = make_uint2(pack(o2, 0), pack(o2, 1));
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = first + k;
      if (i < n) {
        c1[i] = o1[k];
        c2[i] = o2[k];
      }
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
    adamw32bit_kernel(void* __restrict__ p, const void* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                      const long long* __restrict__ step, const int* __restrict__ flag, int64_t n, Hyper h, bool vec) {
  if (*flag) return;
  const AdamScalars s = adam_scalars(*step + 1, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  int64_t done = 0;
  if (vec) {  // 4 values per thread and access (float4 states)
    const int64_t n4 = n / 4;
    for (int64_t q = tid; q < n4; q += stride) {
      float pv[4], gv[4];
      load_vec<DT>(p, 4 * q, pv);
      load_vec<DT>(g, 4 * q, gv);
      float4 mv = reinterpret_cast<const float4*>(m)[q], vv = reinterpret_cast<const float4*>(v)[q];
      adamw_update(pv[0], gv[0], mv.x, vv.x, s);
      adamw_update(pv[1], gv[1], mv.y, vv.y, s);
      adamw_update(pv[2], gv[2], mv.z, vv.z, s);
      adamw_update(pv[3], gv[3], mv.w, vv.w, s);
      reinterpret_cast<float4*>(m)[q] = mv;
      reinterpret_cast<float4*>(v)[q] = vv;
      store_vec<DT>(p, 4 * q, pv);
    }
    done = 4 * n4;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
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

bool aligned(uintptr_t ptr, int bytes) { return ptr % (uintptr_t)bytes == 0; }

// The launch structure both steps share: gradient scan, the update kernel (update(dtype constant) launches it),
// finish kernel. Everything stream-ordered, nothing synchronizes the host.
template <class Update>
void launch_step(const char* what, int64_t n, int64_t dtype, uintptr_t grad, uintptr_t step, uintptr_t skipped,
                 uintptr_t flag, cudaStream_t st, Update&& update) {
  auto* flag_p = reinterpret_cast<int*>(flag);
  by_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (n > 0) {
      grad_scan_kernel<DT><<<grid_for(n, kThreads * 8), kThreads, 0, st>>>(flag_p, reinterpret_cast<const void*>(grad), n);
      check_launch("grad_scan_kernel");
      update(dt);
      check_launch(what);
    }
  });
  finish_step_kernel<<<1, 1, 0, st>>>(reinterpret_cast<long long*>(step), reinterpret_cast<long long*>(skipped), flag_p);
  check_launch("finish_step_kernel");
}

}  // namespace

void adamw8bit_step_cuda(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                         uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                         int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps,
                         double weight_decay, uintptr_t stream) {
  check_adamw8bit_args(param, grad, state1, state2, absmax1, absmax2, step, skipped, flag, table, n, dtype, lr, beta1,
                       beta2, eps, weight_decay);
  const Hyper h{lr, beta1, beta2, eps, weight_decay};
  const bool vec = aligned(param, 16) && aligned(grad, 16) && aligned(state1, 8) && aligned(state2, 8);
  const cudaStream_t st = as_stream(stream);
  launch_step("adamw8bit_kernel", n, dtype, grad, step, skipped, flag, st, [&](auto dt) {
    const int64_t nb = (n + kOptBlock - 1) / kOptBlock;
    const unsigned grid = (unsigned)((nb + kThreads / 32 - 1) / (kThreads / 32));
    adamw8bit_kernel<decltype(dt)::value><<<grid, kThreads, 0, st>>>(
        reinterpret_cast<void*>(param), reinterpret_cast<const void*>(grad), reinterpret_cast<uint8_t*>(state1),
        reinterpret_cast<uint8_t*>(state2), reinterpret_cast<float*>(absmax1), reinterpret_cast<float*>(absmax2),
        reinterpret_cast<const long long*>(step), reinterpret_cast<const int*>(flag),
        reinterpret_cast<const int32_t*>(table), n, h, vec);
  });
}

void adamw32bit_step_cuda(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                          uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                          double beta2, double eps, double weight_decay, uintptr_t stream) {
  check_adamw32bit_args(param, grad, exp_avg, exp_avg_sq, step, skipped, flag, n, dtype, lr, beta1, beta2, eps,
                        weight_decay);
  const Hyper h{lr, beta1, beta2, eps, weight_decay};
  const int pbytes = dtype == kFloat32 ? 16 : 8;  // 4 values of the parameter dtype
  const bool vec = aligned(param, pbytes) && aligned(grad, pbytes) && aligned(exp_avg, 16) && aligned(exp_avg_sq, 16);
  const cudaStream_t st = as_stream(stream);
  launch_step("adamw32bit_kernel", n, dtype, grad, step, skipped, flag, st, [&](auto dt) {
    adamw32bit_kernel<decltype(dt)::value><<<grid_for(n, kThreads * 4), kThreads, 0, st>>>(
        reinterpret_cast<void*>(param), reinterpret_cast<const void*>(grad), reinterpret_cast<float*>(exp_avg),
        reinterpret_cast<float*>(exp_avg_sq), reinterpret_cast<const long long*>(step),
        reinterpret_cast<const int*>(flag), n, h, vec);
  });
}

void adamw8bit_steps_cuda(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                          const std::vector<uintptr_t>& state1, const std::vector<uintptr_t>& state2,
                          const std::vector<uintptr_t>& absmax1, const std::vector<uintptr_t>& absmax2,
                          const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                          const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                          uintptr_t table, double lr, double beta1, double beta2, double eps, double weight_decay,
                          uintptr_t stream) {
  check_adamw8bit_lists(param, grad, state1, state2, absmax1, absmax2, step, skipped, n, dtype, flag, table, lr, beta1,
                        beta2, eps, weight_decay);
  for (size_t t = 0; t < param.size(); ++t)
    adamw8bit_step_cuda(param[t], grad[t], state1[t], state2[t], absmax1[t], absmax2[t], step[t], skipped[t], flag,
                        table, n[t], dtype[t], lr, beta1, beta2, eps, weight_decay, stream);
}

void adamw32bit_steps_cuda(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                           const std::vector<uintptr_t>& exp_avg, const std::vector<uintptr_t>& exp_avg_sq,
                           const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                           const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag, double lr,
                           double beta1, double beta2, double eps, double weight_decay, uintptr_t stream) {
  check_adamw32bit_lists(param, grad, exp_avg, exp_avg_sq, step, skipped, n, dtype, flag, lr, beta1, beta2, eps,
                         weight_decay);
  for (size_t t = 0; t < param.size(); ++t)
    adamw32bit_step_cuda(param[t], grad[t], exp_avg[t], exp_avg_sq[t], step[t], skipped[t], flag, n[t], dtype[t], lr,
                         beta1, beta2, eps, weight_decay, stream);
}

}  // namespace qk
