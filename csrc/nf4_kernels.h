// Entry points of the native kernels. Pointers arrive as integers (torch's data_ptr()), sizes as int64.
// The Python op layer validates tensors; these functions check sizes and pointers again and throw
// std::invalid_argument (-> ValueError) naming the argument, or std::runtime_error (-> RuntimeError).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qk {

// ---- argument checks shared by the CPU and CUDA entry points --------------------------------------------
void check_n(int64_t n, const char* name = "n");
void check_blocksize(int64_t blocksize);
void check_dtype(int64_t code, const char* name);
void check_ptr(uintptr_t p, int64_t n, const char* name);

// ---- CPU (nf4_cpu.cpp); last argument: number of worker threads (std::thread, not OpenMP) -----------------
void quantize_nf4_cpu(uintptr_t packed, uintptr_t absmax, uintptr_t status, uintptr_t w, int64_t n,
                      int64_t blocksize, int64_t dtype, int64_t num_threads);
void dequantize_nf4_cpu(uintptr_t out, uintptr_t packed, uintptr_t absmax, uintptr_t nested_absmax,
                        uintptr_t offset, uintptr_t dynamic_map, int64_t n, int64_t blocksize, int64_t out_dtype,
                        int64_t num_threads);
void double_quantize_cpu(uintptr_t codes, uintptr_t nested_absmax, uintptr_t absmax, uintptr_t offset,
                         uintptr_t lut, int64_t nblocks, int64_t num_threads);
void double_dequantize_cpu(uintptr_t absmax_out, uintptr_t codes, uintptr_t nested_absmax, uintptr_t offset,
                           uintptr_t dynamic_map, int64_t nblocks, int64_t num_threads);
void pack_nf4_cpu(uintptr_t packed, uintptr_t codes, int64_t n, int64_t num_threads);
void unpack_nf4_cpu(uintptr_t codes, uintptr_t packed, int64_t n, int64_t num_threads);

// SIMD level of the CPU kernels: "avx512", "avx2" or "scalar". set_cpu_isa caps it ("auto" = best the CPU
// supports; QLORA_KERNELS_CPU_ISA sets the initial cap) and returns the level now in effect.
std::string cpu_isa();
std::string set_cpu_isa(const std::string& name);
std::vector<std::string> cpu_isas_supported();

// ---- CUDA (nf4_cuda.cu, or nf4_cuda_stub.cpp when built without CUDA); last argument: cudaStream_t --------
void quantize_nf4_cuda(uintptr_t packed, uintptr_t absmax, uintptr_t status, uintptr_t w, int64_t n,
                       int64_t blocksize, int64_t dtype, uintptr_t stream);
void dequantize_nf4_cuda(uintptr_t out, uintptr_t packed, uintptr_t absmax, uintptr_t nested_absmax,
                         uintptr_t offset, uintptr_t dynamic_map, int64_t n, int64_t blocksize, int64_t out_dtype,
                         uintptr_t stream);
void double_quantize_cuda(uintptr_t codes, uintptr_t nested_absmax, uintptr_t absmax, uintptr_t offset,
                          uintptr_t lut, int64_t nblocks, uintptr_t stream);
void double_dequantize_cuda(uintptr_t absmax_out, uintptr_t codes, uintptr_t nested_absmax, uintptr_t offset,
                            uintptr_t dynamic_map, int64_t nblocks, uintptr_t stream);
void pack_nf4_cuda(uintptr_t packed, uintptr_t codes, int64_t n, uintptr_t stream);
void unpack_nf4_cuda(uintptr_t codes, uintptr_t packed, int64_t n, uintptr_t stream);

bool has_cuda();
std::vector<int> cuda_archs();
int cuda_device_count();  // 0 when there is no driver or no device; never throws
std::string cuda_runtime_version();

}  // namespace qk
