// Host-side helpers every CUDA launcher shares (nf4_cuda.cu, optim_cuda.cu): launch errors surface as Python
// exceptions (pybind11 maps std::runtime_error), never as silence; streams arrive as integers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qk {

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("qlora_kernels: CUDA error in ") + what + ": " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace qk
