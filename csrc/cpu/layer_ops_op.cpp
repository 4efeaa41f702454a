// torch.ops.forkdec.rms_norm / add_rms_norm / rope_qkv / silu_and_mul on CPU
// tensors: argument checks, [rows, cols] views, and the split into threads.
// The arithmetic lives in the torch-free layer_ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu/layer_ops.h"

namespace forkdec::cpu {
namespace {

// Elements per task at least: a decode step's rows (32 x 3072 at most for SmolLM2)
// stay on one thread. These passes take tens of microseconds; waking a second
// thread costs more, and on a busy machine a spinning OpenMP team turned a 70 us
// silu_and_mul into 28 ms. Prefill-sized inputs still split.
constexpr int64_t kGrainElements = int64_t{1} << 20;

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", type);
  return type == at::kHalf ? DType::f16 : type == at::kBFloat16 ? DType::bf16 : DType::f32;
}

// x viewed as [rows, cols] with unit stride along cols (a copy only when it must).
at::Tensor rows_view(const at::Tensor& x, int64_t cols) {
  const int64_t rows = cols ? x.numel() / cols : 0;
  at::Tensor v = x.reshape({rows, cols});
  return cols > 1 && v.stride(1) != 1 ? v.contiguous() : v;
}

template <class F>
void for_rows(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, f);
}

std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                        const at::Tensor& weight, double eps, const char* op) {
  const DType dtype = dtype_of(x, op, "x");
  const DType wdtype = dtype_of(weight, op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h, op, ": weight must be [", h, "], got ", weight.sizes());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor w = weight.contiguous();
  const at::Tensor x2 = rows_view(x, h);
  at::Tensor r2, sum;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), op,
                ": residual must match x in shape and dtype");
    r2 = rows_view(*residual, h);
    sum = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = x2.size(0);
  if (rows == 0 || h == 0) return {out, sum};
  for_rows(rows, h, [&](int64_t begin, int64_t end) {
    rms_norm_rows(x2.const_data_ptr(), x2.stride(0), r2.defined() ? r2.const_data_ptr() : nullptr,
                  r2.defined() ? r2.stride(0) : 0, w.const_data_ptr(), wdtype, dtype, begin, end, h,
                  static_cast<float>(eps), out.mutable_data_ptr(), sum.defined() ? sum.mutable_data_ptr() : nullptr);
  });
  return {out, sum};
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm(x, std::nullopt, weight, eps, "forkdec::rms_norm"));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  return norm(x, residual, weight, eps, "forkdec::add_rms_norm");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv_cpu(const at::Tensor& qkv, const at::Tensor& cos,
                                                            const at::Tensor& sin, int64_t num_q_heads,
                                                            int64_t num_kv_heads) {
  const char* op = "forkdec::rope_qkv";
  const DType dtype = dtype_of(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 2, op, ": qkv must be [T, (Hq + 2 Hkv) * D], got ", qkv.sizes());
  TORCH_CHECK(num_q_heads >= 1 && num_kv_heads >= 1, op, ": num_q_heads (", num_q_heads, ") and num_kv_heads (",
              num_kv_heads, ") must be >= 1");
  const int64_t heads = num_q_heads + 2 * num_kv_heads, t = qkv.size(0);
  TORCH_CHECK(qkv.size(1) % heads == 0 && (qkv.size(1) / heads) % 2 == 0, op, ": qkv width ", qkv.size(1),
              " is not (Hq + 2 Hkv) * D with an even D");
  const int64_t d = qkv.size(1) / heads;
  for (const at::Tensor* c : {&cos, &sin}) {
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->dim() == 2 && c->size(0) == t && c->size(1) == d / 2, op,
                ": cos and sin must be float32 [", t, ", ", d / 2, "], got ", c->scalar_type(), " ", c->sizes());
  }
  const at::Tensor x = rows_view(qkv, qkv.size(1));
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor q = at::empty({t, num_q_heads, d}, qkv.options());
  at::Tensor k = at::empty({t, num_kv_heads, d}, qkv.options());
  at::Tensor v = at::empty({t, num_kv_heads, d}, qkv.options());
  if (t == 0) return {q, k, v};
  for_rows(t, qkv.size(1), [&](int64_t begin, int64_t end) {
    rope_qkv_rows(x.const_data_ptr(), x.stride(0), c.const_data_ptr<float>(), s.const_data_ptr<float>(), dtype,
                  begin, end, num_q_heads, num_kv_heads, d, q.mutable_data_ptr(), k.mutable_data_ptr(),
                  v.mutable_data_ptr());
  });
  return {q, k, v};
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  const char* op = "forkdec::silu_and_mul";
  const DType dtype = dtype_of(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, op, ": the last dimension of x must be even, got ", x.sizes());
  const int64_t inter = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inter;
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor x2 = rows_view(x, x.size(-1));
  const int64_t rows = x2.size(0);
  if (rows == 0 || inter == 0) return out;
  for_rows(rows, x.size(-1), [&](int64_t begin, int64_t end) {
    silu_and_mul_rows(x2.const_data_ptr(), x2.stride(0), dtype, begin, end, inter, out.mutable_data_ptr());
  });
  return out;
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) {
  m.impl("rms_norm", &forkdec::cpu::rms_norm_cpu);
  m.impl("add_rms_norm", &forkdec::cpu::add_rms_norm_cpu);
  m.impl("rope_qkv", &forkdec::cpu::rope_qkv_cpu);
  m.impl("silu_and_mul", &forkdec::cpu::silu_and_mul_cpu);
}
