// oneDNN convolutions for JAX on CPU, as XLA FFI handlers.
//
// Three handlers, one per oneDNN primitive, each NHWC activations and HWIO
// weights (the layouts of models/layers.py), float32 or bfloat16:
//   lb_conv_forward          y  = conv(x, w)
//   lb_conv_backward_data    dx = conv_backward_data(dy, w)
//   lb_conv_backward_weights dw = conv_backward_weights(x, dy)   (float32 dw)
// Attributes: strides (2), pads (top, bottom, left, right), threads (OpenMP
// threads for this call: the cores of this XLA device).
//
// Activations stay in the caller's NHWC buffers; weights are reordered
// between HWIO and the blocked layout oneDNN picks (AMX and AVX-512 kernels
// need it). Primitives and reorders are built once per shape and cached;
// scratchpads are per thread, so concurrent calls (one per XLA device) are safe.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using largebatch::Engine;
using largebatch::scratchpad_buffer;
using largebatch::weights_buffer;

namespace {

enum class Kind { kForward, kBackwardData, kBackwardWeights };

// The shape of one convolution, checked at the boundary.
struct Shape {
  int64_t n, h, w, c;      // input, NHWC
  int64_t kh, kw, o;       // kernel HWIO (I == c)
  int64_t oh, ow;          // output
  int64_t sh, sw;          // strides
  int64_t pt, pb, pl, pr;  // pads as given (top, bottom, left, right)
  dnnl::memory::data_type dtype;

  auto key() const {
    return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, static_cast<int>(dtype));
  }
};

// Everything one (kind, shape) needs, built once.
struct Plan {
  dnnl::primitive conv;
  dnnl::memory::desc src, weights, dst, scratchpad;  // what the primitive takes
  dnnl::memory::desc user_weights;                    // HWIO, in the call's buffers
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // HWIO -> blocked (forward, backward data) or back (backward weights)
};

dnnl::memory::dims Dims(std::initializer_list<int64_t> values) { return dnnl::memory::dims(values); }

std::unique_ptr<Plan> MakePlan(Kind kind, const Shape& s) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  auto& engine = Engine();
  dnnl::memory::dims src_dims = Dims({s.n, s.c, s.h, s.w});
  dnnl::memory::dims weight_dims = Dims({s.o, s.c, s.kh, s.kw});
  dnnl::memory::dims dst_dims = Dims({s.n, s.o, s.oh, s.ow});
  dnnl::memory::dims strides = Dims({s.sh, s.sw});
  // oneDNN wants the right/bottom padding that the output size implies; lax
  // may give more (never read), as SAME padding of a strided layer does.
  dnnl::memory::dims pad_l = Dims({s.pt, s.pl});
  dnnl::memory::dims pad_r = Dims({(s.oh - 1) * s.sh + s.kh - s.h - s.pt, (s.ow - 1) * s.sw + s.kw - s.w - s.pl});

  dnnl::memory::desc src(src_dims, s.dtype, tag::nhwc);
  dnnl::memory::desc dst(dst_dims, s.dtype, tag::nhwc);
  dnnl::memory::desc any_weights(weight_dims, s.dtype, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto forward = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any_weights, dst, strides,
      pad_l, pad_r, attr);

  auto plan = std::make_unique<Plan>();
  plan->src = src;
  plan->dst = dst;
  if (kind == Kind::kForward) {
    plan->conv = dnnl::convolution_forward(forward);
    plan->weights = forward.weights_desc();
    plan->scratchpad = forward.scratchpad_desc();
    plan->user_weights = dnnl::memory::desc(weight_dims, s.dtype, tag::hwio);
  } else if (kind == Kind::kBackwardData) {
    auto backward = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, pad_l, pad_r, forward, attr);
    plan->conv = dnnl::convolution_backward_data(backward);
    plan->weights = backward.weights_desc();
    plan->scratchpad = backward.scratchpad_desc();
    plan->user_weights = dnnl::memory::desc(weight_dims, s.dtype, tag::hwio);
  } else {
    // The weight gradient sums over the batch and the image: float32 even for bfloat16 inputs.
    dnnl::memory::desc any_diff_weights(weight_dims, dt::f32, tag::any);
    auto backward = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, src, any_diff_weights, dst, strides, pad_l, pad_r, forward, attr);
    plan->conv = dnnl::convolution_backward_weights(backward);
    plan->weights = backward.diff_weights_desc();
    plan->scratchpad = backward.scratchpad_desc();
    plan->user_weights = dnnl::memory::desc(weight_dims, dt::f32, tag::hwio);
  }
  plan->reorder_weights = plan->weights != plan->user_weights;
  if (plan->reorder_weights) {
    plan->weights_reorder = kind == Kind::kBackwardWeights
                                ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->weights, engine,
                                                                              plan->user_weights))
                                : dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->user_weights, engine,
                                                                              plan->weights));
  }
  return plan;
}

