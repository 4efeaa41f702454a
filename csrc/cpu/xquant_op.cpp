// torch.ops.forkdec.xquant_attention on CPU tensors: argument
// checks (everything the torch-free kernel in xquant.cpp relies on to stay in
// bounds, so a direct torch.ops call never reads outside its tensors), views,
// and at::parallel_for as the thread runner.
//
// q is converted to fp32 here and out rounded back to q's dtype here (both
// tiny next to the rematerialization), so the kernel only sees fp32 queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/xquant.h"

namespace forkdec::cpu {
namespace {

constexpr const char* kOp = "forkdec::xquant_attention";

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), kOp, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// A 1-D int32/int64 tensor as contiguous int32 (values must fit).
at::Tensor int32_vector(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1, kOp, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, kOp, ": ", name,
              " must be int32 (or int64), got ", t.scalar_type());
  if (t.scalar_type() == at::kLong && t.numel() > 0) {
    const auto lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
    TORCH_CHECK(lo >= std::numeric_limits<int32_t>::min() && hi <= std::numeric_limits<int32_t>::max(), kOp, ": ",
                name, " has values that do not fit in int32");
  }
  return t.to(at::kInt).contiguous();
}

void check_indptr(const at::Tensor& t, int64_t length, int64_t end, const char* name) {
  TORCH_CHECK(t.numel() >= 1 && (length < 0 || t.numel() == length), kOp, ": ", name, " must have ",
              length < 0 ? std::string("at least one") : std::to_string(length), " entries, got ", t.numel());
  const int32_t* p = t.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0, kOp, ": ", name, " must start at 0, got ", p[0]);
  for (int64_t i = 1; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] >= p[i - 1], kOp, ": ", name, " must be non-decreasing (entry ", i, ")");
  }
  TORCH_CHECK(p[t.numel() - 1] <= end, kOp, ": ", name, " ends at ", p[t.numel() - 1], ", past the ", end,
              " entries it indexes");
}

// One X store, checked; the view points into `keep`.
struct CheckedPages {
  at::Tensor data, scale, zero;
  XPagesView view;
};

CheckedPages check_pages(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size, int64_t axis,
                         int64_t width, int64_t page_size, const std::string& name) {
  check_cpu(x, name.c_str());
  CheckedPages c;
  XPagesView& v = c.view;
  v.width = width;
  TORCH_CHECK(width > 0, kOp, ": ", name, "_width must be positive, got ", width);
  const bool quantized = scale.has_value() && scale->defined();
  TORCH_CHECK(quantized == (zero.has_value() && zero->defined()), kOp, ": ", name,
              "_scale and ", name, "_zero must both be given (quantized pages) or both be None (float pages)");
  if (!quantized) {
    TORCH_CHECK(x.dim() == 3 && is_float_type(x.scalar_type()), kOp, ": ", name,
                " (float pages) must be a float32/float16/bfloat16 [num_pages, page_size, W] tensor, got ",
                x.scalar_type(), " ", x.sizes());
    TORCH_CHECK(x.size(1) == page_size && x.size(2) == width, kOp, ": ", name, " shape ", x.sizes(),
                " must be [num_pages, ", page_size, ", ", width, "]");
    c.data = x.size(2) > 1 && x.stride(2) != 1 ? x.contiguous() : x;
    v.quantized = false;
    v.data = c.data.data_ptr();
    v.dtype = x.scalar_type() == at::kHalf ? DType::f16 : x.scalar_type() == at::kBFloat16 ? DType::bf16 : DType::f32;
    v.stride_page = c.data.stride(0);
    v.stride_token = c.data.stride(1);
    return c;
  }
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, kOp, ": ", name, "_bits must be 2, 3, 4 or 8, got ",
              bits);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, kOp, ": ", name,
              "_group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(axis == 0 || axis == 1, kOp, ": ", name, "_axis must be 0 (token) or 1 (channel), got ", axis);
  TORCH_CHECK(axis == 0 ? width % group_size == 0 : page_size % group_size == 0, kOp, ": ", name,
              axis == 0 ? "_width" : " page_size", " must be a multiple of group_size ", group_size);
  const int64_t groups = page_size * width / group_size, bytes = group_size * bits / 8;
  TORCH_CHECK(x.scalar_type() == at::kByte && x.dim() == 3 && x.size(1) == groups && x.size(2) == bytes, kOp, ": ",
              name, " (codes) must be uint8 [num_pages, ", groups, ", ", bytes, "], got ", x.scalar_type(), " ",
              x.sizes());
  for (const auto& [t, suffix] : {std::pair{&*scale, "_scale"}, {&*zero, "_zero"}}) {
    check_cpu(*t, (name + suffix).c_str());
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == groups,
                kOp, ": ", name, suffix, " must be float16 [", x.size(0), ", ", groups, "], got ", t->scalar_type(),
                " ", t->sizes());
  }
  c.data = x.contiguous();
  c.scale = scale->contiguous();
  c.zero = zero->contiguous();
  v.quantized = true;
  v.codes = c.data.data_ptr<uint8_t>();
  v.scale = reinterpret_cast<const uint16_t*>(c.scale.data_ptr<at::Half>());
  v.zero = reinterpret_cast<const uint16_t*>(c.zero.data_ptr<at::Half>());
  v.bits = static_cast<int>(bits);
  v.group_size = group_size;
  v.channel_axis = axis == 1;
  return c;
}

