// The *_cuda entry points of a build without CUDA: they exist (the module's surface does not depend on the
// build) and raise RuntimeError, so a caller learns why instead of hitting a missing attribute.
#include <stdexcept>

#include "nf4_kernels.h"

namespace qk {
namespace {
[[noreturn]] void no_cuda() { throw std::runtime_error("qlora_kernels was built without CUDA"); }
}  // namespace

void quantize_nf4_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, int64_t, uintptr_t) { no_cuda(); }
void dequantize_nf4_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, int64_t,
                         uintptr_t) {
  no_cuda();
}
void double_quantize_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, uintptr_t) { no_cuda(); }
void double_dequantize_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, uintptr_t) { no_cuda(); }
void pack_nf4_cuda(uintptr_t, uintptr_t, int64_t, uintptr_t) { no_cuda(); }
void unpack_nf4_cuda(uintptr_t, uintptr_t, int64_t, uintptr_t) { no_cuda(); }

bool nf4_decode_cuda_supported(int64_t, int64_t, int64_t, int64_t, int64_t) { return false; }
bool nf4_decode_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                     uintptr_t, uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                     int64_t, double, int64_t, int64_t, int64_t, uintptr_t) {
  no_cuda();
}

bool has_cuda() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_runtime_version() { return ""; }

}  // namespace qk
