// std::thread chunking shared by the CPU kernels (not OpenMP, so it does not fight torch's OpenMP pool).
#pragma once

#include <algorithm>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace qk {

// Runs fn(begin, end) over [0, total) in up to num_threads contiguous chunks of at least `grain` items;
// the calling thread takes the first chunk. Small work stays on one thread (spawning costs ~20 us).
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