const Plan& GetPlan(Kind kind, const Shape& s, int64_t threads) {
  return largebatch::CachedPlan<Plan>(std::make_pair(static_cast<int>(kind), s.key()), threads,
                                      [&] { return MakePlan(kind, s); });
}

ffi::Error CheckShape(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w, ffi::AnyBuffer::Dimensions y,
                      ffi::DataType dtype, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads,
                      Shape* s) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: activations must be NHWC and the kernel HWIO (rank 4)");
  }
  if (strides.size() != 2 || pads.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: strides needs 2 values and pads 4 (top, bottom, left, right)");
  }
  if (!largebatch::ToOneDnn(dtype, &s->dtype)) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "onednn conv: only float32 and bfloat16 are supported");
  }
  *s = Shape{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], strides[0], strides[1],
             pads[0], pads[1], pads[2], pads[3], s->dtype};
  bool consistent = w[2] == s->c && y[0] == s->n && y[3] == s->o && s->sh > 0 && s->sw > 0 &&
                    s->oh == (s->h + s->pt + s->pb - s->kh) / s->sh + 1 &&
                    s->ow == (s->w + s->pl + s->pr - s->kw) / s->sw + 1 && s->pt >= 0 && s->pl >= 0 &&
                    // Rows and columns past the last window would need negative right padding, which
                    // oneDNN's backward-weights kernels get wrong: the caller crops them.
                    (s->oh - 1) * s->sh + s->kh >= s->h + s->pt && (s->ow - 1) * s->sw + s->kw >= s->w + s->pl;
  if (!consistent) {
    std::ostringstream message;
    message << "onednn conv: inconsistent shapes: x " << s->n << "x" << s->h << "x" << s->w << "x" << s->c
            << ", kernel " << s->kh << "x" << s->kw << "x" << w[2] << "x" << s->o << ", y " << y[0] << "x"
            << s->oh << "x" << s->ow << "x" << y[3] << ", strides " << s->sh << "," << s->sw << ", pads "
            << s->pt << "," << s->pb << "," << s->pl << "," << s->pr;
    return ffi::Error::InvalidArgument(message.str());
  }
  return ffi::Error::Success();
}

