// Speculative verification of draft token trees on the CPU (torch-free).
// Semantics, layouts and the exact arithmetic every backend shares are in
// docs/speculative.md and python/forkdec/reference/speculative.py:
//
//  - a batch of B trees: tokens[N], parents[N] (local index, -1 = the root,
//    parents[i] < i), indptr[B+1];
//  - target rows [N + B, V]: request b's block starts at row indptr[b] + b;
//    row 0 follows the root, row 1 + i follows node i;
//  - uniforms [N + B] (float64, the same block layout): entry 0 draws the
//    bonus token, entry 1 + i tests node i.
//
// The functions handle the requests [begin, end) so that the caller can spread
// requests over threads; they allocate their own scratch.
#pragma once

#include <cstdint>

#include "cpu/softmax.h"  // DType

namespace forkdec::cpu {

struct DraftTrees {
  const int32_t* tokens = nullptr;   // [N]
  const int32_t* parents = nullptr;  // [N], local indices
  const int32_t* indptr = nullptr;   // [B + 1]
  int64_t batch = 0;
};

// A [rows, vocab] matrix: row r starts r * row_stride elements after data,
// unit stride inside a row.
struct VocabRows {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t row_stride = 0;
  int64_t vocab = 0;
};

// Outputs, row-major: accepted_tokens [B, max_depth + 1] (accepted draft
// tokens, the bonus token, then -1), accepted_nodes [B, max_depth] (local
// node indices, -1 padded), num_accepted [B], bonus_token [B].
struct Verdicts {
  int32_t* accepted_tokens = nullptr;
  int32_t* accepted_nodes = nullptr;
  int32_t* num_accepted = nullptr;
  int32_t* bonus_token = nullptr;
  int64_t max_depth = 0;
};

// Greedy: the longest path from the root whose tokens all equal the target's
// argmax at their parent (argmax ties: lowest id; equally long paths: the
// lexicographically smallest node indices); bonus = argmax after its end.
// Only rows of matching nodes are scanned.
void verify_tree_greedy(const DraftTrees& trees, const VocabRows& target_logits, const Verdicts& out,
                        int64_t begin, int64_t end);

// SpecInfer's multi-step speculative sampling (arXiv 2305.09781). draft rows
// use the target's block layout when draft_rows_match_target, otherwise the
// block of request b starts at indptr[b] (a chain's [B, L, V] layout: the
// last node never has children, so it needs no row).
void verify_tree_sampling(const DraftTrees& trees, const VocabRows& draft_probs, bool draft_rows_match_target,
                          const VocabRows& target_probs, const double* uniforms, const Verdicts& out,
                          int64_t begin, int64_t end);

// The first k with p[0] + ... + p[k] > u * sum(p), sums in float64; a zero
// entry is never chosen. Falls back to the last positive entry (0 if none).
int64_t sample_inverse_cdf(const float* p, int64_t n, double u);

}  // namespace forkdec::cpu
