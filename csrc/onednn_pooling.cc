// oneDNN max pooling (training) for JAX on CPU, as XLA FFI handlers.
//
//   lb_max_pool_forward   x -> (y, workspace)
//   lb_max_pool_backward  (dy, workspace) -> dx
//
// x, y, dy and dx are NHWC, float32 or bfloat16. The workspace is oneDNN's
// record of where each window's maximum was (the first one, as XLA's
// select_and_scatter picks it), [N, bytes per example] of uint8;
// lb_max_pool_workspace_bytes gives the bytes per example. Padding is never
// the maximum (as -inf padding). Attributes: window (2), strides (2), pads
// (top, bottom, left, right; the bottom and right ones as the output size
// implies), threads (OpenMP threads for this call).
//
// Why: XLA:CPU's gradient of a max pool (select_and_scatter) takes 250 ms for
// ResNet-50's stem pool at batch 16, where the strided copy of the same
// tensor takes 14 ms.

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>

#include "dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using largebatch::Engine;
using largebatch::scratchpad_buffer;

namespace {

struct Shape {
  int64_t n, h, w, c;      // input, NHWC
  int64_t oh, ow;          // output
  int64_t kh, kw, sh, sw;  // window and strides
  int64_t pt, pb, pl, pr;  // pads
  dnnl::memory::data_type dtype;

  auto key() const {
    return std::make_tuple(n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pb, pl, pr, static_cast<int>(dtype));
  }
};

struct Plan {
  dnnl::primitive forward, backward;
  dnnl::memory::desc src, dst, workspace, forward_scratchpad, backward_scratchpad;
};

std::unique_ptr<Plan> MakePlan(const Shape& s) {
  using tag = dnnl::memory::format_tag;
  auto& engine = Engine();
  auto plan = std::make_unique<Plan>();
  plan->src = dnnl::memory::desc({s.n, s.c, s.h, s.w}, s.dtype, tag::nhwc);
  plan->dst = dnnl::memory::desc({s.n, s.c, s.oh, s.ow}, s.dtype, tag::nhwc);
  dnnl::memory::dims strides{s.sh, s.sw}, window{s.kh, s.kw}, dilation{0, 0};
  dnnl::memory::dims pad_l{s.pt, s.pl}, pad_r{s.pb, s.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::pooling_forward::primitive_desc forward(engine, dnnl::prop_kind::forward_training,
                                                dnnl::algorithm::pooling_max, plan->src, plan->dst, strides, window,
                                                dilation, pad_l, pad_r, attr);
  dnnl::pooling_backward::primitive_desc backward(engine, dnnl::algorithm::pooling_max, plan->src, plan->dst, strides,
                                                  window, dilation, pad_l, pad_r, forward, attr);
  plan->forward = dnnl::pooling_forward(forward);
  plan->backward = dnnl::pooling_backward(backward);
  plan->workspace = forward.workspace_desc();
  plan->forward_scratchpad = forward.scratchpad_desc();
  plan->backward_scratchpad = backward.scratchpad_desc();
  return plan;
}

// One plan per (shape, threads), both directions.
const Plan& GetPlan(const Shape& s, int64_t threads) {
  return largebatch::CachedPlan<Plan>(s.key(), threads, [&] { return MakePlan(s); });
}

ffi::Error CheckShape(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions y, ffi::DataType dtype,
                      ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pads, Shape* s) {
  if (x.size() != 4 || y.size() != 4 || window.size() != 2 || strides.size() != 2 || pads.size() != 4) {
    return ffi::Error::InvalidArgument(
        "onednn max pool: x and y must be NHWC, window and strides 2 values, pads 4 (top, bottom, left, right)");
  }
  if (!largebatch::ToOneDnn(dtype, &s->dtype)) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "onednn max pool: only float32 and bfloat16 are supported");
  }
  *s = Shape{x[0],       x[1],       x[2],       x[3],    y[1],    y[2],    window[0], window[1],
             strides[0], strides[1], pads[0],    pads[1], pads[2], pads[3], s->dtype};
  bool consistent = y[0] == s->n && y[3] == s->c && s->kh > 0 && s->kw > 0 && s->sh > 0 && s->sw > 0 &&
                    s->pt >= 0 && s->pb >= 0 && s->pl >= 0 && s->pr >= 0 &&
                    (s->oh - 1) * s->sh + s->kh == s->h + s->pt + s->pb &&
                    (s->ow - 1) * s->sw + s->kw == s->w + s->pl + s->pr;
  if (!consistent) {
    std::ostringstream message;
    message << "onednn max pool: inconsistent shapes: x " << x[0] << "x" << x[1] << "x" << x[2] << "x" << x[3]
            << ", y " << y[0] << "x" << y[1] << "x" << y[2] << "x" << y[3] << ", window " << s->kh << "x" << s->kw
            << ", strides " << s->sh << "," << s->sw << ", pads " << s->pt << "," << s->pb << "," << s->pl << ","
            << s->pr << " (the last window must end at the padded input's last row and column)";
    return ffi::Error::InvalidArgument(message.str());
  }
  return ffi::Error::Success();
}