// Runs (kind, shape)'s plan with the activations at `src`/`dst` and the HWIO weights at `user_weights`.
ffi::Error Run(Kind kind, const Shape& shape, void* src, void* user_weights, void* dst, int64_t threads) {
  try {
    const Plan& plan = GetPlan(kind, shape, threads);
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    dnnl::memory user(plan.user_weights, engine, user_weights);
    dnnl::memory weights = plan.reorder_weights
                               ? dnnl::memory(plan.weights, engine, weights_buffer.Get(plan.weights.get_size()))
                               : user;
    if (plan.reorder_weights && kind != Kind::kBackwardWeights) plan.weights_reorder.execute(stream, user, weights);
    dnnl::memory scratchpad(plan.scratchpad, engine, scratchpad_buffer.Get(plan.scratchpad.get_size()));
    dnnl::memory src_memory(plan.src, engine, src), dst_memory(plan.dst, engine, dst);
    if (kind == Kind::kForward) {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src_memory}, {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DST, dst_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (kind == Kind::kBackwardData) {
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_memory}, {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_DST, dst_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src_memory}, {DNNL_ARG_DIFF_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_DST, dst_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan.reorder_weights) plan.weights_reorder.execute(stream, weights, user);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return largebatch::Failure(e, "convolution");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pads, int64_t threads) {
  Shape s;
  if (x.element_type() != w.element_type() || y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("onednn conv forward: x, kernel and y must have one dtype");
  }
  if (auto error = CheckShape(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(), strides, pads, &s);
      error.failure()) {
    return error;
  }
  return Run(Kind::kForward, s, x.untyped_data(), w.untyped_data(), y->untyped_data(),
             threads);
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads, int64_t threads) {
  Shape s;
  if (dy.element_type() != w.element_type() || dx->element_type() != dy.element_type()) {
    return ffi::Error::InvalidArgument("onednn conv backward data: dy, kernel and dx must have one dtype");
  }
  if (auto error = CheckShape(dx->dimensions(), w.dimensions(), dy.dimensions(), dy.element_type(), strides, pads, &s);
      error.failure()) {
    return error;
  }
  return Run(Kind::kBackwardData, s, dx->untyped_data(), w.untyped_data(),
             dy.untyped_data(), threads);
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads, int64_t threads) {
  Shape s;
  if (x.element_type() != dy.element_type() || dw->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("onednn conv backward weights: x and dy share a dtype, dw is float32");
  }
  if (auto error = CheckShape(x.dimensions(), dw->dimensions(), dy.dimensions(), x.element_type(), strides, pads, &s);
      error.failure()) {
    return error;
  }
  return Run(Kind::kBackwardWeights, s, x.untyped_data(), dw->untyped_data(),
             dy.untyped_data(), threads);
}

#define LB_CONV_BINDING                                \
  ffi::Ffi::Bind()                                     \
      .Arg<ffi::AnyBuffer>()                           \
      .Arg<ffi::AnyBuffer>()                           \
      .Ret<ffi::AnyBuffer>()                           \
      .Attr<ffi::Span<const int64_t>>("strides")       \
      .Attr<ffi::Span<const int64_t>>("pads")          \
      .Attr<int64_t>("threads")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_conv_forward, Forward, LB_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_conv_backward_data, BackwardData, LB_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_conv_backward_weights, BackwardWeights, LB_CONV_BINDING);

// The instruction set oneDNN dispatches to on this CPU, for the start-up log.
extern "C" const char* lb_onednn_isa() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41: return "SSE4.1";
    case dnnl::cpu_isa::avx: return "AVX";
    case dnnl::cpu_isa::avx2: return "AVX2";
    case dnnl::cpu_isa::avx2_vnni: return "AVX2-VNNI";
    case dnnl::cpu_isa::avx2_vnni_2: return "AVX2-VNNI-2";
    case dnnl::cpu_isa::avx512_core: return "AVX-512";
    case dnnl::cpu_isa::avx512_core_vnni: return "AVX-512 VNNI";
    case dnnl::cpu_isa::avx512_core_bf16: return "AVX-512 BF16";
    case dnnl::cpu_isa::avx512_core_fp16: return "AVX-512 FP16";
    case dnnl::cpu_isa::avx512_core_amx: return "AVX-512 + AMX (BF16/INT8)";
    case dnnl::cpu_isa::avx512_core_amx_fp16: return "AVX-512 + AMX (BF16/FP16/INT8)";
    default: return "other";
  }
}

// The cores this process's oneDNN calls share, which models/onednn.py divides between devices.
extern "C" int lb_process_cores() { return largebatch::ProcessCores(); }

extern "C" int lb_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
