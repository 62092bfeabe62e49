// What the oneDNN handlers share: the CPU engine, per-thread scratch buffers
// and the cores that concurrent calls divide between them.
#ifndef LARGEBATCH_ONEDNN_COMMON_H_
#define LARGEBATCH_ONEDNN_COMMON_H_

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "dnnl.hpp"

namespace largebatch {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A growing, 64-byte aligned buffer; one per thread and purpose, so that
// concurrent calls (one per XLA device) never share one.
class Scratch {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      size_ = bytes;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

inline thread_local Scratch scratchpad_buffer, weights_buffer;

// The cores this process's oneDNN calls share: $OMP_NUM_THREADS, else the CPUs
// it may run on (models/onednn.py divides the same number between devices).
inline int ProcessCores() {
  if (const char* env = std::getenv("OMP_NUM_THREADS"); env && std::atoi(env) > 0) return std::atoi(env);
  cpu_set_t cpus;
  return sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? std::max(1, CPU_COUNT(&cpus)) : 1;
}

// Holds `threads` of the process's cores while one call runs, and sets the
// calling thread's OpenMP team to that size. XLA runs independent thunks at
// once (a layer's backward-data and backward-weights calls, say); two calls
// that each take every core run several times slower than one after the other
// (measured with ONEDNN_VERBOSE on a 16-core AMX CPU: one bf16 backward-weights
// call took 1.6 ms alone and 440 ms beside another). Calls on several XLA
// devices, each given its share of the cores, still run side by side.
class CoreLease {
 public:
  explicit CoreLease(int64_t threads) : held_(static_cast<int>(std::clamp<int64_t>(threads, 1, Cores().total))) {
    std::unique_lock<std::mutex> lock(Cores().mutex);
    Cores().freed.wait(lock, [this] { return Cores().free >= held_; });
    Cores().free -= held_;
    if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  }
  ~CoreLease() {
    {
      std::lock_guard<std::mutex> lock(Cores().mutex);
      Cores().free += held_;
    }
    Cores().freed.notify_all();
  }
  CoreLease(const CoreLease&) = delete;
  CoreLease& operator=(const CoreLease&) = delete;

 private:
  struct Shared {
    const int total = ProcessCores();
    int free = total;
    std::mutex mutex;
    std::condition_variable freed;
  };
  static Shared& Cores() {
    static Shared shared;
    return shared;
  }
  const int held_;
};

// Sets the calling thread's OpenMP team to `threads` while a primitive is
// built. oneDNN fixes a primitive's split of the work between threads when it
// builds it; the handlers cache primitives per thread count and build each
// under its own, so a result depends on the shape and the thread count only,
// not on which call built the primitive first (a process that ran 1-device
// calls before 4-device ones reused 2-thread primitives with 1 thread, and its
// gradients differed in rounding from a fresh process's).
class BuildingFor {
 public:
  explicit BuildingFor(int64_t threads) : before_(omp_get_max_threads()) {
    if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  }
  ~BuildingFor() { omp_set_num_threads(before_); }
  BuildingFor(const BuildingFor&) = delete;
  BuildingFor& operator=(const BuildingFor&) = delete;

 private:
  const int before_;
};

}  // namespace largebatch

#endif  // LARGEBATCH_ONEDNN_COMMON_H_
