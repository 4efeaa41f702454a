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
#include <optional>
#include <string>
#include <tuple>

#include "cpu/op_checks.h"
#include "cpu/xquant.h"

namespace forkdec::cpu {
namespace {

using namespace checks;

constexpr const char* kName = "xquant_attention";  // for the shared checks, which prefix "forkdec::"
constexpr const char* kOp = "forkdec::xquant_attention";

// One X store, checked; the view points into `keep`.
struct CheckedPages {
  at::Tensor data, scale, zero;
  XPagesView view;
};

CheckedPages check_pages(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size, int64_t axis,
                         int64_t width, int64_t page_size, const std::string& name) {
  check_cpu(x, kName, name.c_str());
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
    check_cpu(*t, kName, name + suffix);
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
  check_cpu(t, kName, name);
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
  check_cpu(q_in, kName, "q");
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

  // The page table and mask: attention's checks, plus RoPE positions per request.
  const int64_t max_pos = cos.size(0);
  const CheckedLevel checked = check_level(qo_indptr_in, kv_indptr_in, kv_indices_in, kv_last_page_len_in, causal,
                                           custom_mask, total_q, num_pages, page_size, kName, "");
  const AttentionLevel& lv = checked.level;
  const at::Tensor start_t = int32_vector(kv_start_pos_in, kName, "kv_start_pos");
  TORCH_CHECK(start_t.numel() == lv.batch, kOp, ": kv_start_pos must have ", lv.batch, " entries, got ",
              start_t.numel());
  const int32_t* start = start_t.data_ptr<int32_t>();
  for (int64_t b = 0; b < lv.batch; ++b) {
    const int64_t n = lv.kv_indptr[b + 1] - lv.kv_indptr[b];
    const int64_t kv_len = n == 0 ? 0 : (n - 1) * page_size + lv.kv_last_page_len[b];
    TORCH_CHECK(start[b] >= 0 && start[b] + kv_len <= max_pos, kOp, ": kv_start_pos[", b, "] = ", start[b],
                " puts the request's ", kv_len, " keys outside the RoPE table [0, ", max_pos, ")");
  }
  XQuantProblem p;
  p.level = lv;

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
  if (out.numel() > 0) xquant_attention(p, out.data_ptr<float>(), lse.data_ptr<float>(), torch_threads());
  return {q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type()), lse};
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) { m.impl("xquant_attention", &forkdec::cpu::xquant_attention_cpu); }
