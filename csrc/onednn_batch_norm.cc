// oneDNN batch normalization (training mode) for JAX on CPU, as XLA FFI handlers.
//
//   lb_batch_norm_forward   (x, scale, shift) -> (y, mean, var)
//   lb_batch_norm_backward  (x, dy, scale, mean, var) -> (dx, dscale, dshift)
//
// x and y are NHWC, float32 or bfloat16; scale, shift and the statistics are
// float32. The batch is cut into N / group consecutive groups of `group`
// examples (ghost batches; group == N is plain BatchNorm), each normalised
// with its own mean and biased variance, as models.layers.BatchNorm does:
// mean and var are [N / group, C]; dscale and dshift are summed over groups.
// Attributes: group, epsilon, threads (OpenMP threads for this call).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using largebatch::Engine;
using largebatch::scratchpad_buffer;

namespace {

dnnl::normalization_flags Flags() {
  return dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
}

struct Plan {
  dnnl::primitive forward, backward;
  dnnl::memory::desc data, channels, forward_scratchpad, backward_scratchpad;
};

// One plan per (group, H, W, C, dtype, epsilon): both directions, built once.
const Plan& GetPlan(int64_t group, int64_t h, int64_t w, int64_t c, dnnl::memory::data_type dtype, float epsilon) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int, float>, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[{group, h, w, c, static_cast<int>(dtype), epsilon}];
  if (plan) return *plan;
  auto& engine = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::memory::desc data({group, c, h, w}, dtype, dnnl::memory::format_tag::nhwc);
  auto forward = dnnl::batch_normalization_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, data, data, epsilon, Flags(), attr);
  auto backward = dnnl::batch_normalization_backward::primitive_desc(
      engine, dnnl::prop_kind::backward, data, data, data, epsilon, Flags(), forward, attr);
  plan = std::make_unique<Plan>(Plan{dnnl::batch_normalization_forward(forward),
                                     dnnl::batch_normalization_backward(backward), data,
                                     dnnl::memory::desc({c}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::x),
                                     forward.scratchpad_desc(), backward.scratchpad_desc()});
  return *plan;
}

// Checks x against [N, H, W, C] with N a multiple of group; the dtype of x.
ffi::Error CheckShape(const ffi::AnyBuffer& x, int64_t group, dnnl::memory::data_type* dtype) {
  auto dims = x.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("onednn batch norm: x must be NHWC (rank 4)");
  if (group <= 0 || dims[0] % group) {
    return ffi::Error::InvalidArgument("onednn batch norm: group " + std::to_string(group) +
                                       " does not divide the batch of " + std::to_string(dims[0]));
  }
  if (x.element_type() == ffi::DataType::F32) {
    *dtype = dnnl::memory::data_type::f32;
  } else if (x.element_type() == ffi::DataType::BF16) {
    *dtype = dnnl::memory::data_type::bf16;
  } else {
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "onednn batch norm: only float32 and bfloat16 are supported");
  }
  return ffi::Error::Success();
}

