// torch.ops.forkdec.llama_layers: the decoder layers of a Llama-family model for one
// step over a paged KV cache with cascade attention, looped in C++. It calls the same
// registered ops as LlamaModel's Python loop, in the same order with the same
// arguments, so the results are bitwise those of that loop; what it saves is the
// Python interpreter and its op dispatch around ~10 small ops per layer (about a
// third of a one-token decode step of a 135M model on two cores).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace forkdec::cpu {
namespace {

// Tensors per layer in `weights` (LlamaModel builds the list): attn_norm, ffn_norm,
// qkv_bias (empty when none), then qkv, o, gate_up, down as (codes, scale, offset)
// for stored blocks (qbits 4 or 8) or (dense [N, K], empty, empty) (qbits 0).
constexpr int64_t kPerLayer = 15;
constexpr int64_t kMatrices = 4;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("forkdec::rms_norm");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, double)>
      add_rms_norm = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           double)>("forkdec::add_rms_norm");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&, int64_t, int64_t)>
      rope_qkv = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, int64_t, int64_t)>(
          "forkdec::rope_qkv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul =
      op<at::Tensor(const at::Tensor&)>("forkdec::silu_and_mul");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, int64_t, const std::optional<at::Tensor>&,
                                      std::optional<at::ScalarType>)>
      qlinear = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              int64_t, int64_t, const std::optional<at::Tensor>&, std::optional<at::ScalarType>)>(
          "forkdec::qlinear");
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

// x @ w.T (+ bias) for matrix `index` of a layer: the stored blocks or a dense matrix.
at::Tensor linear(const at::Tensor& x, at::TensorList w, int64_t bits, const std::optional<at::Tensor>& bias,
                  int64_t n) {
  if (bits == 0) return at::linear(x, w[0], bias);
  const int64_t k = x.size(-1);
  return ops().qlinear.call(x, w[0], w[1], w[2], bits, k, n, bias, std::nullopt);
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
  TORCH_CHECK(x_in.dim() == 2, name, ": x must be [T, hidden], got ", x_in.sizes());
  TORCH_CHECK(num_q_heads > 0 && num_kv_heads > 0, name, ": head counts must be positive");
  const int64_t t = x_in.size(0), hidden = x_in.size(1);
  const Ops& o = ops();
  at::Tensor x = x_in, residual;
  for (int64_t i = 0; i < layers; ++i) {
    at::TensorList w = weights.slice(i * kPerLayer, kPerLayer);
    const at::Tensor &attn_norm = w[0], &ffn_norm = w[1];
    const std::optional<at::Tensor> qkv_bias = w[2].numel() ? std::optional<at::Tensor>(w[2]) : std::nullopt;
    const int64_t* bits = qbits.data() + i * kMatrices;
    const int64_t d = k_caches[i].size(-1);
    at::Tensor h;
    if (!residual.defined()) {
      h = o.rms_norm.call(x, attn_norm, eps);
      residual = x;
    } else {
      std::tie(h, residual) = o.add_rms_norm.call(x, residual, attn_norm, eps);
    }
    const at::Tensor qkv = linear(h, w.slice(3, 3), bits[0], qkv_bias, (num_q_heads + 2 * num_kv_heads) * d);
    auto [q, k, v] = o.rope_qkv.call(qkv, cos, sin, num_q_heads, num_kv_heads);
    o.append_kv.call(k_caches[i], v_caches[i], k, v, slots);
    const at::Tensor out = std::get<0>(o.cascade_attention.call(q, k_caches[i], v_caches[i], qo_indptr, kv_indptr,
                                                                 kv_indices, kv_last_page_len, causal,
                                                                 custom_mask, sm_scale));
    x = linear(out.reshape({t, num_q_heads * d}), w.slice(6, 3), bits[1], std::nullopt, hidden);
    std::tie(h, residual) = o.add_rms_norm.call(x, residual, ffn_norm, eps);
    const at::Tensor& down_scale = w[13];
    const int64_t inter = bits[3] ? down_scale.size(1) / 16 * 32 : w[12].size(1);
    const at::Tensor up = linear(h, w.slice(9, 3), bits[2], std::nullopt, 2 * inter);
    x = linear(o.silu_and_mul.call(up), w.slice(12, 3), bits[3], std::nullopt, hidden);
  }
  if (layers == 0) return {x_in.clone(), at::zeros_like(x_in)};  // outputs never alias an input
  return {x, residual};
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) { m.impl("llama_layers", &forkdec::cpu::llama_layers_cpu); }
