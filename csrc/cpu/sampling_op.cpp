// torch.ops.forkdec.sample and sample_with_logprobs on CPU tensors: argument
// checks, grouping of the outputs that share a row and parameters (filtered
// once, drawn many times: n paths forked from one prompt; their signals are
// computed once too), and the split of the groups across threads. The
// arithmetic lives in the torch-free sampling.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/sampling.h"
#include "cpu/scalar_types.h"

namespace forkdec::cpu {
namespace {

DType dtype_of(const at::Tensor& x) {
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
                    "logits: must be float32, float16 or bfloat16, got ", type);
  return type == at::kHalf ? DType::f16 : type == at::kBFloat16 ? DType::bf16 : DType::f32;
}

float logit_at(const void* row, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f16: return to_float(static_cast<const Half*>(row)[i]);
    case DType::bf16: return to_float(static_cast<const BFloat*>(row)[i]);
    default: return static_cast<const float*>(row)[i];
  }
}

// A per-output-row tensor (contiguous, the wanted dtype), or undefined.
at::Tensor per_row(const std::optional<at::Tensor>& t, const char* name, int64_t outputs, at::ScalarType type) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(t->device().is_cpu(), name, ": must be on the CPU like logits, got ", t->device());
  TORCH_CHECK_VALUE(t->numel() == outputs, name, ": needs one value per output row (", outputs, "), got ",
                    t->numel());
  return t->to(type).contiguous();
}

// The per-output signals of sample_with_logprobs (undefined tensors: not asked).
struct Signals {
  at::Tensor logprobs;      // fp32 [R]
  at::Tensor top_logprobs;  // fp32 [R, k]
  at::Tensor top_ids;       // int64 [R, k]
  at::Tensor confidence;    // fp32 [R]
  int64_t k = 0;
};

