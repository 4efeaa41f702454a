// Speculative verification kernels (see speculative.h). Per request the work
// is a walk down the tree: a test of a child reads one probability of the
// target and one of the draft; only a rejection touches whole vocabulary rows
// (the residual max(p - q, 0)), and so does the final draw. Rows are read in
// their storage type and widened to fp32 on the fly.
#include "cpu/speculative.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace forkdec::cpu {
namespace {

// fp16 -> fp32 for every bit pattern, built once: a table lookup is the
// cheapest exact conversion without relying on F16C being compiled in.
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) {
      const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
      float magnitude = exponent == 0x1f ? (mantissa ? NAN : INFINITY)
                        : exponent == 0  ? std::ldexp(static_cast<float>(mantissa), -24)
                                         : std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
      t[h] = (h & 0x8000) ? -magnitude : magnitude;
    }
    return t;
  }();
  return table.data();
}

struct F32 {
  const float* p;
  float operator[](int64_t i) const { return p[i]; }
};
struct F16 {
  const uint16_t* p;
  const float* table;
  float operator[](int64_t i) const { return table[p[i]]; }
};
struct BF16 {
  const uint16_t* p;
  float operator[](int64_t i) const {
    const uint32_t bits = uint32_t{p[i]} << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

// Calls f(row reader) for row `r` of `rows`, in its storage type.
template <class F>
auto with_row(const VocabRows& rows, int64_t r, const F& f) {
  const int64_t element = rows.dtype == DType::f32 ? 4 : 2;
  const void* base = static_cast<const char*>(rows.data) + r * rows.row_stride * element;
  switch (rows.dtype) {
    case DType::f16: return f(F16{static_cast<const uint16_t*>(base), half_table()});
    case DType::bf16: return f(BF16{static_cast<const uint16_t*>(base)});
    default: return f(F32{static_cast<const float*>(base)});
  }
}

float element(const VocabRows& rows, int64_t r, int64_t i) {
  return with_row(rows, r, [&](auto row) { return row[i]; });
}

// The first maximum of a row (values compared as fp32).
int64_t argmax(const VocabRows& rows, int64_t r) {
  return with_row(rows, r, [&](auto row) {
    int64_t best = 0;
    float best_value = rows.vocab ? row[0] : 0.0f;
    for (int64_t i = 1; i < rows.vocab; ++i) {
      const float v = row[i];
      if (v > best_value) best_value = v, best = i;
    }
    return best;
  });
}

// r = max(p - q, 0) in fp32; returns the float64 sum of r. Eight partial sums
// keep the additions independent (the order differs from the reference's,
// which moves the sum by ~1e-16 relative: see docs/speculative.md).
template <class P, class Q>
double residual(const P& p, const Q& q, int64_t n, float* r) {
  std::array<double, 8> acc{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const float d = std::max(p[i + k] - q[i + k], 0.0f);
      r[i + k] = d;
      acc[k] += d;
    }
  }
  for (; i < n; ++i) {
    const float d = std::max(p[i] - q[i], 0.0f);
    r[i] = d;
    acc[0] += d;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Inverse CDF over any row reader: block sums first (independent adds), then a
// sequential scan inside the block that crosses u * total.
template <class P>
int64_t inverse_cdf(const P& p, int64_t n, double u) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> block_sum(static_cast<size_t>(blocks));
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    std::array<double, 8> acc{};
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    for (int64_t i = lo; i < hi; ++i) acc[i & 7] += p[i];
    block_sum[b] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    total += block_sum[b];
  }
  const double threshold = u * total;
  double running = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (running + block_sum[b] > threshold) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      for (int64_t i = lo; i < hi; ++i) {
        running += p[i];
        if (running > threshold && p[i] > 0) return i;
      }
    } else {
      running += block_sum[b];
    }
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // rounding left u * total unreached
    if (p[i] > 0) return i;
  }
  return 0;
}

void write_path(const Verdicts& out, int64_t b, const int32_t* tokens, const std::vector<int32_t>& path,
                int32_t bonus) {
  int32_t* tok = out.accepted_tokens + b * (out.max_depth + 1);
  int32_t* nodes = out.accepted_nodes + b * out.max_depth;
  std::fill(tok, tok + out.max_depth + 1, -1);
  std::fill(nodes, nodes + out.max_depth, -1);
  for (size_t j = 0; j < path.size(); ++j) {
    tok[j] = tokens[path[j]];
    nodes[j] = path[j];
  }
  tok[path.size()] = bonus;
  out.num_accepted[b] = static_cast<int32_t>(path.size());
  out.bonus_token[b] = bonus;
}

}  // namespace

