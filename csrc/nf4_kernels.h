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

// Decode GEMM for M <= 16 (nf4_decode_cuda.cu): y [m, n] = x [m, k] @ deq(W)^T + scaling * lora_u @ lora_b^T
// + bias, x / y / lora_u / lora_b / bias of dtype (1 fp16, 2 bf16), x rows ldx apart, y rows ldy apart. split: K
// slices (1..k / 256); split > 1 needs part, float32 [split, m, n] scratch, and either counters (uint32, one
// per 16 rows, zero; left zero after the launch: the last CTA of each row group sums the slices) or 0 (a
// second kernel sums them). Returns false, launching nothing,
// for a shape or alignment the fast path does not take (nf4_decode_cuda_supported, 16-byte aligned packed and
// x, ldx % 8 == 0): the caller then runs another implementation. Bad arguments throw.
bool nf4_decode_cuda_supported(int64_t m, int64_t n, int64_t k, int64_t blocksize, int64_t dtype);
bool nf4_decode_cuda(uintptr_t y, uintptr_t part, uintptr_t counters, uintptr_t x, uintptr_t packed, uintptr_t absmax,
                     uintptr_t nested_absmax, uintptr_t offset, uintptr_t dynamic_map, uintptr_t lora_u,
                     uintptr_t lora_b, uintptr_t bias, int64_t m, int64_t n, int64_t k, int64_t r, int64_t ldx,
                     int64_t ldy, int64_t su_m, int64_t su_r, int64_t sb_n, int64_t sb_r, double scaling,
                     int64_t blocksize, int64_t dtype, int64_t split, uintptr_t stream);

bool has_cuda();
std::vector<int> cuda_archs();
int cuda_device_count();  // 0 when there is no driver or no device; never throws
std::string cuda_runtime_version();

}  // namespace qk
