// torch.ops.forkdec.llama_layers: the decoder layers of a Llama-family model for one
// step over a paged KV cache with cascade attention, looped in C++. Per layer it runs
// the same kernels as LlamaModel's Python loop, on the same values in the same order,
// so the results are bitwise that loop's: the norms, RoPE, SwiGLU and the products on
// stored blocks are the torch-free kernels called on buffers allocated once per call
// (checked once per call, as their ops check them); dense products, append_kv and the
// cascade attention are the registered ops, through the dispatcher. What it saves is
// the Python interpreter, the op dispatch and ~400 small allocations per step around
// ~10 small ops per layer: about a third of a one-token step of a 135M model on two
// cores.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/layer_ops.h"
#include "cpu/op_checks.h"
#include "cpu/qlinear_run.h"

namespace forkdec::cpu {
namespace {

using checks::dtype_of;

// Tensors per layer in `weights` (LlamaModel builds the list): attn_norm, ffn_norm,
// qkv_bias (empty when none), then qkv, o, gate_up, down as (codes, scale, offset)
// for stored blocks (qbits 4 or 8) or (dense [N, K], empty, empty) (qbits 0).
constexpr int64_t kPerLayer = 15;
constexpr int64_t kMatrices = 4;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The registered ops the loop calls as ops (the rest are their kernels, called directly).
struct Ops {
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>
      append_kv = op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&)>("forkdec::append_kv");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
      at::TensorList, const c10::List<bool>&, const c10::List<std::optional<at::Tensor>>&, double)>
      cascade_attention = op<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
          at::TensorList, const c10::List<bool>&, const c10::List<std::optional<at::Tensor>>&, double)>(
          "forkdec::cascade_attention");
};

const Ops& ops() {
  static const Ops o;
  return o;
}

// One of a layer's four matrices: stored blocks (checked once) or a dense tensor.
struct Matrix {
  std::optional<QWeightView> blocks;
  at::Tensor dense;

  Matrix(at::TensorList w, int64_t bits, int64_t n, int64_t k, const char* op) {
    if (bits == 0) {
      dense = w[0];
    } else {
      blocks = qweight_view(w[0], w[1], w[2], bits, k, n, op);
    }
  }

  // out = x @ W.T (+ bias): into `out` (contiguous [T, n] of x's dtype) for blocks;
  // a dense product returns its own tensor, as F.linear does in the Python loop.
  at::Tensor apply(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& bias) const {
    if (!blocks) return at::linear(x, dense, bias);
    at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const DType dtype = dtype_of(x.scalar_type());
    qlinear_run(*blocks, x.const_data_ptr(), dtype, x.stride(0), x.size(0),
                b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(), dtype);
    return out;
  }
};

void check_norm(const at::Tensor& weight, int64_t hidden, const char* name) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kHalf ||
                   weight.scalar_type() == at::kBFloat16),
              "forkdec::llama_layers: ", name, " weights must be contiguous float [", hidden, "], got ",
              weight.scalar_type(), " ", weight.sizes());
}

// h = RMSNorm(x [+ residual]) * weight, and sum = x + residual when there is one: the
// kernel of add_rms_norm / rms_norm on the calling thread (the ops keep rows this
// small on one thread too).
void norm_rows(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, DType dtype, float eps,
               const at::Tensor& h, const at::Tensor& sum) {
  const int64_t hidden = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && (!residual.defined() || residual.stride(1) == 1),
              "forkdec::llama_layers: a sublayer output is not [T, hidden] with unit stride");
  rms_norm_rows(x.const_data_ptr(), x.stride(0), residual.defined() ? residual.const_data_ptr() : nullptr,
                residual.defined() ? residual.stride(0) : 0, weight.const_data_ptr(),
                dtype_of(weight.scalar_type()), dtype, 0, x.size(0), hidden, eps, h.mutable_data_ptr(),
                residual.defined() ? sum.mutable_data_ptr() : nullptr);
}