int64_t sample_inverse_cdf(const float* p, int64_t n, double u) { return inverse_cdf(F32{p}, n, u); }

void verify_tree_greedy(const DraftTrees& trees, const VocabRows& target, const Verdicts& out, int64_t begin,
                        int64_t end) {
  std::vector<int32_t> best_token, best_child, length, path;
  std::vector<char> matched;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t start = trees.indptr[b], n = trees.indptr[b + 1] - start, base = start + b;
    const int32_t* par = trees.parents + start;
    const int32_t* tok = trees.tokens + start;
    // slot s = 0 is the root, s = 1 + i node i; argmax only where a match can continue
    best_token.assign(n + 1, -1);
    best_child.assign(n + 1, -1);
    length.assign(n, 0);
    matched.assign(n, 0);
    best_token[0] = static_cast<int32_t>(argmax(target, base));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = par[i] + 1;
      if ((par[i] < 0 || matched[par[i]]) && tok[i] == best_token[slot]) {
        matched[i] = 1;
        best_token[i + 1] = static_cast<int32_t>(argmax(target, base + 1 + i));
      }
    }
    for (int64_t i = n - 1; i >= 0; --i) {  // children after parents: walk back to build lengths
      if (!matched[i]) continue;
      length[i] = 1 + (best_child[i + 1] >= 0 ? length[best_child[i + 1]] : 0);
      const int64_t slot = par[i] + 1;
      if (best_child[slot] < 0 || length[i] >= length[best_child[slot]]) best_child[slot] = static_cast<int32_t>(i);
    }
    path.clear();
    int64_t node = -1;
    while (best_child[node + 1] >= 0) {
      node = best_child[node + 1];
      path.push_back(static_cast<int32_t>(node));
    }
    write_path(out, b, tok, path, best_token[node + 1]);
  }
}

void verify_tree_sampling(const DraftTrees& trees, const VocabRows& draft, bool draft_rows_match_target,
                          const VocabRows& target, const double* uniforms, const Verdicts& out, int64_t begin,
                          int64_t end) {
  const int64_t vocab = target.vocab;
  std::vector<float> p_buffer(static_cast<size_t>(vocab)), r_buffer(static_cast<size_t>(vocab));
  std::vector<int32_t> path;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t start = trees.indptr[b], n = trees.indptr[b + 1] - start, base = start + b;
    const int64_t draft_base = draft_rows_match_target ? base : start;
    const int32_t* par = trees.parents + start;
    const int32_t* tok = trees.tokens + start;
    const double* u = uniforms + base;
    float* p = p_buffer.data();
    float* r = r_buffer.data();
    bool from_target = true;  // p is the target row of `node`; else the residual in p
    int64_t node = -1;
    path.clear();
    for (;;) {
      int64_t accepted = -1;
      for (int64_t c = node + 1; c < n && accepted < 0; ++c) {  // children have larger indices
        if (par[c] != node) continue;
        const int64_t x = tok[c];
        const double q_x = element(draft, draft_base + 1 + node, x);
        const double p_x = from_target ? element(target, base + 1 + node, x) : p[x];
        if (u[1 + c] * q_x < p_x) {  // accept with probability min(1, p(x) / q(x))
          accepted = c;
          break;
        }
        const double total = with_row(draft, draft_base + 1 + node, [&](auto q) {
          return from_target ? with_row(target, base + 1 + node, [&](auto t) { return residual(t, q, vocab, r); })
                             : residual(F32{p}, q, vocab, r);
        });
        if (total > 0) {  // else p stays: nothing left to subtract from
          for (int64_t v = 0; v < vocab; ++v) r[v] = static_cast<float>(static_cast<double>(r[v]) / total);
          std::swap(p, r);
          from_target = false;
        }
      }
      if (accepted < 0) break;
      path.push_back(static_cast<int32_t>(accepted));
      node = accepted;
      from_target = true;
    }
    const int64_t bonus = from_target
        ? with_row(target, base + 1 + node, [&](auto t) { return inverse_cdf(t, vocab, u[0]); })
        : inverse_cdf(F32{p}, vocab, u[0]);
    write_path(out, b, tok, path, static_cast<int32_t>(bonus));
  }
}

}  // namespace forkdec::cpu
