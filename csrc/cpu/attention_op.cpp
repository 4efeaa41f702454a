// torch.ops.forkdec attention ops on CPU tensors: argument checks (everything
// a kernel relies on to stay in bounds, so that a direct torch.ops call can
// never read or write outside its tensors), views of the tensors as raw
// pointers, and at::parallel_for as the kernels' thread runner. The
// arithmetic lives in the torch-free attention.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/attention.h"
#include "cpu/op_checks.h"

namespace forkdec::cpu {
namespace {

constexpr int64_t kHeadDims[] = {32, 64, 96, 128, 256};

using namespace checks;

// q and the caches, checked; views for the kernels.
struct CheckedInputs {
  at::Tensor q, k_cache, v_cache;
  QueryView q_view;
  KvCacheView kv_view;
};

CheckedInputs check_inputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double sm_scale,
                           const char* op) {
  check_cpu(q_in, op, "q");
  check_cpu(k_in, op, "k_cache");
  check_cpu(v_in, op, "v_cache");
  TORCH_CHECK(q_in.dim() == 3, "forkdec::", op, ": q must be [total_q, Hq, D], got shape ", q_in.sizes());
  TORCH_CHECK(is_float_type(q_in.scalar_type()), "forkdec::", op, ": q dtype ", q_in.scalar_type(),
              " is not supported; expected float32, float16 or bfloat16");
  TORCH_CHECK(k_in.dim() == 4, "forkdec::", op, ": k_cache must be [num_pages, page_size, Hkv, D], got shape ",
              k_in.sizes());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "forkdec::", op, ": v_cache shape ", v_in.sizes(),
              " must equal k_cache's ", k_in.sizes());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), "forkdec::", op,
              ": k_cache/v_cache dtypes ", k_in.scalar_type(), "/", v_in.scalar_type(), " must match q's ",
              q_in.scalar_type());
  const int64_t hq = q_in.size(1), d = q_in.size(2), hkv = k_in.size(2);
  bool known_dim = false;
  for (int64_t allowed : kHeadDims) known_dim |= d == allowed;
  TORCH_CHECK(known_dim, "forkdec::", op, ": head dim ", d, " is not supported; expected 32, 64, 96, 128 or 256");
  TORCH_CHECK(k_in.size(3) == d, "forkdec::", op, ": k_cache head dim ", k_in.size(3), " != q's ", d);
  TORCH_CHECK(hkv > 0 && hq > 0 && hq % hkv == 0, "forkdec::", op, ": Hq = ", hq, " must be a positive multiple of Hkv = ",
              hkv);
  TORCH_CHECK(k_in.size(1) > 0, "forkdec::", op, ": page_size must be positive");
  TORCH_CHECK(std::isfinite(sm_scale), "forkdec::", op, ": sm_scale must be finite, got ", sm_scale);

  CheckedInputs c;
  c.q = unit_last_stride(q_in);
  c.k_cache = unit_last_stride(k_in);
  c.v_cache = unit_last_stride(v_in);
  c.q_view.q = c.q.data_ptr();
  c.q_view.total_q = c.q.size(0);
  c.q_view.num_qo_heads = hq;
  c.q_view.head_dim = d;
  c.q_view.stride_token = c.q.stride(0);
  c.q_view.stride_head = c.q.stride(1);
  KvCacheView& kv = c.kv_view;
  kv.k_cache = c.k_cache.data_ptr();
  kv.v_cache = c.v_cache.data_ptr();
  kv.num_pages = k_in.size(0);
  kv.page_size = k_in.size(1);
  kv.num_kv_heads = hkv;
  kv.k_stride_page = c.k_cache.stride(0);
  kv.k_stride_token = c.k_cache.stride(1);
  kv.k_stride_head = c.k_cache.stride(2);
  kv.v_stride_page = c.v_cache.stride(0);
  kv.v_stride_token = c.v_cache.stride(1);
  kv.v_stride_head = c.v_cache.stride(2);
  return c;
}