template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return largebatch::Failure(e, "max pooling");
  }
  return ffi::Error::Success();
}

ffi::Error CheckWorkspace(const Plan& plan, const ffi::AnyBuffer& workspace) {
  if (workspace.element_type() != ffi::DataType::U8 || workspace.size_bytes() != plan.workspace.get_size()) {
    return ffi::Error::InvalidArgument("onednn max pool: the workspace must be the forward call's (uint8, "
                                       "lb_max_pool_workspace_bytes per example)");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> workspace,
                   ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads,
                   int64_t threads) {
  Shape s;
  if (y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("onednn max pool forward: x and y must have one dtype");
  }
  if (auto error = CheckShape(x.dimensions(), y->dimensions(), x.element_type(), window, strides, pads, &s);
      error.failure()) {
    return error;
  }
  ffi::Error checked = ffi::Error::Success();
  ffi::Error run = Guarded([&] {
    const Plan& plan = GetPlan(s, threads);
    if (checked = CheckWorkspace(plan, *workspace); checked.failure()) return;
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    dnnl::memory scratchpad(plan.forward_scratchpad, engine,
                            scratchpad_buffer.Get(plan.forward_scratchpad.get_size()));
    plan.forward.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(plan.src, engine, x.untyped_data())},
                                  {DNNL_ARG_DST, dnnl::memory(plan.dst, engine, y->untyped_data())},
                                  {DNNL_ARG_WORKSPACE, dnnl::memory(plan.workspace, engine, workspace->untyped_data())},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    stream.wait();
  });
  return checked.failure() ? checked : run;
}

ffi::Error Backward(ffi::AnyBuffer dy, ffi::AnyBuffer workspace, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads,
                    int64_t threads) {
  Shape s;
  if (dx->element_type() != dy.element_type()) {
    return ffi::Error::InvalidArgument("onednn max pool backward: dy and dx must have one dtype");
  }
  if (auto error = CheckShape(dx->dimensions(), dy.dimensions(), dy.element_type(), window, strides, pads, &s);
      error.failure()) {
    return error;
  }
  ffi::Error checked = ffi::Error::Success();
  ffi::Error run = Guarded([&] {
    const Plan& plan = GetPlan(s, threads);
    if (checked = CheckWorkspace(plan, workspace); checked.failure()) return;
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    dnnl::memory scratchpad(plan.backward_scratchpad, engine,
                            scratchpad_buffer.Get(plan.backward_scratchpad.get_size()));
    plan.backward.execute(stream, {{DNNL_ARG_DIFF_DST, dnnl::memory(plan.dst, engine, dy.untyped_data())},
                                   {DNNL_ARG_DIFF_SRC, dnnl::memory(plan.src, engine, dx->untyped_data())},
                                   {DNNL_ARG_WORKSPACE, dnnl::memory(plan.workspace, engine, workspace.untyped_data())},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad}});
    stream.wait();
  });
  return checked.failure() ? checked : run;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_max_pool_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_max_pool_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Attr<int64_t>("threads"));

// Bytes of the workspace per example for one call's shape (-1 where oneDNN has no such pooling).
extern "C" int64_t lb_max_pool_workspace_bytes(int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow, int64_t kh,
                                               int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                                               int64_t pl, int64_t pr, int bf16, int64_t threads) {
  Shape s{1, h, w, c, oh, ow, kh, kw, sh, sw, pt, pb, pl, pr,
          bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32};
  try {
    return static_cast<int64_t>(GetPlan(s, threads).workspace.get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}
