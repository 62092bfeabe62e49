// oneDNN matrix multiplication for JAX on CPU, as an XLA FFI handler: the
// fully connected layers and their two gradients.
//
//   lb_matmul  c = op(a) @ op(b),  op(m) = m or its transpose
//
// a and b are row-major, float32 or bfloat16 (one dtype); c is float32 or a's
// dtype. Attributes: transpose_a, transpose_b (read the operand as its
// transpose, through strides: no copy), threads (OpenMP threads for this
// call). A layer y = x @ w (x [N, K], w [K, O]) takes three calls:
//   forward           y  = x @ w
//   backward data     dx = dy @ w^T          (transpose_b)
//   backward weights  dw = x^T @ dy, float32 (transpose_a)
// Primitives are built once per (shape, transposes, dtypes, threads).

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

using dt = dnnl::memory::data_type;

struct Shape {
  int64_t m, k, n;
  bool transpose_a, transpose_b;
  dt inputs, output;

  auto key() const {
    return std::make_tuple(m, k, n, transpose_a, transpose_b, static_cast<int>(inputs), static_cast<int>(output));
  }
};

struct Plan {
  dnnl::matmul matmul;
  dnnl::memory::desc a, b, c, scratchpad;
};

// A rows x cols operand in a row-major buffer, or the transpose of a cols x rows one.
dnnl::memory::desc Operand(int64_t rows, int64_t cols, dt type, bool transposed) {
  using tag = dnnl::memory::format_tag;
  return dnnl::memory::desc({rows, cols}, type, transposed ? tag::ba : tag::ab);
}

std::unique_ptr<Plan> MakePlan(const Shape& s) {
  auto plan = std::make_unique<Plan>();
  plan->a = Operand(s.m, s.k, s.inputs, s.transpose_a);
  plan->b = Operand(s.k, s.n, s.inputs, s.transpose_b);
  plan->c = Operand(s.m, s.n, s.output, false);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc desc(Engine(), plan->a, plan->b, plan->c, attr);
  plan->matmul = dnnl::matmul(desc);
  plan->scratchpad = desc.scratchpad_desc();
  return plan;
}

const Plan& GetPlan(const Shape& s, int64_t threads) {
  return largebatch::CachedPlan<Plan>(s.key(), threads, [&] { return MakePlan(s); });
}

ffi::Error CheckShape(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer& c, bool transpose_a,
                      bool transpose_b, Shape* s) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error::InvalidArgument("onednn matmul: a, b and c must be matrices (rank 2)");
  }
  if (a.element_type() != b.element_type() || !largebatch::ToOneDnn(a.element_type(), &s->inputs) ||
      !largebatch::ToOneDnn(c.element_type(), &s->output) || (s->output != dt::f32 && s->output != s->inputs)) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "onednn matmul: a and b must be both float32 or both bfloat16, c float32 or a's dtype");
  }
  s->transpose_a = transpose_a;
  s->transpose_b = transpose_b;
  s->m = transpose_a ? ad[1] : ad[0];
  s->k = transpose_a ? ad[0] : ad[1];
  int64_t k_of_b = transpose_b ? bd[1] : bd[0];
  s->n = transpose_b ? bd[0] : bd[1];
  if (k_of_b != s->k || cd[0] != s->m || cd[1] != s->n) {
    std::ostringstream message;
    message << "onednn matmul: inconsistent shapes: a " << ad[0] << "x" << ad[1] << (transpose_a ? " (transposed)" : "")
            << ", b " << bd[0] << "x" << bd[1] << (transpose_b ? " (transposed)" : "") << ", c " << cd[0] << "x"
            << cd[1];
    return ffi::Error::InvalidArgument(message.str());
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, bool transpose_a,
                  bool transpose_b, int64_t threads) {
  Shape s;
  if (auto error = CheckShape(a, b, *c, transpose_a, transpose_b, &s); error.failure()) return error;
  try {
    const Plan& plan = GetPlan(s, threads);
    auto& engine = Engine();
    largebatch::CoreLease cores(threads);
    dnnl::stream stream(engine);
    dnnl::memory scratchpad(plan.scratchpad, engine, scratchpad_buffer.Get(plan.scratchpad.get_size()));
    plan.matmul.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(plan.a, engine, a.untyped_data())},
                                 {DNNL_ARG_WEIGHTS, dnnl::memory(plan.b, engine, b.untyped_data())},
                                 {DNNL_ARG_DST, dnnl::memory(plan.c, engine, c->untyped_data())},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return largebatch::Failure(e, "matmul");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<int64_t>("threads"));
