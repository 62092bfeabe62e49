// oneDNN batch normalization (training mode) for JAX on CPU, as XLA FFI handlers.
//
//   lb_batch_norm_forward   (x, scale, shift) -> (y, mean, var[, workspace])
//   lb_batch_norm_backward  (x, dy, scale, mean, var[, workspace]) -> (dx, dscale, dshift)
//
// x and y are NHWC, float32 or bfloat16; scale, shift and the statistics are
// float32. The batch is cut into N / group consecutive groups of `group`
// examples (ghost batches; group == N is plain BatchNorm), each normalised
// with its own mean and biased variance, as models.layers.BatchNorm does:
// mean and var are [N / group, C]; dscale and dshift are summed over groups.
// Attributes: group, epsilon, threads (OpenMP threads for this call), relu:
// y = relu(BN(x)) inside the primitives (oneDNN's fuse_norm_relu), which
// saves XLA a pass over the tensor each way. Then the forward call also
// returns the workspace oneDNN keeps for the backward call (which outputs were
// positive; lb_batch_norm_workspace_bytes gives its size per group). A residual
// block's end, relu(BN(x) + shortcut), stays in XLA: oneDNN 3.2's CPU engine
// reports fuse_norm_add_relu as unimplemented.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using largebatch::Engine;
using largebatch::scratchpad_buffer;

namespace {

dnnl::normalization_flags Flags(bool relu) {
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  return relu ? flags | dnnl::normalization_flags::fuse_norm_relu : flags;
}

struct Plan {
  dnnl::primitive forward, backward;
  dnnl::memory::desc data, channels, workspace, forward_scratchpad, backward_scratchpad;
};

// One plan per (group, H, W, C, dtype, epsilon, relu, threads): both directions.
const Plan& GetPlan(int64_t group, int64_t h, int64_t w, int64_t c, dnnl::memory::data_type dtype, float epsilon,
                    bool relu, int64_t threads) {
  auto key = std::make_tuple(group, h, w, c, static_cast<int>(dtype), epsilon, relu);
  return largebatch::CachedPlan<Plan>(key, threads, [&] {
    auto& engine = Engine();
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::memory::desc data({group, c, h, w}, dtype, dnnl::memory::format_tag::nhwc);
    auto forward = dnnl::batch_normalization_forward::primitive_desc(
        engine, dnnl::prop_kind::forward_training, data, data, epsilon, Flags(relu), attr);
    auto backward = dnnl::batch_normalization_backward::primitive_desc(
        engine, dnnl::prop_kind::backward, data, data, data, epsilon, Flags(relu), forward, attr);
    dnnl::memory::desc channels({c}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::x);
    return std::make_unique<Plan>(Plan{dnnl::batch_normalization_forward(forward),
                                       dnnl::batch_normalization_backward(backward), data, channels,
                                       forward.workspace_desc(), forward.scratchpad_desc(), backward.scratchpad_desc()});
  });
}

// Checks x against [N, H, W, C] with N a multiple of group; the dtype of x.
ffi::Error CheckShape(const ffi::AnyBuffer& x, int64_t group, dnnl::memory::data_type* dtype) {
  auto dims = x.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("onednn batch norm: x must be NHWC (rank 4)");
  if (group <= 0 || dims[0] % group) {
    return ffi::Error::InvalidArgument("onednn batch norm: group " + std::to_string(group) +
                                       " does not divide the batch of " + std::to_string(dims[0]));
  }
  if (!largebatch::ToOneDnn(x.element_type(), dtype)) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "onednn batch norm: only float32 and bfloat16 are supported");
  }
  return ffi::Error::Success();
}

// Checks that a workspace comes with relu (and only then), holding every group's.
ffi::Error CheckWorkspace(bool relu, const std::optional<size_t>& workspace_bytes, size_t expected) {
  if (workspace_bytes.has_value() != relu) {
    return ffi::Error::InvalidArgument("onednn batch norm: a workspace goes with relu, and only with it");
  }
  if (relu && *workspace_bytes != expected) {
    return ffi::Error::InvalidArgument("onednn batch norm: the workspace must hold " + std::to_string(expected) +
                                       " bytes, not " + std::to_string(*workspace_bytes));
  }
  return ffi::Error::Success();
}

size_t ElementBytes(dnnl::memory::data_type dtype) { return dtype == dnnl::memory::data_type::f32 ? 4 : 2; }

