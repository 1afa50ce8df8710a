// Argument checks shared by every entry point: the Python op layer validates tensors first, this is the
// second line that keeps a bad size or a null pointer from becoming an out-of-bounds write.
#include <stdexcept>
#include <string>

#include "nf4_kernels.h"

namespace qk {

void check_n(int64_t n, const char* name) {
  if (n < 0) throw std::invalid_argument(std::string(name) + " must be >= 0, got " + std::to_string(n));
}

void check_blocksize(int64_t blocksize) {
  const bool pow2 = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  if (!pow2 || blocksize < 32 || blocksize > 4096)
    throw std::invalid_argument("blocksize must be a power of two in 32..4096, got " + std::to_string(blocksize));
}

void check_dtype(int64_t code, const char* name) {
  if (code < 0 || code > 2)
    throw std::invalid_argument(std::string(name) + " must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(code));
}

void check_ptr(uintptr_t p, int64_t n, const char* name) {
  if (n > 0 && p == 0) throw std::invalid_argument(std::string(name) + " must not be a null pointer");
}

}  // namespace qk