std::tuple<at::Tensor, at::Tensor> llama_layers_cpu(
    const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::TensorList weights,
    at::IntArrayRef qbits, int64_t num_q_heads, int64_t num_kv_heads, double eps, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& slots, at::TensorList qo_indptr, at::TensorList kv_indptr,
    at::TensorList kv_indices, at::TensorList kv_last_page_len, const c10::List<bool>& causal,
    const c10::List<std::optional<at::Tensor>>& custom_mask, double sm_scale) {
  const char* name = "forkdec::llama_layers";
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kPerLayer, name, ": weights must hold ", kPerLayer,
              " tensors per layer (", layers, " layers), got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(qbits.size()) == layers * kMatrices, name, ": qbits must hold ", kMatrices,
              " values per layer, got ", qbits.size());
  TORCH_CHECK(v_caches.size() == k_caches.size(), name, ": k_caches and v_caches must have one entry per layer");
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous(), name, ": x must be contiguous [T, hidden], got ",
              x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kHalf ||
                  x_in.scalar_type() == at::kBFloat16,
              name, ": x must be float32, float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(num_q_heads > 0 && num_kv_heads > 0, name, ": head counts must be positive");
  if (layers == 0) return {x_in.clone(), at::zeros_like(x_in)};  // outputs never alias an input
  const int64_t t = x_in.size(0), hidden = x_in.size(1), d = k_caches[0].size(-1);
  TORCH_CHECK(d > 0 && d % 2 == 0, name, ": k_caches' head dim must be even and positive, got ", d);
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  for (const at::Tensor* a : {&c, &s}) {
    TORCH_CHECK(a->scalar_type() == at::kFloat && a->dim() == 2 && a->size(0) == t && a->size(1) == d / 2, name,
                ": cos and sin must be float32 [", t, ", ", d / 2, "], got ", a->scalar_type(), " ", a->sizes());
  }
  const DType dtype = dtype_of(x_in.scalar_type());
  const float feps = static_cast<float>(eps);
  const int64_t nqkv = (num_q_heads + 2 * num_kv_heads) * d;
  const at::TensorOptions opt = x_in.options();
  // Buffers for the whole call; x and the residual stream are handed back, so they are
  // this call's own. The residual alternates between two: add_rms_norm reads one, writes the other.
  at::Tensor h = at::empty({t, hidden}, opt), qkv = at::empty({t, nqkv}, opt), down = at::empty({t, hidden}, opt);
  const at::Tensor sums[2] = {at::empty({t, hidden}, opt), at::empty({t, hidden}, opt)};
  // The sum buffer a norm writes while it reads the residual stream from the other one.
  const auto other_sum = [&](const at::Tensor& r) -> const at::Tensor& {
    return r.is_same(sums[0]) ? sums[1] : sums[0];
  };
  at::Tensor q = at::empty({t, num_q_heads, d}, opt), k = at::empty({t, num_kv_heads, d}, opt),
             v = at::empty({t, num_kv_heads, d}, opt), o_out = at::empty({t, hidden}, opt);
  at::Tensor up, act;
  const Ops& o = ops();
  at::Tensor residual, cur = x_in;  // cur: the sublayer output the next norm adds to the residual
  for (int64_t i = 0; i < layers; ++i) {
    at::TensorList w = weights.slice(i * kPerLayer, kPerLayer);
    check_norm(w[0], hidden, "attn_norm");
    check_norm(w[1], hidden, "ffn_norm");
    const std::optional<at::Tensor> qkv_bias = w[2].numel() ? std::optional<at::Tensor>(w[2]) : std::nullopt;
    const int64_t* bits = qbits.data() + i * kMatrices;
    const at::Tensor& down_k = bits[3] ? w[13] : w[12];  // down's scale [tiles, k / 32 * 16] or dense [N, k]
    TORCH_CHECK(down_k.dim() == 2, name, ": layer ", i, " down must be 2-D, got ", down_k.sizes());
    const int64_t inter = bits[3] ? down_k.size(1) / kQTile * kQBlock : down_k.size(1);
    const Matrix wqkv(w.slice(3, 3), bits[0], nqkv, hidden, name), wo(w.slice(6, 3), bits[1], hidden,
                                                                        num_q_heads * d, name),
        wgu(w.slice(9, 3), bits[2], 2 * inter, hidden, name), wd(w.slice(12, 3), bits[3], hidden, inter, name);
    if (!up.defined() || up.size(1) != 2 * inter) {
      up = at::empty({t, 2 * inter}, opt);
      act = at::empty({t, inter}, opt);
    }

    // attention sublayer: [add +] RMSNorm, qkv, RoPE, append_kv, cascade attention, o
    if (residual.defined()) {
      const at::Tensor& sum = other_sum(residual);
      norm_rows(cur, residual, w[0], dtype, feps, h, sum);
      residual = sum;
    } else {
      norm_rows(cur, residual, w[0], dtype, feps, h, at::Tensor());
      residual = x_in;
    }
    // A dense matrix's product has the width its tensor gives: held to the one the buffers need.
    const auto width = [&](at::Tensor out, int64_t n, const char* what) -> at::Tensor {
      TORCH_CHECK(out.size(1) == n, name, ": layer ", i, " ", what, " gives ", out.size(1), " columns, expected ", n);
      return out;
    };
    const at::Tensor qkv_out = width(wqkv.apply(h, qkv, qkv_bias), nqkv, "qkv");
    rope_qkv_rows(qkv_out.const_data_ptr(), qkv_out.stride(0), c.const_data_ptr<float>(), s.const_data_ptr<float>(),
                  dtype, 0, t, num_q_heads, num_kv_heads, d, q.mutable_data_ptr(), k.mutable_data_ptr(),
                  v.mutable_data_ptr());
    o.append_kv.call(k_caches[i], v_caches[i], k, v, slots);
    const at::Tensor attn = std::get<0>(o.cascade_attention.call(q, k_caches[i], v_caches[i], qo_indptr, kv_indptr,
                                                                  kv_indices, kv_last_page_len, causal,
                                                                  custom_mask, sm_scale));
    cur = width(wo.apply(attn.reshape({t, num_q_heads * d}), o_out, std::nullopt), hidden, "o");

    // MLP sublayer: add + RMSNorm, gate_up, SwiGLU, down
    const at::Tensor& sum = other_sum(residual);
    norm_rows(cur, residual, w[1], dtype, feps, h, sum);
    residual = sum;
    const at::Tensor gu = width(wgu.apply(h, up, std::nullopt), 2 * inter, "gate_up");
    silu_and_mul_rows(gu.const_data_ptr(), gu.stride(0), dtype, 0, t, inter, act.mutable_data_ptr());
    cur = width(wd.apply(act, down, std::nullopt), hidden, "down");
  }
  // Both are this call's own tensors: the residual is a sum buffer from layer 0's second
  // norm on, cur the down buffer or a dense product's output.
  return {cur, residual};
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) { m.impl("llama_layers", &forkdec::cpu::llama_layers_cpu); }
