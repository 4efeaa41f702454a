// Unit test of the torch-free speculative verification kernels
// (csrc/cpu/speculative.h): greedy paths against a brute-force search over
// random trees, sampling decisions on hand-made cases whose answers follow
// from the rules, inverse-CDF edge cases, fp16/bf16 rows, and an empirical
// check that chain sampling emits the target's distribution. Exits non-zero
// on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/speculative.h"

namespace fc = forkdec::cpu;

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok && ++g_failures <= 30) std::printf("FAIL: %s\n", what.c_str());
}

struct Out {
  std::vector<int32_t> tokens, nodes, num, bonus;
  fc::Verdicts verdicts;
  Out(int64_t batch, int64_t depth)
      : tokens(batch * (depth + 1)), nodes(batch * depth), num(batch), bonus(batch) {
    verdicts = fc::Verdicts{tokens.data(), nodes.data(), num.data(), bonus.data(), depth};
  }
};

fc::VocabRows f32_rows(const std::vector<float>& rows, int64_t vocab) {
  return fc::VocabRows{rows.data(), fc::DType::f32, vocab, vocab};
}

// ---- greedy vs brute force ------------------------------------------------------------

void test_greedy_random(std::mt19937& rng) {
  const int64_t vocab = 4;
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = 1 + rng() % 10;
    std::vector<int32_t> parents(n), tokens(n), indptr{0, static_cast<int32_t>(n)};
    std::vector<float> logits((n + 1) * vocab);
    for (auto& v : logits) v = static_cast<float>(rng() % 3);  // many ties
    std::vector<int> depth(n);
    int max_depth = 0;
    for (int64_t i = 0; i < n; ++i) {
      parents[i] = static_cast<int32_t>(static_cast<int64_t>(rng() % (i + 1)) - 1);
      tokens[i] = static_cast<int32_t>(rng() % 2);  // often equal to the argmax, often duplicated
      depth[i] = parents[i] < 0 ? 1 : depth[parents[i]] + 1;
      max_depth = std::max(max_depth, depth[i]);
    }
    auto argmax = [&](int64_t row) {
      int best = 0;
      for (int v = 1; v < vocab; ++v) if (logits[row * vocab + v] > logits[row * vocab + best]) best = v;
      return best;
    };
    // brute force: every node's root path, valid if all match; longest, then lexicographically smallest
    std::vector<int32_t> best_path;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<int32_t> path;
      for (int64_t j = i; j >= 0; j = parents[j]) path.insert(path.begin(), static_cast<int32_t>(j));
      bool ok = true;
      for (size_t k = 0; k < path.size(); ++k) ok &= tokens[path[k]] == argmax(k ? path[k - 1] + 1 : 0);
      if (ok && (path.size() > best_path.size() || (path.size() == best_path.size() && path < best_path))) {
        best_path = path;
      }
    }
    Out out(1, max_depth);
    fc::verify_tree_greedy(fc::DraftTrees{tokens.data(), parents.data(), indptr.data(), 1}, f32_rows(logits, vocab),
                           out.verdicts, 0, 1);
    const int64_t k = static_cast<int64_t>(best_path.size());
    bool same = out.num[0] == k;
    for (int64_t j = 0; j < k && same; ++j) same = out.nodes[j] == best_path[j] && out.tokens[j] == tokens[best_path[j]];
    const int bonus = argmax(k ? best_path.back() + 1 : 0);
    same = same && out.tokens[k] == bonus && out.bonus[0] == bonus;
    for (int64_t j = k + 1; j <= max_depth && same; ++j) same = out.tokens[j] == -1;
    check(same, "greedy path differs from brute force in trial " + std::to_string(trial));
  }
}

// ---- sampling decisions -------------------------------------------------------------

void test_sampling_rules() {
  // one request: root -> node 0 (token 1) -> node 1 (token 2)
  const int64_t vocab = 3;
  std::vector<int32_t> parents{-1, 0}, tokens{1, 2}, indptr{0, 2};
  std::vector<float> target{0.2f, 0.3f, 0.5f, 0.1f, 0.1f, 0.8f, 1.0f, 0.0f, 0.0f};
  std::vector<float> draft{0.0f, 1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f};
  const fc::DraftTrees trees{tokens.data(), parents.data(), indptr.data(), 1};
  {
    std::vector<double> u{0.0, 0.0, 0.0};  // u = 0 accepts whatever the target allows
    Out out(1, 2);
    fc::verify_tree_sampling(trees, f32_rows(draft, vocab), true, f32_rows(target, vocab), u.data(), out.verdicts, 0, 1);
    check(out.num[0] == 2 && out.tokens[0] == 1 && out.tokens[1] == 2 && out.tokens[2] == 0,
          "u = 0 must accept both nodes and draw token 0 after node 1");
  }
  {
    // node 0: 0.29 * 1 < 0.3 accepts; node 1: 0.9 * 1 >= 0.8 rejects, residual [0.1, 0.1, 0] / 0.2
    std::vector<double> u{0.6, 0.29, 0.9};
    Out out(1, 2);
    fc::verify_tree_sampling(trees, f32_rows(draft, vocab), true, f32_rows(target, vocab), u.data(), out.verdicts, 0, 1);
    check(out.num[0] == 1 && out.nodes[0] == 0 && out.tokens[1] == 1 && out.tokens[2] == -1 && out.nodes[1] == -1,
          "the residual after rejecting token 2 must draw token 1 at u = 0.6");
  }
  {
    // two siblings with the same token 1: the second must be rejected after the first was
    std::vector<int32_t> p2{-1, -1}, t2{1, 1}, i2{0, 2};
    std::vector<float> tgt{0.5f, 0.25f, 0.25f, 1, 0, 0, 1, 0, 0};
    std::vector<float> drf{0.0f, 1.0f, 0.0f, 1, 0, 0, 1, 0, 0};
    std::vector<double> u{0.0, 0.9, 0.0};  // 0.9 rejects the first; the residual has p(1) = 0
    Out out(1, 1);
    fc::verify_tree_sampling(fc::DraftTrees{t2.data(), p2.data(), i2.data(), 1}, f32_rows(drf, vocab), true,
                             f32_rows(tgt, vocab), u.data(), out.verdicts, 0, 1);
    check(out.num[0] == 0 && out.tokens[0] == 0, "a repeated sibling token must be rejected by the residual");
  }
}

