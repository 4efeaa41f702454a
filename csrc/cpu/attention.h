// Attention over a paged KV cache on the CPU: flash attention with an fp32
// online softmax, cascades merged by LSE, state merging and KV appends.
// Torch-free: raw pointers and strides. Conventions: docs/attention.md.
//
// A work item is (level, request b, KV heads, block of query rows, KV chunk).
// Its rows are the request's qo_len queries times the g = Hq / Hkv query heads
// that share a KV head hk (row r = query r / g, head hk * g + r % g), so every
// key tile is read once for all of them:
//  - many rows (prefill, a shared prompt, a draft tree): the tile is packed
//    (fp32, K transposed) and register-blocked micro-kernels compute S = Q K^T
//    and O += P V (compute-bound);
//  - few rows (decode over a path's own tokens): K and V are read in place, and
//    one item takes every KV head of the request, reading its pages front to
//    back (bandwidth-bound).
// Long KV is split into chunks whose states (o, lse) are merged by LSE when
// there are fewer items than threads; cascade levels are merged the same way,
// in fp32, before the single rounding to q's dtype.
//
// Instruction sets: the AVX-512, AVX2+FMA or scalar kernels are chosen at run
// time by current_isa() (softmax.h), the one switch for every CPU kernel.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "cpu/softmax.h"  // Isa, DType, current_isa()

namespace forkdec::cpu {

// Runs body(worker) for every worker in [0, workers), possibly concurrently.
// An empty function runs them one after the other.
using ParallelRun = std::function<void(int64_t workers, const std::function<void(int64_t worker)>& body)>;

struct Threads {
  int64_t count = 1;  // workers to ask for; also steers how finely the KV is split
  ParallelRun run;
};

// q [total_q, Hq, D]: element strides; the last dimension is contiguous.
struct QueryView {
  const void* q = nullptr;
  int64_t total_q = 0, num_qo_heads = 0, head_dim = 0;
  int64_t stride_token = 0, stride_head = 0;
};

// k_cache, v_cache [num_pages, page_size, Hkv, D] (q's dtype): element strides,
// the last dimension contiguous.
struct KvCacheView {
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  int64_t num_pages = 0, page_size = 0, num_kv_heads = 0;
  int64_t k_stride_page = 0, k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_page = 0, v_stride_token = 0, v_stride_head = 0;
};

// One level of a cascade (a plain attention call is one level). Every array is
// int32 and already checked: indptrs start at 0, never decrease, qo_indptr ends
// at total_q, page ids are in range, last page lengths in [1, page_size] for
// requests with pages, and the mask holds sum(qo_len * kv_len) entries.
struct AttentionLevel {
  int64_t batch = 0;
  const int32_t* qo_indptr = nullptr;         // [batch + 1]
  const int32_t* kv_indptr = nullptr;         // [batch + 1]
  const int32_t* kv_indices = nullptr;        // [kv_indptr[batch]]
  const int32_t* kv_last_page_len = nullptr;  // [batch]
  bool causal = false;
  const uint8_t* custom_mask = nullptr;  // null, one byte per entry, or bit-packed
  bool mask_packed = false;              // little bit order: bit i is bit i % 8 of byte i / 8
};

// out [total_q, Hq, D] in q's dtype, contiguous; lse [total_q, Hq] fp32.
struct AttentionOutput {
  void* out = nullptr;
  float* lse = nullptr;
};

struct AttentionOptions {
  float sm_scale = 1.0f;  // multiplies the scores; lse includes it (natural log)
  int64_t kv_chunk = 0;   // > 0: split every request's KV into chunks of this many keys (tests)
};

// Attention of q over the union of its keys in levels[0..num_levels), each
// level an independent attention state, merged by LSE in fp32. A query that
// sees no key gets out 0 and lse -inf.
void attention(DType dtype, const QueryView& q, const KvCacheView& kv, const AttentionLevel* levels,
               int64_t num_levels, const AttentionOptions& options, const AttentionOutput& output,
               const Threads& threads = {});

// One attention state of T queries x H heads over some key set: o [T, H, D]
// (dtype, element strides, D contiguous) and lse [T, H] fp32 (element strides).
struct StateView {
  const void* o = nullptr;
  int64_t o_stride_token = 0, o_stride_head = 0;
  const float* lse = nullptr;
  int64_t lse_stride_token = 0, lse_stride_head = 0;
};

// Merges num_states states of the same queries over disjoint key sets into
// out [T, H, D] (dtype, contiguous) and lse_out [T, H]. States with lse -inf
// contribute nothing; all empty gives 0, -inf; a NaN lse gives 0, NaN.
void merge_states(DType dtype, const StateView* states, int64_t num_states, int64_t num_tokens, int64_t num_heads,
                  int64_t head_dim, void* out, float* lse_out, const Threads& threads = {});

// A cache written by append_kv: [num_pages, page_size, Hkv, D] with element
// strides, the last dimension contiguous.
struct AppendTarget {
  void* cache = nullptr;
  int64_t element_size = 0;  // bytes
  int64_t stride_page = 0, stride_token = 0, stride_head = 0;
};

// Writes k, v [N, Hkv, D] (contiguous, in each cache's element type) at
// slots[n] = page * page_size + offset, which must be in [0, num_pages * page_size).
void append_kv(const AppendTarget& k_cache, const AppendTarget& v_cache, int64_t page_size, int64_t num_kv_heads,
               int64_t head_dim, const void* k, const void* v, const int64_t* slots, int64_t num_tokens,
               const Threads& threads = {});

// Which kernels attention() runs now (current_isa(), as a name).
const char* attention_isa();

}  // namespace forkdec::cpu
