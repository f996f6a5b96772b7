// Threads for the native kernels (shared by every kernels/*.cc): `parallel_ranges` runs
// run(first, last) over items 0..count in contiguous ranges, one per thread, the calling thread
// taking the first; as many threads as this process may use cores, fewer when a thread would get
// less than `grain` of the call's `work` (a thread costs more than it saves below that).
//
// The other threads are a pool's, started once and kept awake for SPIN after each call, so that a
// graph's next kernel finds them running: a thread started per call, on a core that had gone idle,
// made a 100 x 1280 x 1280 product 1.19-1.45 ms against 1.05-1.10 ms so (each half alone: 1.05 ms).
// A call that finds the pool taken (kernels run at once from two threads) starts its own threads.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <unistd.h>  // getpid (Pool::get)
#ifdef __linux__
#include <sched.h>
#endif

namespace native {

// The cores are the process's (its main thread's affinity), not the calling thread's: a kernel may
// run on one of MindSpore's pool threads pinned to a single core (nn/device.py), and counting that
// thread's one core ran every kernel on one thread (a 7B-shaped DiT evaluation took 370 ms, 240 since).
#ifdef __linux__
inline bool process_cores(cpu_set_t *set) { return sched_getaffinity(getpid(), sizeof(*set), set) == 0; }
#endif

inline int usable_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (process_cores(&set)) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// A thread started here takes the process's cores: it would inherit its starter's, one core when
// the starter is a pinned pool thread, and share that core with it.
inline void use_process_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (process_cores(&set)) sched_setaffinity(0, sizeof(set), &set);
#endif
}

const std::chrono::microseconds SPIN(300);  // a pool's worker stays awake this long after a task

class Pool {
 public:
  explicit Pool(int workers) : workers_(workers) {
    for (int i = 0; i < workers; ++i) std::thread(&Pool::work, this, i).detach();
    while (started_.load(std::memory_order_acquire) != workers) std::this_thread::yield();  // each waits for tasks
  }

  // The pool of this process (a forked child starts its own: threads do not survive a fork).
  static Pool *get() {
    static std::mutex guard;
    static Pool *pool = nullptr;
    static long owner = -1;
    std::lock_guard<std::mutex> hold(guard);
    if (pool == nullptr || owner != static_cast<long>(getpid())) {  // (a parent's pool is left as it is)
      pool = new Pool(usable_cores() - 1);  // never deleted: its threads are detached
      owner = static_cast<long>(getpid());
    }
    return pool;
  }

  // task(1 .. threads - 1) on the workers and task(0) here, returning when all are done; false
  // (nothing run) when another call holds the pool or it has too few workers
  bool run(int threads, const std::function<void(int)> &task) {
    std::unique_lock<std::mutex> use(busy_, std::try_to_lock);
    if (!use || threads - 1 > workers_) return false;
    task_ = &task;
    threads_ = threads;
    remaining_.store(workers_, std::memory_order_relaxed);  // every worker takes each call, most to do nothing
    {
      std::lock_guard<std::mutex> hold(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    task(0);
    while (remaining_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    return true;
  }

 private:
  void work(int index) {
    uint64_t seen = 0;  // (no call before every worker started)
    use_process_cores();
    started_.fetch_add(1, std::memory_order_release);
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() - start < SPIN) {
          std::this_thread::yield();  // (a thread MindSpore runs meanwhile on this core keeps it)
          continue;
        }
        std::unique_lock<std::mutex> hold(mutex_);
        wake_.wait(hold, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index + 1 < threads_) (*task_)(index + 1);
      remaining_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex busy_, mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0}, started_{0};
  const int workers_;
  const std::function<void(int)> *task_ = nullptr;
  int threads_ = 0;
};

template <typename Run>
void parallel_ranges(int64_t count, int64_t work, int64_t grain, Run run) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({usable_cores(), count, work / grain}));
  if (threads == 1) return run(0, count);
  const std::function<void(int)> task = [&](int t) { run(count * t / threads, count * (t + 1) / threads); };
  if (Pool::get()->run(static_cast<int>(threads), task)) return;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    pool.emplace_back([&task, t] {
      use_process_cores();
      task(static_cast<int>(t));
    });
  }
  task(0);
  for (auto &thread : pool) thread.join();
}

}  // namespace native