at::Tensor sample_impl(const at::Tensor& logits, const at::Tensor& uniforms, const std::optional<at::Tensor>& row_ids,
                       double temperature, const std::optional<at::Tensor>& row_temperature, int64_t top_k,
                       const std::optional<at::Tensor>& row_top_k, double top_p,
                       const std::optional<at::Tensor>& row_top_p, double min_p,
                       const std::optional<at::Tensor>& row_min_p, Signals* signals) {
  const DType dtype = dtype_of(logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected [batch, vocab], got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(uniforms.scalar_type() == at::kFloat && uniforms.dim() == 1 && uniforms.device().is_cpu(),
                    "uniforms: expected a 1-D float32 CPU tensor");
  const int64_t outputs = uniforms.numel();
  at::Tensor ids;
  if (row_ids.has_value()) {
    ids = per_row(row_ids, "row_ids", outputs, at::kLong);
  } else {
    TORCH_CHECK_VALUE(outputs == rows, "uniforms: needs one value per row of logits (", rows, "), got ", outputs);
  }
  const at::Tensor temperatures = per_row(row_temperature, "temperature", outputs, at::kFloat);
  const at::Tensor top_ks = per_row(row_top_k, "top_k", outputs, at::kLong);
  const at::Tensor top_ps = per_row(row_top_p, "top_p", outputs, at::kFloat);
  const at::Tensor min_ps = per_row(row_min_p, "min_p", outputs, at::kFloat);
  at::Tensor tokens = at::empty({outputs}, logits.options().dtype(at::kLong));
  if (signals) {
    TORCH_CHECK_VALUE(signals->k >= 0 && (signals->k <= vocab || outputs == 0), "num_top: must be in [0, vocab = ",
                      vocab, "], got ", signals->k);
    signals->logprobs = at::empty({outputs}, logits.options().dtype(at::kFloat));
    signals->top_logprobs = at::empty({outputs, signals->k}, logits.options().dtype(at::kFloat));
    signals->top_ids = at::empty({outputs, signals->k}, logits.options().dtype(at::kLong));
    signals->confidence = at::full({outputs}, signals->k ? 0.0 : NAN, logits.options().dtype(at::kFloat));
  }
  if (outputs == 0) return tokens;
  TORCH_CHECK_VALUE(vocab > 0, "logits: has an empty vocabulary (V = 0)");

  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t* id = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  const float* t = temperatures.defined() ? temperatures.const_data_ptr<float>() : nullptr;
  const int64_t* k = top_ks.defined() ? top_ks.const_data_ptr<int64_t>() : nullptr;
  const float* p = top_ps.defined() ? top_ps.const_data_ptr<float>() : nullptr;
  const float* m = min_ps.defined() ? min_ps.const_data_ptr<float>() : nullptr;

  std::vector<int64_t> row(outputs);
  std::vector<SampleParams> params(outputs);
  for (int64_t r = 0; r < outputs; ++r) {
    row[r] = id ? id[r] : r;
    TORCH_CHECK_VALUE(row[r] >= 0 && row[r] < rows, "row_ids: value ", row[r], " is out of range [0, ", rows, ")");
    params[r] = {t ? t[r] : static_cast<float>(temperature), k ? k[r] : top_k, p ? p[r] : static_cast<float>(top_p),
                 m ? m[r] : static_cast<float>(min_p)};
    TORCH_CHECK_VALUE(params[r].temperature >= 0, "temperature: must be non-negative");
    TORCH_CHECK_VALUE(params[r].top_k >= 0, "top_k: must be non-negative");
    TORCH_CHECK_VALUE(params[r].top_p > 0 && params[r].top_p <= 1, "top_p: must be in (0, 1]");
    TORCH_CHECK_VALUE(params[r].min_p >= 0 && params[r].min_p < 1, "min_p: must be in [0, 1)");
  }

  // Outputs with the same row and parameters form one group: filtered once.
  auto key = [&](int64_t r) {
    const SampleParams& q = params[r];
    return std::make_tuple(row[r], q.temperature, q.top_k, q.top_p, q.min_p);
  };
  std::vector<int64_t> order(outputs);
  std::iota(order.begin(), order.end(), int64_t{0});
  if (id || t || k || p || m) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
  }
  std::vector<int64_t> group_begin;
  for (int64_t i = 0; i < outputs; ++i) {
    if (i == 0 || key(order[i]) != key(order[i - 1])) group_begin.push_back(i);
  }
  const int64_t groups = static_cast<int64_t>(group_begin.size());
  group_begin.push_back(outputs);

  const float* u = uniforms.const_data_ptr<float>();
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  const int64_t element_size = x.element_size();
  const int64_t num_top = signals ? signals->k : 0;
  float* logprob_out = signals ? signals->logprobs.mutable_data_ptr<float>() : nullptr;
  float* top_lp_out = signals ? signals->top_logprobs.mutable_data_ptr<float>() : nullptr;
  int64_t* top_id_out = signals ? signals->top_ids.mutable_data_ptr<int64_t>() : nullptr;
  float* confidence_out = signals ? signals->confidence.mutable_data_ptr<float>() : nullptr;
  std::atomic<int64_t> failed{-1};
  // Groups of short rows are batched per task so that small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / vocab);
  at::parallel_for(0, groups, grain, [&](int64_t first, int64_t last) {
    thread_local SampleWorkspace workspace;
    std::vector<float> group_u;
    std::vector<int64_t> group_tokens;
    std::vector<float> top_values(num_top);
    std::vector<int64_t> top_ids(num_top);
    for (int64_t g = first; g < last; ++g) {
      const int64_t begin = group_begin[g], n = group_begin[g + 1] - begin;
      const int64_t r0 = order[begin];
      group_u.resize(n);
      group_tokens.resize(n);
      for (int64_t j = 0; j < n; ++j) group_u[j] = u[order[begin + j]];
      const void* data = static_cast<const char*>(x.const_data_ptr()) + row[r0] * x.stride(0) * element_size;
      if (!sample_row(data, dtype, vocab, params[r0], group_u.data(), n, group_tokens.data(), workspace)) {
        int64_t expected = -1;
        failed.compare_exchange_strong(expected, row[r0]);
        continue;
      }
      for (int64_t j = 0; j < n; ++j) out[order[begin + j]] = group_tokens[j];
      if (!signals) continue;
      float lse = 0;
      row_signals(data, dtype, vocab, num_top, &lse, top_values.data(), top_ids.data(), workspace);
      double top_sum = 0;  // confidence = -(1/k) sum of the top-k logprobs
      for (int64_t i = 0; i < num_top; ++i) top_sum += static_cast<double>(top_values[i]) - lse;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = order[begin + j];
        logprob_out[r] = logit_at(data, dtype, group_tokens[j]) - lse;
        for (int64_t i = 0; i < num_top; ++i) {
          top_lp_out[r * num_top + i] = top_values[i] - lse;
          top_id_out[r * num_top + i] = top_ids[i];
        }
        if (num_top) confidence_out[r] = static_cast<float>(-top_sum / static_cast<double>(num_top));
      }
    }
  });
  TORCH_CHECK_VALUE(failed.load() < 0, "logits: row ", failed.load(),
                    " leaves no token to sample after temperature and filters (all -inf, or x / temperature "
                    "overflows)");
  return tokens;
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms, const std::optional<at::Tensor>& row_ids,
                      double temperature, const std::optional<at::Tensor>& row_temperature, int64_t top_k,
                      const std::optional<at::Tensor>& row_top_k, double top_p,
                      const std::optional<at::Tensor>& row_top_p, double min_p,
                      const std::optional<at::Tensor>& row_min_p) {
  return sample_impl(logits, uniforms, row_ids, temperature, row_temperature, top_k, row_top_k, top_p, row_top_p,
                     min_p, row_min_p, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_with_logprobs_cpu(
    const at::Tensor& logits, const at::Tensor& uniforms, const std::optional<at::Tensor>& row_ids,
    double temperature, const std::optional<at::Tensor>& row_temperature, int64_t top_k,
    const std::optional<at::Tensor>& row_top_k, double top_p, const std::optional<at::Tensor>& row_top_p,
    double min_p, const std::optional<at::Tensor>& row_min_p, int64_t num_top) {
  Signals signals;
  signals.k = num_top;
  at::Tensor tokens = sample_impl(logits, uniforms, row_ids, temperature, row_temperature, top_k, row_top_k, top_p,
                                  row_top_p, min_p, row_min_p, &signals);
  return {tokens, signals.logprobs, signals.top_logprobs, signals.top_ids, signals.confidence};
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) {
  m.impl("sample", &forkdec::cpu::sample_cpu);
  m.impl("sample_with_logprobs", &forkdec::cpu::sample_with_logprobs_cpu);
}