ffi::Error Forward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                   ffi::Result<ffi::Buffer<ffi::F32>> var, std::optional<ffi::Result<ffi::Buffer<ffi::U8>>> workspace,
                   int64_t group, float epsilon, int64_t threads, bool relu) {
  dnnl::memory::data_type dtype;
  if (auto error = CheckShape(x, group, &dtype); error.failure()) return error;
  auto dims = x.dimensions();
  const int64_t h = dims[1], w = dims[2], c = dims[3], groups = dims[0] / group;
  if (scale.element_count() != static_cast<size_t>(c) || mean->element_count() != static_cast<size_t>(groups * c)) {
    return ffi::Error::InvalidArgument("onednn batch norm forward: scale, shift need C, mean and var N/group x C");
  }
  try {
    const Plan& plan = GetPlan(group, h, w, c, dtype, epsilon, relu, threads);
    const size_t workspace_step = plan.workspace.get_size();
    std::optional<size_t> workspace_bytes;
    if (workspace) workspace_bytes = (*workspace)->size_bytes();
    if (auto error = CheckWorkspace(relu, workspace_bytes, groups * workspace_step); error.failure()) return error;
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    const size_t step = group * h * w * c * ElementBytes(dtype);
    dnnl::memory scale_memory(plan.channels, engine, scale.typed_data());
    dnnl::memory shift_memory(plan.channels, engine, shift.typed_data());
    dnnl::memory scratchpad(plan.forward_scratchpad, engine,
                            scratchpad_buffer.Get(plan.forward_scratchpad.get_size()));
    for (int64_t g = 0; g < groups; ++g) {
      auto at = [&](void* base) { return static_cast<char*>(base) + g * step; };
      std::unordered_map<int, dnnl::memory> args = {
          {DNNL_ARG_SRC, dnnl::memory(plan.data, engine, at(x.untyped_data()))},
          {DNNL_ARG_DST, dnnl::memory(plan.data, engine, at(y->untyped_data()))},
          {DNNL_ARG_SCALE, scale_memory},
          {DNNL_ARG_SHIFT, shift_memory},
          {DNNL_ARG_MEAN, dnnl::memory(plan.channels, engine, mean->typed_data() + g * c)},
          {DNNL_ARG_VARIANCE, dnnl::memory(plan.channels, engine, var->typed_data() + g * c)},
          {DNNL_ARG_SCRATCHPAD, scratchpad}};
      if (workspace) {
        args[DNNL_ARG_WORKSPACE] =
            dnnl::memory(plan.workspace, engine, (*workspace)->typed_data() + g * workspace_step);
      }
      plan.forward.execute(stream, args);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return largebatch::Failure(e, "batch normalization");
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> var, std::optional<ffi::Buffer<ffi::U8>> workspace,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                    ffi::Result<ffi::Buffer<ffi::F32>> dshift, int64_t group, float epsilon, int64_t threads,
                    bool relu) {
  dnnl::memory::data_type dtype;
  if (auto error = CheckShape(x, group, &dtype); error.failure()) return error;
  if (dy.element_type() != x.element_type() || dx->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("onednn batch norm backward: x, dy and dx must have one dtype");
  }
  auto dims = x.dimensions();
  const int64_t h = dims[1], w = dims[2], c = dims[3], groups = dims[0] / group;
  try {
    const Plan& plan = GetPlan(group, h, w, c, dtype, epsilon, relu, threads);
    const size_t workspace_step = plan.workspace.get_size();
    std::optional<size_t> workspace_bytes;
    if (workspace) workspace_bytes = workspace->size_bytes();
    if (auto error = CheckWorkspace(relu, workspace_bytes, groups * workspace_step); error.failure()) return error;
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    const size_t step = group * h * w * c * ElementBytes(dtype);
    dnnl::memory scale_memory(plan.channels, engine, scale.typed_data());
    dnnl::memory scratchpad(plan.backward_scratchpad, engine,
                            scratchpad_buffer.Get(plan.backward_scratchpad.get_size()));
    // Each group's parameter gradients go to a slot of their own, summed below.
    std::vector<float> per_group(2 * groups * c);
    for (int64_t g = 0; g < groups; ++g) {
      auto at = [&](void* base) { return static_cast<char*>(base) + g * step; };
      float* slot = groups == 1 ? dscale->typed_data() : per_group.data() + 2 * g * c;
      float* shift_slot = groups == 1 ? dshift->typed_data() : slot + c;
      std::unordered_map<int, dnnl::memory> args = {
          {DNNL_ARG_SRC, dnnl::memory(plan.data, engine, at(x.untyped_data()))},
          {DNNL_ARG_MEAN, dnnl::memory(plan.channels, engine, mean.typed_data() + g * c)},
          {DNNL_ARG_VARIANCE, dnnl::memory(plan.channels, engine, var.typed_data() + g * c)},
          {DNNL_ARG_DIFF_DST, dnnl::memory(plan.data, engine, at(dy.untyped_data()))},
          {DNNL_ARG_SCALE, scale_memory},
          {DNNL_ARG_DIFF_SRC, dnnl::memory(plan.data, engine, at(dx->untyped_data()))},
          {DNNL_ARG_DIFF_SCALE, dnnl::memory(plan.channels, engine, slot)},
          {DNNL_ARG_DIFF_SHIFT, dnnl::memory(plan.channels, engine, shift_slot)},
          {DNNL_ARG_SCRATCHPAD, scratchpad}};
      if (workspace) {
        args[DNNL_ARG_WORKSPACE] = dnnl::memory(plan.workspace, engine, workspace->typed_data() + g * workspace_step);
      }
      plan.backward.execute(stream, args);
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
    return largebatch::Failure(e, "batch normalization");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_batch_norm_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()                 // x
                                  .Arg<ffi::Buffer<ffi::F32>>()          // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()          // shift
                                  .Ret<ffi::AnyBuffer>()                 // y
                                  .Ret<ffi::Buffer<ffi::F32>>()          // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()          // var
                                  .OptionalRet<ffi::Buffer<ffi::U8>>()   // workspace (with relu)
                                  .Attr<int64_t>("group")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_batch_norm_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()                 // x
                                  .Arg<ffi::AnyBuffer>()                 // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()          // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()          // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()          // var
                                  .OptionalArg<ffi::Buffer<ffi::U8>>()   // workspace (with relu)
                                  .Ret<ffi::AnyBuffer>()                 // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()          // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()          // dshift
                                  .Attr<int64_t>("group")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("relu"));

// Bytes of workspace one group of a forward call with relu keeps for its
// backward call; -1 where oneDNN has no such primitive here.
extern "C" int64_t lb_batch_norm_workspace_bytes(int64_t group, int64_t h, int64_t w, int64_t c, int bfloat16,
                                                 float epsilon, int64_t threads) {
  try {
    auto dtype = bfloat16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
    return static_cast<int64_t>(GetPlan(group, h, w, c, dtype, epsilon, true, threads).workspace.get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}
