// Thread chunking shared by the CPU kernels.
//
// Where torch's OpenMP runtime (the libgomp its wheel loads) is in the process, the chunks run on ITS worker
// threads through the runtime's own entry point (GOMP_parallel, found with dlopen(RTLD_NOLOAD): nothing is
// linked). Those workers spin for milliseconds after every torch op (libgomp's GOMP_SPINCOUNT, ~7 ms here), so
// a std::thread of ours started right after a matmul or a backward shares a core with a spinning worker:
// measured on this 2-core VM, an 8-bit AdamW step of 1M values on two std::threads right after a matmul took as
// long as on one (3.80 vs 3.67 ms). Elsewhere (no libgomp loaded, another OS, a forked child of the process
// that found it) and when asked (set_cpu_thread_pool("threads")), std::thread chunks as before.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#include <unistd.h>
#endif

namespace qk {

namespace detail {
using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpIntFn = int (*)();
struct OmpRuntime {
  GompParallelFn parallel = nullptr;
  OmpIntFn thread_num = nullptr;
  OmpIntFn num_threads = nullptr;
  std::string path;
  long pid = 0;  // the process that found it: libgomp's pool does not survive a fork (a child would hang)
};

// The libgomp already loaded in this process (torch's), or an empty OmpRuntime.
inline const OmpRuntime& omp_runtime() {
  static const OmpRuntime rt = [] {
    OmpRuntime r;
#if defined(__linux__)
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) -> int {
          const char* name = info->dlpi_name;
          if (name && std::strstr(name, "libgomp")) {
            static_cast<OmpRuntime*>(out)->path = name;
            return 1;
          }
          return 0;
        },
        &r);
    if (r.path.empty()) return r;
    void* h = dlopen(r.path.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (!h) return OmpRuntime{};
    r.parallel = reinterpret_cast<GompParallelFn>(dlsym(h, "GOMP_parallel"));
    r.thread_num = reinterpret_cast<OmpIntFn>(dlsym(h, "omp_get_thread_num"));
    r.num_threads = reinterpret_cast<OmpIntFn>(dlsym(h, "omp_get_num_threads"));
    if (!r.parallel || !r.thread_num || !r.num_threads) return OmpRuntime{};
    r.pid = (long)getpid();
#endif
    return r;
  }();
  return rt;
}

inline std::atomic<bool>& use_omp_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

// The runtime to run chunks on now, or nullptr: none loaded, "threads" asked for, or a forked child.
inline const OmpRuntime* omp_in_use() {
  const OmpRuntime& rt = omp_runtime();
  if (!rt.parallel || !use_omp_flag().load()) return nullptr;
#if defined(__linux__)
  if ((long)getpid() != rt.pid) return nullptr;
#endif
  return &rt;
}
}  // namespace detail

// "openmp <path>" when the chunks run on the loaded OpenMP runtime's threads, else "threads".
inline std::string cpu_thread_pool() {
  const detail::OmpRuntime* rt = detail::omp_in_use();
  return rt ? "openmp " + rt->path : "threads";
}
// "auto": the loaded OpenMP runtime where there is one; "threads": std::thread always. Returns the pool in use.
inline std::string set_cpu_thread_pool(const std::string& name) {
  if (name != "auto" && name != "threads")
    throw std::invalid_argument("cpu thread pool must be 'auto' or 'threads', got '" + name + "'");
  detail::use_omp_flag().store(name == "auto");
  return cpu_thread_pool();
}

// Runs fn(begin, end) over [0, total) in up to num_threads contiguous chunks of at least `grain` items.
// Small work stays on the calling thread. An exception from a chunk is rethrown here (the first one).
template <class F>
void parallel_for(int64_t total, int64_t num_threads, int64_t grain, F&& fn) {
  if (total <= 0) return;
  int64_t t = std::min<int64_t>(std::max<int64_t>(num_threads, 1), 256);
  t = std::min<int64_t>(t, std::max<int64_t>(total / std::max<int64_t>(grain, 1), 1));
  if (t <= 1) {
    fn(int64_t(0), total);
    return;
  }
  const int64_t chunk = (total + t - 1) / t;
  if (const detail::OmpRuntime* rt = detail::omp_in_use()) {
    struct Job {
      F* fn;
      int64_t total, chunk, chunks;
      const detail::OmpRuntime* rt;
      std::mutex mu;
      std::exception_ptr error;
    } job{&fn, total, chunk, (total + chunk - 1) / chunk, rt, {}, nullptr};
    // Chunk c runs on team thread c % team size (a nested or capped team may be smaller than asked).
    rt->parallel(
        [](void* data) {
          Job& j = *static_cast<Job*>(data);
          const int64_t id = j.rt->thread_num(), team = std::max(1, j.rt->num_threads());
          for (int64_t c = id; c < j.chunks; c += team) {
            try {
              (*j.fn)(c * j.chunk, std::min(j.total, (c + 1) * j.chunk));
            } catch (...) {
              std::lock_guard<std::mutex> lock(j.mu);
              if (!j.error) j.error = std::current_exception();
            }
          }
        },
        &job, (unsigned)t, 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  int64_t next = chunk;
  try {
    for (; next < total; next += chunk) {
      const int64_t b = next, e = std::min(total, next + chunk);
      workers.emplace_back([&fn, b, e] { fn(b, e); });
    }
  } catch (const std::system_error&) {
    // Could not start a thread: do the rest here.
    fn(next, total);
  }
  fn(int64_t(0), std::min(total, chunk));
  for (auto& w : workers) w.join();
}

}  // namespace qk
