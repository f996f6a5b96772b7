// Threads for the native kernels (shared by every kernels/*.cc): `parallel_ranges` runs
// run(first, last) over items 0..count in contiguous ranges, one per thread, the calling thread
// taking the first; as many threads as this process may use cores, fewer when a thread would get
// less than `grain` of the call's `work` (a thread costs more than it saves below that).
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

namespace native {

inline int usable_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

template <typename Run>
void parallel_ranges(int64_t count, int64_t work, int64_t grain, Run run) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({usable_cores(), count, work / grain}));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, count * t / threads, count * (t + 1) / threads);
  run(0, count / threads);
  for (auto &thread : pool) thread.join();
}

}  // namespace native