// ---- inverse CDF ------------------------------------------------------------------------

void test_inverse_cdf() {
  std::vector<float> p{0.0f, 0.25f, 0.0f, 0.75f, 0.0f};
  check(fc::sample_inverse_cdf(p.data(), 5, 0.0) == 1, "u = 0 takes the first positive entry");
  check(fc::sample_inverse_cdf(p.data(), 5, 0.2499) == 1, "u below the first step");
  check(fc::sample_inverse_cdf(p.data(), 5, 0.25) == 3, "u on a step moves past it");
  check(fc::sample_inverse_cdf(p.data(), 5, std::nextafter(1.0, 0.0)) == 3, "u near 1 never takes a zero entry");
  std::vector<float> zeros(4, 0.0f);
  check(fc::sample_inverse_cdf(zeros.data(), 4, 0.5) == 0, "an all-zero row gives 0");
  std::vector<float> big(3000, 1.0f);  // several blocks
  check(fc::sample_inverse_cdf(big.data(), 3000, 0.5) == 1500, "the block scan finds the middle");
}

// ---- half precision rows read like fp32 -----------------------------------------------------

uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // exact for the values used
}

uint16_t to_f16(float f) {  // exact for the small dyadic values used here
  if (f == 0.0f) return 0;
  int e;
  const float m = std::frexp(f, &e);  // f = m * 2^e, m in [0.5, 1)
  return static_cast<uint16_t>(((e + 14) << 10) | (static_cast<int>(m * 2048) & 0x3ff));
}

void test_half_rows() {
  const int64_t vocab = 4;
  std::vector<float> logits{0.5f, 2.0f, 0.25f, 1.0f, 4.0f, 0.5f, 0.5f, 8.0f};
  std::vector<int32_t> parents{-1}, tokens{1}, indptr{0, 1};
  const fc::DraftTrees trees{tokens.data(), parents.data(), indptr.data(), 1};
  for (fc::DType dtype : {fc::DType::bf16, fc::DType::f16}) {
    std::vector<uint16_t> bits;
    for (float v : logits) bits.push_back(dtype == fc::DType::bf16 ? to_bf16(v) : to_f16(v));
    Out out(1, 1);
    fc::verify_tree_greedy(trees, fc::VocabRows{bits.data(), dtype, vocab, vocab}, out.verdicts, 0, 1);
    check(out.num[0] == 1 && out.tokens[1] == 3, std::string("greedy on 16-bit rows, dtype ") +
                                                     (dtype == fc::DType::bf16 ? "bf16" : "f16"));
  }
}

// ---- chain sampling emits the target's distribution -------------------------------------------

void test_chain_distribution(std::mt19937_64& rng) {
  const int64_t vocab = 4, length = 2, trials = 200000;
  const std::vector<float> p{0.1f, 0.2f, 0.3f, 0.4f};  // the target at every position
  const std::vector<float> q{0.4f, 0.0f, 0.3f, 0.3f};  // the draft at every position, q(1) = 0
  std::vector<int32_t> parents{-1, 0}, indptr{0, static_cast<int32_t>(length)};
  std::vector<float> target, draft;
  for (int i = 0; i <= length; ++i) target.insert(target.end(), p.begin(), p.end());
  for (int i = 0; i < length; ++i) draft.insert(draft.end(), q.begin(), q.end());
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::discrete_distribution<int> from_q(q.begin(), q.end());
  std::vector<int64_t> counts(vocab, 0);
  for (int64_t t = 0; t < trials; ++t) {
    std::vector<int32_t> tokens{from_q(rng), from_q(rng)};
    std::vector<double> u{uniform(rng), uniform(rng), uniform(rng)};
    Out out(1, length);
    fc::verify_tree_sampling(fc::DraftTrees{tokens.data(), parents.data(), indptr.data(), 1},
                             f32_rows(draft, vocab), false, f32_rows(target, vocab), u.data(), out.verdicts, 0, 1);
    ++counts[out.tokens[0]];
  }
  // each frequency within 5 standard deviations of its probability
  for (int64_t v = 0; v < vocab; ++v) {
    const double f = static_cast<double>(counts[v]) / trials;
    const double sd = std::sqrt(p[v] * (1 - p[v]) / trials);
    check(std::fabs(f - p[v]) < 5 * sd, "first emitted token " + std::to_string(v) + " has frequency " +
                                            std::to_string(f) + ", target " + std::to_string(p[v]));
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::mt19937_64 rng64(99);
  test_greedy_random(rng);
  test_sampling_rules();
  test_inverse_cdf();
  test_half_rows();
  test_chain_distribution(rng64);
  if (g_failures) {
    std::printf("%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("speculative kernels: all checks passed\n");
  return 0;
}
