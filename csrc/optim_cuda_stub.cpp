// The optimizer and managed-memory *_cuda entry points of a build without CUDA: they raise RuntimeError.
#include <stdexcept>

#include "optim_kernels.h"

namespace qk {
namespace {
[[noreturn]] void no_cuda() { throw std::runtime_error("qlora_kernels was built without CUDA"); }
}  // namespace

void adamw8bit_step_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                         uintptr_t, uintptr_t, int64_t, int64_t, double, double, double, double, double, uintptr_t) {
  no_cuda();
}
void adamw32bit_step_cuda(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t,
                          int64_t, double, double, double, double, double, uintptr_t) {
  no_cuda();
}
void adamw8bit_steps_cuda(const std::vector<uintptr_t>&, const std::vector<uintptr_t>&, const std::vector<uintptr_t>&,
                          const std::vector<uintptr_t>&, const std::vector<uintptr_t>&, const std::vector<uintptr_t>&,
                          const std::vector<uintptr_t>&, const std::vector<uintptr_t>&, const std::vector<int64_t>&,
                          const std::vector<int64_t>&, uintptr_t, uintptr_t, double, double, double, double, double,
                          uintptr_t) {
  no_cuda();
}
void adamw32bit_steps_cuda(const std::vector<uintptr_t>&, const std::vector<uintptr_t>&, const std::vector<uintptr_t>&,
                           const std::vector<uintptr_t>&, const std::vector<uintptr_t>&, const std::vector<uintptr_t>&,
                           const std::vector<int64_t>&, const std::vector<int64_t>&, uintptr_t, double, double, double,
                           double, double, uintptr_t) {
  no_cuda();
}
uintptr_t cuda_managed_alloc(int64_t, int) { no_cuda(); }
void cuda_managed_free(uintptr_t) {}
void cuda_managed_prefetch(uintptr_t, int64_t, int, uintptr_t) { no_cuda(); }
bool cuda_concurrent_managed_access(int) { return false; }
std::string cuda_pointer_type(uintptr_t) { return "unregistered"; }

}  // namespace qk
