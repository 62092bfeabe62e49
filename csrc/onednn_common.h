// What the oneDNN handlers share: the CPU engine, per-thread scratch buffers,
// the cores that concurrent calls divide between them, the plan cache, and
// the mapping of dtypes and errors between XLA's FFI and oneDNN.
#ifndef LARGEBATCH_ONEDNN_COMMON_H_
#define LARGEBATCH_ONEDNN_COMMON_H_

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

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

// The cores this process's oneDNN calls share: $OMP_NUM_THREADS (a launcher's
// share of the machine), else the CPUs it may run on.
inline int ProcessCores() {
  if (const char* env = std::getenv("OMP_NUM_THREADS"); env && std::atoi(env) > 0) return std::atoi(env);
  cpu_set_t cpus;
  return sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? std::max(1, CPU_COUNT(&cpus)) : 1;
}

// Holds `threads` of the process's cores while one call runs, and sets the
// calling thread's OpenMP team to that size. XLA runs independent thunks at
// once (a layer's backward-data and backward-weights calls, say); two calls
// that each take every core run far slower side by side than one after the
// other (bench/RESULTS.md). Calls on several XLA devices, each given its share
// of the cores, still run side by side.
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
// not on which call built the primitive first (otherwise a primitive built for
// 2 threads and run with 1 would round differently from one built for 1).
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

// The plan (primitives and memory descriptors) for `key` at `threads`, built by
// make() under the team size it will run with the first time, then only read.
// Each call site has its own cache (make's type is its own lambda).
template <typename Plan, typename Key, typename Make>
const Plan& CachedPlan(const Key& key, int64_t threads, Make make) {
  static std::mutex mutex;
  static std::map<std::pair<Key, int64_t>, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[{key, threads}];
  if (!plan) {
    BuildingFor team(threads);
    plan = make();
  }
  return *plan;
}

// The oneDNN type of an XLA element type: float32 and bfloat16 only (false otherwise).
inline bool ToOneDnn(xla::ffi::DataType type, dnnl::memory::data_type* out) {
  if (type == xla::ffi::DataType::F32) {
    *out = dnnl::memory::data_type::f32;
  } else if (type == xla::ffi::DataType::BF16) {
    *out = dnnl::memory::data_type::bf16;
  } else {
    return false;
  }
  return true;
}

// The FFI error for a oneDNN exception from building or running a `what`
// ("convolution", ...): unimplemented says so, for the tests and the user.
inline xla::ffi::Error Failure(const dnnl::error& e, const std::string& what) {
  if (e.status == dnnl_unimplemented) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kUnimplemented,
                           "oneDNN has no " + what + " for this shape and dtype on this CPU: " + e.what());
  }
  return xla::ffi::Error::Internal(std::string("oneDNN: ") + e.what());
}

}  // namespace largebatch

#endif  // LARGEBATCH_ONEDNN_COMMON_H_