std::tuple<at::Tensor, at::Tensor> run(const CheckedInputs& in, const std::vector<AttentionLevel>& levels,
                                       double sm_scale) {
  at::Tensor out = at::empty(in.q.sizes(), in.q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({in.q.size(0), in.q.size(1)}, in.q.options().dtype(at::kFloat));
  AttentionOptions options;
  options.sm_scale = static_cast<float>(sm_scale);
  attention(dtype_of(in.q.scalar_type()), in.q_view, in.kv_view, levels.data(), static_cast<int64_t>(levels.size()),
            options, AttentionOutput{out.data_ptr(), lse.data_ptr<float>()}, torch_threads());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& qo_indptr,
                                                 const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                 const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                                                 const at::Tensor& kv_last_page_len, bool causal,
                                                 const std::optional<at::Tensor>& custom_mask, double sm_scale) {
  const char* op = "attention";
  const CheckedInputs in = check_inputs(q, k_cache, v_cache, sm_scale, op);
  const CheckedLevel level = check_level(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, causal, custom_mask,
                                         in.q_view.total_q, in.kv_view.num_pages, in.kv_view.page_size, op, "");
  return run(in, {level.level}, sm_scale);
}

std::tuple<at::Tensor, at::Tensor> cascade_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::TensorList qo_indptr,
    at::TensorList kv_indptr, at::TensorList kv_indices, at::TensorList kv_last_page_len,
    const c10::List<bool>& causal, const c10::List<std::optional<at::Tensor>>& custom_mask, double sm_scale) {
  const char* op = "cascade_attention";
  const size_t n = qo_indptr.size();
  TORCH_CHECK(n >= 1, "forkdec::", op, ": needs at least one level");
  TORCH_CHECK(kv_indptr.size() == n && kv_indices.size() == n && kv_last_page_len.size() == n &&
                  causal.size() == n && custom_mask.size() == n,
              "forkdec::", op, ": every per-level list must have ", n, " entries (qo_indptr has ", n,
              "; kv_indptr ", kv_indptr.size(), ", kv_indices ", kv_indices.size(), ", kv_last_page_len ",
              kv_last_page_len.size(), ", causal ", causal.size(), ", custom_mask ", custom_mask.size(), ")");
  const CheckedInputs in = check_inputs(q, k_cache, v_cache, sm_scale, op);
  std::vector<CheckedLevel> checked;
  checked.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    checked.push_back(check_level(qo_indptr[i], kv_indptr[i], kv_indices[i], kv_last_page_len[i], causal.get(i),
                                  custom_mask.get(i), in.q_view.total_q, in.kv_view.num_pages, in.kv_view.page_size,
                                  op, "levels[" + std::to_string(i) + "]."));
  }
  std::vector<AttentionLevel> levels;
  for (const CheckedLevel& c : checked) levels.push_back(c.level);
  return run(in, levels, sm_scale);
}

// The states of merge_states / merge_state as views: o's last dimension contiguous, lse fp32.
void check_state_dtype(const at::Tensor& o, const char* op, const char* name) {
  TORCH_CHECK(is_float_type(o.scalar_type()), "forkdec::", op, ": ", name, " dtype ", o.scalar_type(),
              " is not supported; expected float32, float16 or bfloat16");
}

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& o_in, const at::Tensor& lse_in) {
  const char* op = "merge_states";
  check_cpu(o_in, op, "o");
  check_cpu(lse_in, op, "lse");
  TORCH_CHECK(o_in.dim() == 4, "forkdec::", op, ": o must be [T, n, H, D], got shape ", o_in.sizes());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == o_in.sizes().slice(0, 3), "forkdec::", op,
              ": lse must be [T, n, H] = ", o_in.sizes().slice(0, 3), ", got shape ", lse_in.sizes());
  check_state_dtype(o_in, op, "o");
  TORCH_CHECK(lse_in.is_floating_point(), "forkdec::", op, ": lse must be a float tensor, got ", lse_in.scalar_type());
  const at::Tensor o = unit_last_stride(o_in);
  const at::Tensor lse = lse_in.to(at::kFloat);
  const int64_t t = o.size(0), n = o.size(1), h = o.size(2), d = o.size(3);
  at::Tensor out = at::empty({t, h, d}, o.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse_out = at::empty({t, h}, o.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse_out.numel() == 0) return {out, lse_out};
  std::vector<StateView> states(static_cast<size_t>(n));
  const int64_t es = o.element_size();
  for (int64_t k = 0; k < n; ++k) {
    StateView& s = states[k];
    s.o = static_cast<const char*>(o.data_ptr()) + k * o.stride(1) * es;
    s.o_stride_token = o.stride(0);
    s.o_stride_head = o.stride(2);
    s.lse = lse.data_ptr<float>() + k * lse.stride(1);
    s.lse_stride_token = lse.stride(0);
    s.lse_stride_head = lse.stride(2);
  }
  merge_states(dtype_of(o.scalar_type()), states.data(), n, t, h, d, out.data_ptr(), lse_out.data_ptr<float>(),
               torch_threads());
  return {out, lse_out};
}

