// What the oneDNN handlers share: the CPU engine and per-thread scratch buffers.
#ifndef LARGEBATCH_ONEDNN_COMMON_H_
#define LARGEBATCH_ONEDNN_COMMON_H_

#include <cstdlib>
#include <memory>

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

}  // namespace largebatch

#endif  // LARGEBATCH_ONEDNN_COMMON_H_
