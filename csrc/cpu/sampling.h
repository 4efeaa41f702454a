// Sampling a token from one row of logits with temperature, top-k, top-p and
// min-p, on the CPU. Torch-free: raw pointers. Semantics (docs/sampling.md):
//
//   a_i = x_i / t (fp32), e_i = exp(a_i - max a)
//   top-k (0 < k < V): keep a_i >= the k-th largest a (ties with it kept)
//   top-p (p < 1):     keep i in the top-k set when the e-mass of top-k tokens
//                      with a_j > a_i is below p * (top-k e-mass)
//   min-p (m > 0):     keep e_i >= m
//   t == 0:            argmax, ties to the lowest index
//   draw with u:       the first kept i (index order) whose running sum of
//                      kept e exceeds u * (sum of kept e)
//
// No sort of the vocabulary: top-k is a streaming threshold selection (see
// sampling.cpp), top-p a quickselect-style pivot search over the survivors.
#pragma once

#include <cstdint>
#include <memory>

#include "cpu/softmax.h"  // DType, Isa

namespace forkdec::cpu {

struct SampleParams {
  float temperature = 1.0f;  // 0: greedy
  int64_t top_k = 0;         // 0 or >= vocab: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
};

// Scratch memory reused across calls (one per thread); opaque.
class SampleWorkspace {
 public:
  SampleWorkspace();
  ~SampleWorkspace();
  SampleWorkspace(const SampleWorkspace&) = delete;
  SampleWorkspace& operator=(const SampleWorkspace&) = delete;
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// Draws `n` tokens from one row x[0..vocab) (unit stride) with the same
// parameters: tokens[j] from uniforms[j] in [0, 1). The filtering is done
// once for all n draws. Returns false, writing nothing, when no token is left
// (a row of only -inf, or x / t overflowing to +inf); NaN in x is the
// caller's to reject (the result is then unspecified, but in range or false).
bool sample_row(const void* x, DType dtype, int64_t vocab, const SampleParams& params, const float* uniforms,
                int64_t n, int64_t* tokens, SampleWorkspace& workspace);

// The signals of one row x[0..vocab) under its unfiltered temperature-1
// distribution, in one pass: *lse = log sum_i exp(x_i) (fp32, summed in
// double across lanes) and, for 0 < k <= vocab, the k largest x in
// top_values[0..k) with their ids in top_ids, by value descending, ties by
// lower index (-inf logits fill in after the finite ones). The log-probability
// of token i is x_i - *lse. k = 0: only *lse.
void row_signals(const void* x, DType dtype, int64_t vocab, int64_t k, float* lse, float* top_values,
                 int64_t* top_ids, SampleWorkspace& workspace);

}  // namespace forkdec::cpu
