// torch.ops.forkdec speculative verification ops on CPU tensors: checks that keep the
// kernels in bounds whatever the caller passes, and requests spread over
// threads with at::parallel_for. The arithmetic lives in speculative.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/speculative.h"

namespace forkdec::cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using checks::int32_vector;

// The trees and everything read through them: indptr starts at 0, never
// decreases and ends at N; parents[i] in [-1, i); tokens in [0, V); the
// deepest tree fits max_depth.
DraftTrees checked_trees(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& indptr,
                         int64_t vocab, int64_t max_depth, const char* op) {
  const int64_t n = parents.numel(), batch = indptr.numel() - 1;
  TORCH_CHECK(batch >= 0, "forkdec::", op, ": tree_indptr needs B + 1 entries");
  TORCH_CHECK(tokens.numel() == n, "forkdec::", op, ": draft_tokens has ", tokens.numel(), " entries, parents ", n);
  const int32_t* ip = indptr.data_ptr<int32_t>();
  const int32_t* par = parents.data_ptr<int32_t>();
  const int32_t* tok = tokens.data_ptr<int32_t>();
  TORCH_CHECK(ip[0] == 0 && ip[batch] == n, "forkdec::", op, ": tree_indptr must run from 0 to N = ", n);
  std::vector<int32_t> depth(static_cast<size_t>(n));
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(ip[b + 1] >= ip[b], "forkdec::", op, ": tree_indptr must be non-decreasing");
    for (int64_t i = ip[b]; i < ip[b + 1]; ++i) {
      const int64_t local = i - ip[b];
      TORCH_CHECK(par[i] >= -1 && par[i] < local, "forkdec::", op, ": parents[", i, "] = ", par[i],
                  " must be -1 or a smaller local index");
      TORCH_CHECK(tok[i] >= 0 && tok[i] < vocab, "forkdec::", op, ": draft_tokens[", i, "] out of [0, ", vocab, ")");
      depth[i] = par[i] < 0 ? 1 : depth[ip[b] + par[i]] + 1;
      TORCH_CHECK(depth[i] <= max_depth, "forkdec::", op, ": a tree is deeper than max_depth = ", max_depth);
    }
  }
  return DraftTrees{tok, par, ip, batch};
}

VocabRows rows_of(const at::Tensor& t, int64_t rows, int64_t vocab, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "forkdec::", op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) >= rows && t.size(1) == vocab, "forkdec::", op, ": ", name,
              " must be [", rows, ", ", vocab, "], got ", t.sizes());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "forkdec::", op, ": ", name,
              " must be fp32, fp16 or bf16");
  const DType dtype = type == at::kHalf ? DType::f16 : type == at::kBFloat16 ? DType::bf16 : DType::f32;
  return VocabRows{t.data_ptr(), dtype, t.size(0) > 1 ? t.stride(0) : vocab, vocab};
}

// Rows with unit stride inside a row (a copy only when they are not).
at::Tensor unit_rows(const at::Tensor& t) { return t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t; }

Outputs allocate(int64_t batch, int64_t max_depth, Verdicts* v) {
  const auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor tokens = at::empty({batch, max_depth + 1}, i32), nodes = at::empty({batch, max_depth}, i32);
  at::Tensor num = at::empty({batch}, i32), bonus = at::empty({batch}, i32);
  *v = Verdicts{tokens.data_ptr<int32_t>(), nodes.data_ptr<int32_t>(), num.data_ptr<int32_t>(),
                bonus.data_ptr<int32_t>(), max_depth};
  return {tokens, nodes, num, bonus};
}

Outputs verify_tree_greedy_cpu(const at::Tensor& draft_tokens, const at::Tensor& parents,
                               const at::Tensor& tree_indptr, const at::Tensor& target_logits, int64_t max_depth) {
  constexpr const char* op = "verify_tree_greedy";
  TORCH_CHECK(max_depth >= 0, "forkdec::", op, ": max_depth must be >= 0");
  const at::Tensor tok = int32_vector(draft_tokens, op, "draft_tokens"), par = int32_vector(parents, op, "parents");
  const at::Tensor ip = int32_vector(tree_indptr, op, "tree_indptr");
  const at::Tensor logits = unit_rows(target_logits);
  TORCH_CHECK(logits.dim() == 2, "forkdec::", op, ": target_logits must be 2-D");
  const int64_t vocab = logits.size(1);
  const DraftTrees trees = checked_trees(tok, par, ip, vocab, max_depth, op);
  TORCH_CHECK(trees.batch == 0 || vocab > 0, "forkdec::", op, ": V must be positive");
  const VocabRows rows = rows_of(logits, par.numel() + trees.batch, vocab, op, "target_logits");
  TORCH_CHECK(logits.size(0) == par.numel() + trees.batch, "forkdec::", op, ": target_logits needs N + B rows");
  Verdicts v;
  Outputs out = allocate(trees.batch, max_depth, &v);
  at::parallel_for(0, trees.batch, 1, [&](int64_t begin, int64_t end) {
    verify_tree_greedy(trees, rows, v, begin, end);
  });
  return out;
}

Outputs verify_tree_sampling_cpu(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                 const at::Tensor& tree_indptr, const at::Tensor& draft_probs,
                                 const at::Tensor& target_probs, const at::Tensor& uniforms, int64_t max_depth,
                                 bool draft_rows_match_target) {
  constexpr const char* op = "verify_tree_sampling";
  TORCH_CHECK(max_depth >= 0, "forkdec::", op, ": max_depth must be >= 0");
  const at::Tensor tok = int32_vector(draft_tokens, op, "draft_tokens"), par = int32_vector(parents, op, "parents");
  const at::Tensor ip = int32_vector(tree_indptr, op, "tree_indptr");
  const at::Tensor target = unit_rows(target_probs), draft = unit_rows(draft_probs);
  TORCH_CHECK(target.dim() == 2 && draft.dim() == 2, "forkdec::", op, ": probabilities must be 2-D");
  const int64_t vocab = target.size(1), n = par.numel();
  const DraftTrees trees = checked_trees(tok, par, ip, vocab, max_depth, op);
  TORCH_CHECK(trees.batch == 0 || vocab > 0, "forkdec::", op, ": V must be positive");
  TORCH_CHECK(target.size(0) == n + trees.batch, "forkdec::", op, ": target_probs needs N + B rows");
  // a chain-layout draft needs N rows (request b's last node has no children, so no row)
  const VocabRows target_rows = rows_of(target, n + trees.batch, vocab, op, "target_probs");
  const VocabRows draft_rows = rows_of(draft, draft_rows_match_target ? n + trees.batch : n, vocab, op,
                                       "draft_probs");
  TORCH_CHECK(uniforms.device().is_cpu() && uniforms.numel() == n + trees.batch, "forkdec::", op,
              ": uniforms must be a CPU tensor with N + B entries");
  const at::Tensor u = uniforms.to(at::kDouble).contiguous();
  Verdicts v;
  Outputs out = allocate(trees.batch, max_depth, &v);
  at::parallel_for(0, trees.batch, 1, [&](int64_t begin, int64_t end) {
    verify_tree_sampling(trees, draft_rows, draft_rows_match_target, target_rows, u.data_ptr<double>(), v, begin,
                         end);
  });
  return out;
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) {
  m.impl("verify_tree_greedy", &forkdec::cpu::verify_tree_greedy_cpu);
  m.impl("verify_tree_sampling", &forkdec::cpu::verify_tree_sampling_cpu);
}