ffi::Error Failure(const dnnl::error& e) {
  if (e.status == dnnl_unimplemented) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      std::string("oneDNN has no batch normalization for this shape and dtype on this CPU: ") +
                          e.what());
  }
  return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                   ffi::Result<ffi::Buffer<ffi::F32>> var, int64_t group, float epsilon, int64_t threads) {
  dnnl::memory::data_type dtype;
  if (auto error = CheckShape(x, group, &dtype); error.failure()) return error;
  auto dims = x.dimensions();
  const int64_t h = dims[1], w = dims[2], c = dims[3], groups = dims[0] / group;
  if (scale.element_count() != static_cast<size_t>(c) || mean->element_count() != static_cast<size_t>(groups * c)) {
    return ffi::Error::InvalidArgument("onednn batch norm forward: scale, shift need C, mean and var N/group x C");
  }
  try {
    const Plan& plan = GetPlan(group, h, w, c, dtype, epsilon);
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    const size_t step = group * h * w * c * (dtype == dnnl::memory::data_type::f32 ? 4 : 2);
    dnnl::memory scale_memory(plan.channels, engine, scale.typed_data());
    dnnl::memory shift_memory(plan.channels, engine, shift.typed_data());
    dnnl::memory scratchpad(plan.forward_scratchpad, engine,
                            scratchpad_buffer.Get(plan.forward_scratchpad.get_size()));
    for (int64_t g = 0; g < groups; ++g) {
      dnnl::memory src(plan.data, engine, static_cast<char*>(x.untyped_data()) + g * step);
      dnnl::memory dst(plan.data, engine, static_cast<char*>(y->untyped_data()) + g * step);
      dnnl::memory mean_memory(plan.channels, engine, mean->typed_data() + g * c);
      dnnl::memory var_memory(plan.channels, engine, var->typed_data() + g * c);
      plan.forward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCALE, scale_memory},
                                    {DNNL_ARG_SHIFT, shift_memory}, {DNNL_ARG_MEAN, mean_memory},
                                    {DNNL_ARG_VARIANCE, var_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failure(e);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> var, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> dscale, ffi::Result<ffi::Buffer<ffi::F32>> dshift,
                    int64_t group, float epsilon, int64_t threads) {
  dnnl::memory::data_type dtype;
  if (auto error = CheckShape(x, group, &dtype); error.failure()) return error;
  if (dy.element_type() != x.element_type() || dx->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("onednn batch norm backward: x, dy and dx must have one dtype");
  }
  auto dims = x.dimensions();
  const int64_t h = dims[1], w = dims[2], c = dims[3], groups = dims[0] / group;
  try {
    const Plan& plan = GetPlan(group, h, w, c, dtype, epsilon);
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    const size_t step = group * h * w * c * (dtype == dnnl::memory::data_type::f32 ? 4 : 2);
    dnnl::memory scale_memory(plan.channels, engine, scale.typed_data());
    dnnl::memory scratchpad(plan.backward_scratchpad, engine,
                            scratchpad_buffer.Get(plan.backward_scratchpad.get_size()));
    // Each group's parameter gradients go to a slot of their own, summed below.
    std::vector<float> per_group(2 * groups * c);
    for (int64_t g = 0; g < groups; ++g) {
      auto at = [&](auto* base) { return static_cast<char*>(static_cast<void*>(base)) + g * step; };
      dnnl::memory src(plan.data, engine, at(x.untyped_data()));
      dnnl::memory diff_dst(plan.data, engine, at(dy.untyped_data()));
      dnnl::memory diff_src(plan.data, engine, at(dx->untyped_data()));
      dnnl::memory mean_memory(plan.channels, engine, mean.typed_data() + g * c);
      dnnl::memory var_memory(plan.channels, engine, var.typed_data() + g * c);
      float* slot = groups == 1 ? dscale->typed_data() : per_group.data() + 2 * g * c;
      float* shift_slot = groups == 1 ? dshift->typed_data() : slot + c;
      dnnl::memory diff_scale(plan.channels, engine, slot), diff_shift(plan.channels, engine, shift_slot);
      plan.backward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_MEAN, mean_memory},
                                     {DNNL_ARG_VARIANCE, var_memory}, {DNNL_ARG_DIFF_DST, diff_dst},
                                     {DNNL_ARG_SCALE, scale_memory}, {DNNL_ARG_DIFF_SRC, diff_src},
                                     {DNNL_ARG_DIFF_SCALE, diff_scale}, {DNNL_ARG_DIFF_SHIFT, diff_shift},
                                     {DNNL_ARG_SCRATCHPAD, scratchpad}});
    }
    stream.wait();
    if (groups > 1) {
      for (int64_t k = 0; k < c; ++k) {
        double s = 0, t = 0;
        for (int64_t g = 0; g < groups; ++g) {
          s += per_group[2 * g * c + k];
          t += per_group[2 * g * c + c + k];
        }
        dscale->typed_data()[k] = static_cast<float>(s);
        dshift->typed_data()[k] = static_cast<float>(t);
      }
    }
  } catch (const dnnl::error& e) {
    return Failure(e);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_batch_norm_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // shift
                                  .Ret<ffi::AnyBuffer>()          // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()   // var
                                  .Attr<int64_t>("group")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_batch_norm_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::AnyBuffer>()          // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // var
                                  .Ret<ffi::AnyBuffer>()          // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dshift
                                  .Attr<int64_t>("group")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("threads"));
