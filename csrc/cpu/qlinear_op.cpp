// torch.ops.forkdec.qlinear on CPU tensors: argument checks, the activation
// quantization into a reused scratch buffer, and the split of output features
// into threads. The arithmetic lives in the torch-free qlinear.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/qlinear_run.h"

namespace forkdec::cpu {
namespace {

// Multiply-adds per task at least: a 576 x 960 matrix-vector product (0.5 M)
// is about 30 us of work, and waking the second thread costs a few us; below
// this a product stays on the calling thread.
constexpr int64_t kGrainMacs = int64_t{1} << 17;

DType dtype_of(at::ScalarType type, const char* name) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "forkdec::qlinear: ", name,
              " must be float32, float16 or bfloat16, got ", type);
  return type == at::kHalf ? DType::f16 : type == at::kBFloat16 ? DType::bf16 : DType::f32;
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t bits, int64_t k, int64_t n,
                       const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  const char* op = "forkdec::qlinear";
  const DType xdtype = dtype_of(x.scalar_type(), "x");
  const at::ScalarType otype = out_dtype.value_or(x.scalar_type());
  const DType odtype = dtype_of(otype, "out_dtype");
  const QWeightView w = qweight_view(codes, scale, offset, bits, k, n, op);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x must be [..., ", k, "], got ", x.sizes());
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [", n, "], got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options().dtype(otype));
  const int64_t m = x.numel() / k;
  if (m == 0 || n == 0) return out;
  at::Tensor x2 = x.reshape({m, k});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  qlinear_run(w, x2.const_data_ptr(), xdtype, x2.stride(0), m, b.defined() ? b.const_data_ptr<float>() : nullptr,
              out.mutable_data_ptr(), odtype);
  return out;
}

}  // namespace

QWeightView qweight_view(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t bits,
                         int64_t k, int64_t n, const char* op) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(k > 0 && k % kQBlock == 0, op, ": k must be a positive multiple of 32, got ", k);
  TORCH_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  const int64_t tiles = qlinear_tiles(n), blocks = k / kQBlock;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(0) == tiles && codes.size(1) == blocks * kQTile * kQBlock * bits / 8,
              op, ": codes must be contiguous uint8 [", tiles, ", ", blocks * kQTile * kQBlock * bits / 8,
              "], got ", codes.scalar_type(), " ", codes.sizes());
  for (const at::Tensor* t : {&scale, &offset}) {
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == tiles &&
                    t->size(1) == blocks * kQTile,
                op, ": scale and offset must be contiguous float16 [", tiles, ", ", blocks * kQTile, "], got ",
                t->scalar_type(), " ", t->sizes());
  }
  return {codes.const_data_ptr<uint8_t>(), reinterpret_cast<const Half*>(scale.const_data_ptr()),
          reinterpret_cast<const Half*>(offset.const_data_ptr()), static_cast<int>(bits), n, k};
}

void qlinear_run(const QWeightView& w, const void* x, DType xdtype, int64_t x_stride, int64_t m, const float* bias,
                 void* out, DType out_dtype) {
  if (m == 0 || w.n == 0) return;
  // The scratch lives as long as the thread: a decode step makes ~120 products of a
  // few KB each, which malloc would otherwise serve every time.
  thread_local std::vector<uint8_t> scratch;
  const size_t need = static_cast<size_t>(qlinear_scratch_bytes(m, w.k));
  if (scratch.size() < need) scratch.resize(need);
  void* s = scratch.data();
  at::parallel_for(0, m, std::max<int64_t>(1, kGrainMacs / (32 * w.k)), [&](int64_t begin, int64_t end) {
    qlinear_quantize_rows(x, xdtype, x_stride, w.k, begin, end, m, s);
  });
  at::parallel_for(0, qlinear_tiles(w.n), std::max<int64_t>(1, kGrainMacs / (m * w.k * kQTile)),
                   [&](int64_t begin, int64_t end) {
                     qlinear_tile_range(w, s, m, begin, end, bias, out, out_dtype, w.n);
                   });
}

}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) { m.impl("qlinear", &forkdec::cpu::qlinear_cpu); }
