// XQuant attention on the CPU (arXiv 2508.10395): attention over keys and
// values rematerialized from cached X̂ pages (docs/xquant.md). Torch-free: raw
// pointers and strides; conventions of docs/attention.md.
//
// A work item is (request b, a run of its pages). For every tile of up to
// kTileKeys keys of the run it
//   1. dequantizes X̂k (and X̂v, unless it is the same store) to fp32 rows, ONCE
//      for all the request's queries and heads: a prompt shared by 64 paths is
//      one request with 64 query rows, so each page is rematerialized once;
//   2. K = X̂k·wk + bk for all KV heads (one GEMM), RoPE at the tokens' positions;
//   3. per KV head: S = Q K^T for the g = Hq / Hkv query heads of every query,
//      masked online softmax (fp32, log2 domain);
//   4. accumulates either P·X̂v ([rows, Wv]; wv and bv applied once at the end,
//      V never materialized) or P·V with V = X̂v·wv + bv per tile, whichever
//      costs fewer FLOPs: rows·Wv per key against (Wv + rows)·D per key and head.
// Requests with more keys than there are threads to keep busy are split into
// runs whose states (o, lse) are merged by LSE.
//
// The GEMMs run on a register-blocked micro-kernel written once with GCC vector
// types and compiled three times (scalar, AVX2+FMA, AVX-512), chosen at run
// time by current_isa() (softmax.h) like every CPU kernel.
#pragma once

#include <cstdint>

#include "cpu/attention.h"  // Threads, AttentionLevel

namespace forkdec::cpu {

// One store of cached X: quantized pages (codes + fp16 scale/zero per group, the
// layout of forkdec.xquant.QuantizedPages) or float pages [num_pages, page_size, W].
struct XPagesView {
  bool quantized = false;
  int64_t width = 0;
  // quantized: codes uint8 [num_pages, groups, group_size * bits / 8], scale and
  // zero fp16 bits [num_pages, groups], all contiguous; groups = page_size * W / group_size.
  const uint8_t* codes = nullptr;
  const uint16_t* scale = nullptr;
  const uint16_t* zero = nullptr;
  int bits = 0;            // 2, 3, 4 or 8
  int64_t group_size = 0;  // 32, 64 or 128
  bool channel_axis = false;  // groups span group_size tokens of one channel
  // float pages: element strides, W contiguous.
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t stride_page = 0, stride_token = 0;
};

struct XQuantProblem {
  // q [total_q, Hq, D] fp32, element strides, D contiguous (RoPE already applied).
  const float* q = nullptr;
  int64_t total_q = 0, num_qo_heads = 0, head_dim = 0, q_stride_token = 0, q_stride_head = 0;
  int64_t num_kv_heads = 0, num_pages = 0, page_size = 0;
  XPagesView xk, xv;
  bool v_is_k = false;  // xv is the very same store as xk: dequantize once
  // wk [Wk, Hkv*D], wv [Wv, Hkv*D] fp32 contiguous; bk, bv [Hkv*D] or null.
  const float* wk = nullptr;
  const float* wv = nullptr;
  const float* bk = nullptr;
  const float* bv = nullptr;
  // rope_cos, rope_sin [max_pos, D] fp32 contiguous, rotate-half layout.
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
  int64_t max_pos = 0;
  // The page table, causal flag and mask (checked as for attention()), plus
  // kv_start_pos [batch]: position of each request's first key, with
  // kv_start_pos[b] + kv_len(b) <= max_pos.
  AttentionLevel level;
  const int32_t* kv_start_pos = nullptr;
  float sm_scale = 1.0f;
  int64_t kv_chunk_pages = 0;  // > 0: split every request into runs of this many pages (tests)
  // Optional (tests): incremented atomically once per page dequantized, per store
  // (a page of a raw-X store read for K and V counts once).
  int64_t* pages_dequantized = nullptr;
};

// out [total_q, Hq, D] fp32 contiguous, lse [total_q, Hq] fp32 (natural log,
// sm_scale included). A query that sees no key gets out 0 and lse -inf.
void xquant_attention(const XQuantProblem& p, float* out, float* lse, const Threads& threads = {});

// Dequantizes `count` pages (page ids) of a store into fp32 rows [count * page_size, W].
void xquant_dequantize_pages(const XPagesView& x, int64_t page_size, const int32_t* pages, int64_t count,
                             float* dst);

}  // namespace forkdec::cpu
