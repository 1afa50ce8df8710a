// CUDA managed (unified) memory for paged optimizer states: allocation, free, prefetch on a stream, and the
// device/pointer queries the Python side uses to decide (and tests use to check) where states live. Host code
// over the CUDA runtime API; nothing here runs without a driver unless asked to.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "optim_kernels.h"

namespace qk {
namespace {
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("qlora_kernels: ") + what + ": " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}
}  // namespace

uintptr_t cuda_managed_alloc(int64_t nbytes, int device) {
  int prev = 0;
  check(cudaGetDevice(&prev), "cudaGetDevice");
  check(cudaSetDevice(device), "cudaSetDevice");
  void* p = nullptr;
  const cudaError_t e = cudaMallocManaged(&p, (size_t)nbytes, cudaMemAttachGlobal);
  if (e == cudaSuccess) {
    // Zero-fill on the device (a fresh optimizer's states are zeros); synchronous, once per state tensor.
    const cudaError_t z = cudaMemset(p, 0, (size_t)nbytes);
    if (z != cudaSuccess) {
      cudaFree(p);
      cudaSetDevice(prev);
      check(z, "cudaMemset of managed memory");
    }
  }
  cudaSetDevice(prev);
  check(e, "cudaMallocManaged");
  return reinterpret_cast<uintptr_t>(p);
}

void cuda_managed_free(uintptr_t ptr) {
  // Called from torch's storage deleter: must not throw. cudaFree waits for work using the memory.
  if (ptr) cudaFree(reinterpret_cast<void*>(ptr));
}

void cuda_managed_prefetch(uintptr_t ptr, int64_t nbytes, int device, uintptr_t stream) {
  if (ptr == 0 || nbytes <= 0) return;
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = cudaMemLocationTypeDevice;
  loc.id = device;
  check(cudaMemPrefetchAsync(reinterpret_cast<void*>(ptr), (size_t)nbytes, loc, 0,
                             reinterpret_cast<cudaStream_t>(stream)),
        "cudaMemPrefetchAsync");
#else
  check(cudaMemPrefetchAsync(reinterpret_cast<void*>(ptr), (size_t)nbytes, device,
                             reinterpret_cast<cudaStream_t>(stream)),
        "cudaMemPrefetchAsync");
#endif
}

bool cuda_concurrent_managed_access(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();  // clear the sticky-free error a missing driver leaves
    return false;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return value != 0;
}

std::string cuda_pointer_type(uintptr_t ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr)) != cudaSuccess) {
    cudaGetLastError();
    return "unregistered";
  }
  switch (attr.type) {
    case cudaMemoryTypeManaged: return "managed";
    case cudaMemoryTypeDevice: return "device";
    case cudaMemoryTypeHost: return "host";
    default: return "unregistered";
  }
}

}  // namespace qk
