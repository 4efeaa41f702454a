// Schemas of every forkdec op. Kernels register their implementations per
// dispatch key next to the kernel (csrc/cpu/*_op.cpp, csrc/cuda/*_op.cpp);
// fake (meta) implementations for torch.compile live in python/forkdec/ops.
#include <torch/library.h>

TORCH_LIBRARY(forkdec, m) {
  // softmax(x / temperature) along `dim`, fp32 output, two passes over x.
  // row_temperature (fp32, one value per row of x.movedim(dim, -1)) replaces
  // the scalar temperature when given.
  m.def("softmax(Tensor x, int dim, float temperature, Tensor? row_temperature) -> Tensor");
  // Same semantics, the classic three passes (max, sum of exp, scale):
  // the control the two-pass kernel is benchmarked against.
  m.def("softmax_three_pass(Tensor x, int dim, float temperature, Tensor? row_temperature) -> Tensor");

  // Attention over a paged KV cache (conventions: docs/attention.md). Returns
  // out [total_q, Hq, D] in q's dtype and lse [total_q, Hq] fp32. custom_mask is
  // bool (one byte per entry) or bit-packed uint8 (little bit order).
  m.def("attention(Tensor q, Tensor qo_indptr, Tensor k_cache, Tensor v_cache, Tensor kv_indptr, "
        "Tensor kv_indices, Tensor kv_last_page_len, bool causal, Tensor? custom_mask, float sm_scale) "
        "-> (Tensor out, Tensor lse)");
  // Attention over the union of keys of several levels (one list entry per
  // level), merged by LSE in fp32 before the single rounding to q's dtype.
  m.def("cascade_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor[] qo_indptr, "
        "Tensor[] kv_indptr, Tensor[] kv_indices, Tensor[] kv_last_page_len, bool[] causal, "
        "Tensor?[] custom_mask, float sm_scale) -> (Tensor out, Tensor lse)");
  // Merge attention states over disjoint key sets: o [T, n, H, D], lse [T, n, H].
  m.def("merge_states(Tensor o, Tensor lse) -> (Tensor out, Tensor lse_out)");
  m.def("merge_state(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b) -> (Tensor out, Tensor lse_out)");
  // Write k, v [N, Hkv, D] at slots [N] (slot = page * page_size + offset).
  m.def("append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");

  // One token per output row r (int64 [R], R = uniforms.numel()) drawn from
  // logits[row_ids[r]] (logits [B, V]; row r when row_ids is None) with
  // uniforms[r] in [0, 1), after temperature, top-k, top-p and min-p
  // (semantics: docs/sampling.md). Each row_* tensor [R] replaces its scalar.
  m.def("sample(Tensor logits, Tensor uniforms, Tensor? row_ids, float temperature, Tensor? row_temperature, "
        "int top_k, Tensor? row_top_k, float top_p, Tensor? row_top_p, float min_p, Tensor? row_min_p) -> Tensor");
  // sample, plus per output row the token's logprob under the unfiltered
  // temperature-1 distribution (fp32 [R]), the num_top largest logprobs and
  // their ids ([R, num_top], descending, ties by lower id) and the confidence
  // -mean(top logprobs) (fp32 [R]; NaN when num_top = 0).
  m.def("sample_with_logprobs(Tensor logits, Tensor uniforms, Tensor? row_ids, float temperature, "
        "Tensor? row_temperature, int top_k, Tensor? row_top_k, float top_p, Tensor? row_top_p, float min_p, "
        "Tensor? row_min_p, int num_top) -> (Tensor tokens, Tensor logprobs, Tensor top_logprobs, "
        "Tensor top_ids, Tensor confidence)");

  // Greedy verification of a ragged batch of draft trees (docs/speculative.md):
  // target_logits [N + B, V], request b's rows start at tree_indptr[b] + b.
  // Returns accepted_tokens [B, max_depth + 1], accepted_nodes [B, max_depth],
  // num_accepted [B], bonus_token [B], all int32.
  m.def("verify_tree_greedy(Tensor draft_tokens, Tensor parents, Tensor tree_indptr, Tensor target_logits, "
        "int max_depth) -> (Tensor accepted_tokens, Tensor accepted_nodes, Tensor num_accepted, "
        "Tensor bonus_token)");
  // SpecInfer multi-step speculative sampling with the given float64 uniforms
  // [N + B]. draft_probs uses the target's row layout when
  // draft_rows_match_target, else request b's rows start at tree_indptr[b]
  // (the [B, L, V] layout of a chain).
  m.def("verify_tree_sampling(Tensor draft_tokens, Tensor parents, Tensor tree_indptr, Tensor draft_probs, "
        "Tensor target_probs, Tensor uniforms, int max_depth, bool draft_rows_match_target) -> "
        "(Tensor accepted_tokens, Tensor accepted_nodes, Tensor num_accepted, Tensor bonus_token)");

  // XQuant attention (docs/xquant.md): K = RoPE(X̂k·wk + bk), V = X̂v·wv + bv
  // rematerialized from cached X pages. xk / xv: quantized pages (codes uint8
  // [P, groups, group_size * bits / 8] with fp16 xk_scale / xk_zero [P, groups];
  // axis 0 = token groups, 1 = channel groups) or, with scale and zero None,
  // float pages [P, page_size, W]. Returns out [total_q, Hq, D] in q's dtype and
  // lse [total_q, Hq] fp32.
  m.def("xquant_attention(Tensor q, Tensor qo_indptr, Tensor xk, Tensor? xk_scale, Tensor? xk_zero, int xk_bits, "
        "int xk_group_size, int xk_axis, int xk_width, Tensor xv, Tensor? xv_scale, Tensor? xv_zero, int xv_bits, "
        "int xv_group_size, int xv_axis, int xv_width, int page_size, Tensor kv_indptr, Tensor kv_indices, "
        "Tensor kv_last_page_len, Tensor kv_start_pos, Tensor wk, Tensor wv, Tensor? bk, Tensor? bv, "
        "Tensor rope_cos, Tensor rope_sin, bool causal, Tensor? custom_mask, float sm_scale) "
        "-> (Tensor out, Tensor lse)");

  // Fused decoder-layer elementwise ops (docs/models.md), math in fp32, one
  // rounding to x's dtype. rms_norm: x / sqrt(mean(x^2) + eps) * weight over the
  // last dim. add_rms_norm: sum = x + residual (rounded), out = rms_norm(sum).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor out, Tensor sum)");
  // Rotate-half RoPE of the q/k heads of qkv [T, (Hq + 2 Hkv) * D] (cos, sin fp32
  // [T, D/2]), split into contiguous q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D].
  m.def("rope_qkv(Tensor qkv, Tensor cos, Tensor sin, int num_q_heads, int num_kv_heads) "
        "-> (Tensor q, Tensor k, Tensor v)");
  // silu(x[..., :I]) * x[..., I:] for x [..., 2I].
  m.def("silu_and_mul(Tensor x) -> Tensor");

  // Linear layer on GGUF block-quantized weights packed by forkdec.ops.qlinear
  // (layout: csrc/cpu/qlinear.h): x [..., k] -> [..., N] in out_dtype (x's dtype
  // when None). bits 4 (Q4_0, Q4_1) or 8 (Q8_0); bias fp32-convertible [N].
  // The decoder layers of a Llama-family model for one step on a paged KV cache
  // with cascade attention (csrc/cpu/llama_layers_op.cpp): x [T, hidden] ->
  // (x, residual) before the final norm. Semantics: LlamaModel.forward's loop.
  m.def("llama_layers(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, int[] qbits, int num_q_heads, "
        "int num_kv_heads, float eps, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slots, "
        "Tensor[] qo_indptr, Tensor[] kv_indptr, Tensor[] kv_indices, Tensor[] kv_last_page_len, bool[] causal, "
        "Tensor?[] custom_mask, float sm_scale) -> (Tensor x, Tensor residual)");
  m.def("qlinear(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int k, int n, Tensor? bias, "
        "ScalarType? out_dtype) -> Tensor");
}