std::tuple<at::Tensor, at::Tensor> merge_state_cpu(const at::Tensor& o_a, const at::Tensor& lse_a,
                                                   const at::Tensor& o_b, const at::Tensor& lse_b) {
  const char* op = "merge_state";
  for (const auto& [t, name] : {std::pair{&o_a, "o_a"}, {&lse_a, "lse_a"}, {&o_b, "o_b"}, {&lse_b, "lse_b"}}) {
    check_cpu(*t, op, name);
  }
  TORCH_CHECK(o_a.dim() == 3, "forkdec::", op, ": o_a must be [T, H, D], got shape ", o_a.sizes());
  TORCH_CHECK(o_b.sizes() == o_a.sizes(), "forkdec::", op, ": o_b shape ", o_b.sizes(), " must equal o_a's ",
              o_a.sizes());
  for (const auto& [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}}) {
    TORCH_CHECK(t->sizes() == o_a.sizes().slice(0, 2), "forkdec::", op, ": ", name, " must be [T, H] = ",
                o_a.sizes().slice(0, 2), ", got shape ", t->sizes());
    TORCH_CHECK(t->is_floating_point(), "forkdec::", op, ": ", name, " must be a float tensor");
  }
  check_state_dtype(o_a, op, "o_a");
  check_state_dtype(o_b, op, "o_b");
  // Mixed dtypes are merged in fp32, then rounded to o_a's dtype.
  const bool same = o_a.scalar_type() == o_b.scalar_type();
  const at::Tensor a = unit_last_stride(same ? o_a : o_a.to(at::kFloat));
  const at::Tensor b = unit_last_stride(same ? o_b : o_b.to(at::kFloat));
  const at::Tensor la = lse_a.to(at::kFloat), lb = lse_b.to(at::kFloat);
  const int64_t t = o_a.size(0), h = o_a.size(1), d = o_a.size(2);
  at::Tensor out = at::empty({t, h, d}, a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse_out = at::empty({t, h}, a.options().dtype(at::kFloat));
  if (out.numel() > 0 || lse_out.numel() > 0) {
    StateView states[2];
    for (int k = 0; k < 2; ++k) {
      const at::Tensor& o = k == 0 ? a : b;
      const at::Tensor& l = k == 0 ? la : lb;
      states[k] = StateView{o.data_ptr(), o.stride(0), o.stride(1), l.data_ptr<float>(), l.stride(0), l.stride(1)};
    }
    merge_states(dtype_of(a.scalar_type()), states, 2, t, h, d, out.data_ptr(), lse_out.data_ptr<float>(),
                 torch_threads());
  }
  return {same ? out : out.to(o_a.scalar_type()), lse_out};
}

void append_kv_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slots) {
  const char* op = "append_kv";
  for (const auto& [t, name] :
       {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k, "k"}, {&v, "v"}, {&slots, "slots"}}) {
    check_cpu(*t, op, name);
  }
  TORCH_CHECK(k_cache.dim() == 4, "forkdec::", op, ": k_cache must be [num_pages, page_size, Hkv, D], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "forkdec::", op, ": v_cache shape ", v_cache.sizes(),
              " must equal k_cache's ", k_cache.sizes());
  const int64_t num_pages = k_cache.size(0), page_size = k_cache.size(1), hkv = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == hkv && k.size(2) == d, "forkdec::", op, ": k must be [N, ", hkv, ", ", d,
              "], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "forkdec::", op, ": v shape ", v.sizes(), " must equal k's ", k.sizes());
  TORCH_CHECK(slots.dim() == 1 && slots.numel() == k.size(0), "forkdec::", op, ": slots must be [N = ", k.size(0),
              "], got shape ", slots.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong, "forkdec::", op,
              ": slots must be int32 or int64, got ", slots.scalar_type());
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK(d <= 1 || t->stride(3) == 1, "forkdec::", op, ": ", name,
                " must have a contiguous last dimension to be written in place");
  }
  const at::Tensor slot64 = slots.to(at::kLong).contiguous();
  const int64_t* s = slot64.data_ptr<int64_t>();
  const int64_t capacity = num_pages * page_size;
  for (int64_t i = 0; i < slot64.numel(); ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < capacity, "forkdec::", op, ": slots[", i, "] = ", s[i], " is not in [0, ",
                capacity, ")");
  }
  if (k.size(0) == 0 || hkv == 0 || d == 0) return;
  // The new rows in each cache's own dtype, contiguous.
  const at::Tensor k_rows = k.to(k_cache.scalar_type()).contiguous();
  const at::Tensor v_rows = v.to(v_cache.scalar_type()).contiguous();
  auto target = [](const at::Tensor& cache) {
    return AppendTarget{cache.data_ptr(), cache.element_size(), cache.stride(0), cache.stride(1), cache.stride(2)};
  };
  append_kv(target(k_cache), target(v_cache), page_size, hkv, d, k_rows.data_ptr(), v_rows.data_ptr(), s,
            k.size(0), torch_threads());
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) {
  m.impl("attention", &forkdec::cpu::attention_cpu);
  m.impl("cascade_attention", &forkdec::cpu::cascade_attention_cpu);
  m.impl("merge_states", &forkdec::cpu::merge_states_cpu);
  m.impl("merge_state", &forkdec::cpu::merge_state_cpu);
  m.impl("append_kv", &forkdec::cpu::append_kv_cpu);
}
