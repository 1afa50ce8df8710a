// Entry points of the fused optimizer kernels and of the managed (paged) memory used for their states.
// Pointers arrive as integers, sizes as int64, hyperparameters as double (the per-step float32 scalars are
// derived inside, see optim_format.h). Contract of every *_step function:
//   param [n] (dtype 0 f32 / 1 f16 / 2 bf16) and grad [n] of the same dtype; step, skipped: int64 counters;
//   flag: int32 scratch, 0 on entry and on return. A grad holding NaN, inf or |g| >= 2^63 leaves param and
//   states untouched and adds 1 to skipped; otherwise step += 1 and the update uses t = step + 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qk {

// Argument checks shared by the CPU and CUDA entry points (std::invalid_argument naming the argument).
void check_adamw8bit_args(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                          uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                          int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps, double wd);
void check_adamw32bit_args(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                           uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                           double beta2, double eps, double wd);

// The list form of the checks (the *_steps entry points): every list has one entry per tensor, and every
// tensor's arguments pass the check above; all are checked before any tensor is touched.
void check_adamw8bit_lists(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                           const std::vector<uintptr_t>& state1, const std::vector<uintptr_t>& state2,
                           const std::vector<uintptr_t>& absmax1, const std::vector<uintptr_t>& absmax2,
                           const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                           const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                           uintptr_t table, double lr, double beta1, double beta2, double eps, double wd);
void check_adamw32bit_lists(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                            const std::vector<uintptr_t>& exp_avg, const std::vector<uintptr_t>& exp_avg_sq,
                            const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                            const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                            double lr, double beta1, double beta2, double eps, double wd);

// ---- CPU (optim_cpu.cpp); last argument: number of worker threads -------------------------------------------
// 8-bit states: state1/state2 uint8 codes [n] (signed / unsigned dynamic map), absmax1/absmax2 float32
// [ceil(n / 256)], table: int32 [2 * kTableStride] (python/qlora_kernels/optim/_format.py KERNEL_TABLE).
void adamw8bit_step_cpu(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                        uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                        int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t num_threads);
// 32-bit states: exp_avg, exp_avg_sq float32 [n].
void adamw32bit_step_cpu(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                         uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t num_threads);

// Many tensors in one call (one parameter group: the same hyperparameters; per-tensor lists of one entry per
// tensor, dtypes may differ). Each tensor is stepped, or skipped for a bad gradient, exactly as the single-tensor
// entry points above do it (those call these with one tensor).
void adamw8bit_steps_cpu(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                         const std::vector<uintptr_t>& state1, const std::vector<uintptr_t>& state2,
                         const std::vector<uintptr_t>& absmax1, const std::vector<uintptr_t>& absmax2,
                         const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                         const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                         uintptr_t table, double lr, double beta1, double beta2, double eps, double weight_decay,
                         int64_t num_threads);
void adamw32bit_steps_cpu(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                          const std::vector<uintptr_t>& exp_avg, const std::vector<uintptr_t>& exp_avg_sq,
                          const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                          const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag, double lr,
                          double beta1, double beta2, double eps, double weight_decay, int64_t num_threads);

// ---- CUDA (optim_cuda.cu, or optim_cuda_stub.cpp without CUDA); last argument: cudaStream_t ----------------
void adamw8bit_step_cuda(uintptr_t param, uintptr_t grad, uintptr_t state1, uintptr_t state2, uintptr_t absmax1,
                         uintptr_t absmax2, uintptr_t step, uintptr_t skipped, uintptr_t flag, uintptr_t table,
                         int64_t n, int64_t dtype, double lr, double beta1, double beta2, double eps,
                         double weight_decay, uintptr_t stream);
void adamw32bit_step_cuda(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t step,
                          uintptr_t skipped, uintptr_t flag, int64_t n, int64_t dtype, double lr, double beta1,
                          double beta2, double eps, double weight_decay, uintptr_t stream);

// Many tensors in one call: the single-tensor launches above, tensor after tensor on `stream` (one crossing
// from Python instead of one per tensor); all tensors are checked before the first launch.
void adamw8bit_steps_cuda(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                          const std::vector<uintptr_t>& state1, const std::vector<uintptr_t>& state2,
                          const std::vector<uintptr_t>& absmax1, const std::vector<uintptr_t>& absmax2,
                          const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                          const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag,
                          uintptr_t table, double lr, double beta1, double beta2, double eps, double weight_decay,
                          uintptr_t stream);
void adamw32bit_steps_cuda(const std::vector<uintptr_t>& param, const std::vector<uintptr_t>& grad,
                           const std::vector<uintptr_t>& exp_avg, const std::vector<uintptr_t>& exp_avg_sq,
                           const std::vector<uintptr_t>& step, const std::vector<uintptr_t>& skipped,
                           const std::vector<int64_t>& n, const std::vector<int64_t>& dtype, uintptr_t flag, double lr,
                           double beta1, double beta2, double eps, double weight_decay, uintptr_t stream);

// ---- CUDA managed memory (managed_memory_cuda.cu, or the stub); never called on a CPU-only build ------------
uintptr_t cuda_managed_alloc(int64_t nbytes, int device);  // zero-filled; throws on failure
void cuda_managed_free(uintptr_t ptr);                     // safe from any thread, without the GIL
void cuda_managed_prefetch(uintptr_t ptr, int64_t nbytes, int device, uintptr_t stream);
bool cuda_concurrent_managed_access(int device);          // false without a driver / device
std::string cuda_pointer_type(uintptr_t ptr);             // "managed", "device", "host", "unregistered"

}  // namespace qk