// A small fp32 parameter, contiguous (a copy only when needed).
at::Tensor f32(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.is_floating_point(), kOp, ": ", name, " must be a float tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> xquant_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& qo_indptr_in, const at::Tensor& xk, const std::optional<at::Tensor>& xk_scale,
    const std::optional<at::Tensor>& xk_zero, int64_t xk_bits, int64_t xk_group_size, int64_t xk_axis,
    int64_t xk_width, const at::Tensor& xv, const std::optional<at::Tensor>& xv_scale,
    const std::optional<at::Tensor>& xv_zero, int64_t xv_bits, int64_t xv_group_size, int64_t xv_axis,
    int64_t xv_width, int64_t page_size, const at::Tensor& kv_indptr_in, const at::Tensor& kv_indices_in,
    const at::Tensor& kv_last_page_len_in, const at::Tensor& kv_start_pos_in, const at::Tensor& wk_in,
    const at::Tensor& wv_in, const std::optional<at::Tensor>& bk_in, const std::optional<at::Tensor>& bv_in,
    const at::Tensor& rope_cos_in, const at::Tensor& rope_sin_in, bool causal,
    const std::optional<at::Tensor>& custom_mask, double sm_scale) {
  check_cpu(q_in, "q");
  TORCH_CHECK(q_in.dim() == 3 && is_float_type(q_in.scalar_type()), kOp,
              ": q must be a float32/float16/bfloat16 [total_q, Hq, D] tensor, got ", q_in.scalar_type(), " ",
              q_in.sizes());
  const int64_t total_q = q_in.size(0), hq = q_in.size(1), d = q_in.size(2);
  TORCH_CHECK(d == 32 || d == 64 || d == 96 || d == 128 || d == 256, kOp, ": head dim ", d,
              " is not supported; expected 32, 64, 96, 128 or 256");
  TORCH_CHECK(page_size > 0, kOp, ": page_size must be positive, got ", page_size);
  TORCH_CHECK(std::isfinite(sm_scale), kOp, ": sm_scale must be finite, got ", sm_scale);
  const CheckedPages pk = check_pages(xk, xk_scale, xk_zero, xk_bits, xk_group_size, xk_axis, xk_width, page_size, "xk");
  const CheckedPages pv = check_pages(xv, xv_scale, xv_zero, xv_bits, xv_group_size, xv_axis, xv_width, page_size, "xv");
  const int64_t num_pages = xk.size(0);
  TORCH_CHECK(xv.size(0) == num_pages, kOp, ": xv has ", xv.size(0), " pages, xk ", num_pages);

  const at::Tensor wk = f32(wk_in, "wk"), wv = f32(wv_in, "wv");
  TORCH_CHECK(wk.dim() == 2 && wk.size(0) == xk_width && wk.size(1) > 0 && wk.size(1) % d == 0, kOp,
              ": wk must be [", xk_width, ", Hkv * ", d, "], got ", wk.sizes());
  const int64_t hkv = wk.size(1) / d;
  TORCH_CHECK(wv.dim() == 2 && wv.size(0) == xv_width && wv.size(1) == wk.size(1), kOp, ": wv must be [", xv_width,
              ", ", wk.size(1), "], got ", wv.sizes());
  TORCH_CHECK(hq > 0 && hq % hkv == 0, kOp, ": Hq = ", hq, " must be a positive multiple of Hkv = ", hkv);
  at::Tensor bk, bv;
  if (bk_in.has_value() && bk_in->defined()) {
    bk = f32(*bk_in, "bk");
    TORCH_CHECK(bk.dim() == 1 && bk.size(0) == hkv * d, kOp, ": bk must be [", hkv * d, "], got ", bk.sizes());
  }
  if (bv_in.has_value() && bv_in->defined()) {
    bv = f32(*bv_in, "bv");
    TORCH_CHECK(bv.dim() == 1 && bv.size(0) == hkv * d, kOp, ": bv must be [", hkv * d, "], got ", bv.sizes());
  }
  const at::Tensor cos = f32(rope_cos_in, "rope_cos"), sin = f32(rope_sin_in, "rope_sin");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == d && sin.sizes() == cos.sizes(), kOp,
              ": rope_cos and rope_sin must both be [max_pos, ", d, "], got ", cos.sizes(), " and ", sin.sizes());
  const int64_t max_pos = cos.size(0);

  // The page table (the checks of attention_op.cpp's check_level).
  const at::Tensor qo_indptr = int32_vector(qo_indptr_in, "qo_indptr");
  check_indptr(qo_indptr, -1, total_q, "qo_indptr");
  const int64_t batch = qo_indptr.numel() - 1;
  const int32_t* qo = qo_indptr.data_ptr<int32_t>();
  TORCH_CHECK(qo[batch] == total_q, kOp, ": qo_indptr ends at ", qo[batch], ", q has ", total_q, " rows");
  const at::Tensor kv_indices = int32_vector(kv_indices_in, "kv_indices");
  const at::Tensor kv_indptr = int32_vector(kv_indptr_in, "kv_indptr");
  check_indptr(kv_indptr, batch + 1, kv_indices.numel(), "kv_indptr");
  const int32_t* indptr = kv_indptr.data_ptr<int32_t>();
  const int32_t* pages = kv_indices.data_ptr<int32_t>();
  for (int64_t i = 0; i < indptr[batch]; ++i) {
    TORCH_CHECK(pages[i] >= 0 && pages[i] < num_pages, kOp, ": kv_indices[", i, "] = ", pages[i],
                " is not a page id in [0, ", num_pages, ")");
  }
  const at::Tensor last_t = int32_vector(kv_last_page_len_in, "kv_last_page_len");
  TORCH_CHECK(last_t.numel() == batch, kOp, ": kv_last_page_len must have ", batch, " entries, got ", last_t.numel());
  const at::Tensor start_t = int32_vector(kv_start_pos_in, "kv_start_pos");
  TORCH_CHECK(start_t.numel() == batch, kOp, ": kv_start_pos must have ", batch, " entries, got ", start_t.numel());
  const int32_t* last = last_t.data_ptr<int32_t>();
  const int32_t* start = start_t.data_ptr<int32_t>();
  int64_t mask_entries = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = indptr[b + 1] - indptr[b];
    if (n > 0) {
      TORCH_CHECK(last[b] >= 1 && last[b] <= page_size, kOp, ": kv_last_page_len[", b, "] = ", last[b],
                  " must be in [1, page_size = ", page_size, "] for a request with pages");
    }
    const int64_t kv_len = n == 0 ? 0 : (n - 1) * page_size + last[b];
    TORCH_CHECK(start[b] >= 0 && start[b] + kv_len <= max_pos, kOp, ": kv_start_pos[", b, "] = ", start[b],
                " puts the request's ", kv_len, " keys outside the RoPE table [0, ", max_pos, ")");
    mask_entries += static_cast<int64_t>(qo[b + 1] - qo[b]) * kv_len;
  }
  at::Tensor mask;
  XQuantProblem p;
  AttentionLevel& lv = p.level;
  if (custom_mask.has_value() && custom_mask->defined()) {
    check_cpu(*custom_mask, "custom_mask");
    const bool packed = custom_mask->scalar_type() == at::kByte;
    TORCH_CHECK(packed || custom_mask->scalar_type() == at::kBool, kOp,
                ": custom_mask must be bool or bit-packed uint8, got ", custom_mask->scalar_type());
    const int64_t want = packed ? (mask_entries + 7) / 8 : mask_entries;
    TORCH_CHECK(custom_mask->numel() == want, kOp, ": custom_mask has ", custom_mask->numel(), " entries, expected ",
                want, packed ? " bytes (sum(qo_len * kv_len) bits)" : " (sum(qo_len * kv_len))");
    mask = custom_mask->contiguous();
    lv.custom_mask = mask.numel() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
    lv.mask_packed = packed;
  }
  lv.batch = batch;
  lv.qo_indptr = qo;
  lv.kv_indptr = indptr;
  lv.kv_indices = pages;
  lv.kv_last_page_len = last;
  lv.causal = causal;

  const at::Tensor q = q_in.to(at::kFloat);
  const at::Tensor qc = d > 1 && q.stride(2) != 1 ? q.contiguous() : q;
  p.q = qc.data_ptr<float>();
  p.total_q = total_q;
  p.num_qo_heads = hq;
  p.head_dim = d;
  p.q_stride_token = qc.stride(0);
  p.q_stride_head = qc.stride(1);
  p.num_kv_heads = hkv;
  p.num_pages = num_pages;
  p.page_size = page_size;
  p.xk = pk.view;
  p.xv = pv.view;
  // The same store for K and V (raw X): its tiles are dequantized once.
  p.v_is_k = pk.data.data_ptr() == pv.data.data_ptr() && pk.view.quantized == pv.view.quantized &&
             pk.view.width == pv.view.width && pk.view.scale == pv.view.scale && pk.view.zero == pv.view.zero &&
             pk.view.bits == pv.view.bits && pk.view.group_size == pv.view.group_size &&
             pk.view.channel_axis == pv.view.channel_axis && pk.view.dtype == pv.view.dtype &&
             pk.view.stride_page == pv.view.stride_page && pk.view.stride_token == pv.view.stride_token;
  p.wk = wk.data_ptr<float>();
  p.wv = wv.data_ptr<float>();
  p.bk = bk.defined() ? bk.data_ptr<float>() : nullptr;
  p.bv = bv.defined() ? bv.data_ptr<float>() : nullptr;
  p.rope_cos = cos.data_ptr<float>();
  p.rope_sin = sin.data_ptr<float>();
  p.max_pos = max_pos;
  p.kv_start_pos = start;
  p.sm_scale = static_cast<float>(sm_scale);

  at::Tensor out = at::empty({total_q, hq, d}, q_in.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({total_q, hq}, q_in.options().dtype(at::kFloat));
  Threads threads;
  threads.count = at::in_parallel_region() ? 1 : at::get_num_threads();
  threads.run = [](int64_t workers, const std::function<void(int64_t)>& body) {
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) body(w);
    });
  };
  if (out.numel() > 0) xquant_attention(p, out.data_ptr<float>(), lse.data_ptr<float>(), threads);
  return {q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type()), lse};
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) { m.impl("xquant_attention", &forkdec::cpu::xquant_attention_cpu); }
