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
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/simd.h"

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

// ---- fp32 row loops: scalar, AVX2, AVX-512, chosen by current_isa() ----------------
// Elementwise results are the same on every path; the float64 sums differ only
// in their order (~1e-16 relative, see docs/speculative.md).

// r = max(p - q, 0) in fp32; returns the float64 sum of r.
double residual_scalar(const float* p, const float* q, int64_t n, float* r) {
  std::array<double, 8> acc{};
  for (int64_t i = 0; i < n; ++i) {
    const float d = std::max(p[i] - q[i], 0.0f);
    r[i] = d;
    acc[i & 7] += d;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// r = fp32(r / total), the division in float64 (what the reference computes).
void scale_scalar(float* r, int64_t n, double total) {
  for (int64_t i = 0; i < n; ++i) r[i] = static_cast<float>(static_cast<double>(r[i]) / total);
}

double sum_scalar(const float* p, int64_t n) {
  std::array<double, 8> acc{};
  for (int64_t i = 0; i < n; ++i) acc[i & 7] += p[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if defined(__x86_64__)
#define FORKDEC_SPEC_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define FORKDEC_SPEC_AVX2 __attribute__((target("avx2,fma")))

// The low and high 8 floats of v widened to double.
FORKDEC_SPEC_AVX512 inline __m512d low_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 0)); }
FORKDEC_SPEC_AVX512 inline __m512d high_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)); }

FORKDEC_SPEC_AVX512 double residual_avx512(const float* p, const float* q, int64_t n, float* r) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  const __m512 zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 d = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(p + i), _mm512_loadu_ps(q + i)), zero);
    _mm512_storeu_ps(r + i, d);
    acc0 = _mm512_add_pd(acc0, low_pd(d));
    acc1 = _mm512_add_pd(acc1, high_pd(d));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1)) + residual_scalar(p + i, q + i, n - i, r + i);
}

FORKDEC_SPEC_AVX512 void scale_avx512(float* r, int64_t n, double total) {
  const __m512d t = _mm512_set1_pd(total);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(r + i);
    const __m256 lo = _mm512_cvtpd_ps(_mm512_div_pd(low_pd(v), t));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_div_pd(high_pd(v), t));
    _mm512_storeu_ps(r + i, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
  }
  scale_scalar(r + i, n - i, total);
}

FORKDEC_SPEC_AVX512 double sum_avx512(const float* p, int64_t n) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(p + i);
    acc0 = _mm512_add_pd(acc0, low_pd(v));
    acc1 = _mm512_add_pd(acc1, high_pd(v));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1)) + sum_scalar(p + i, n - i);
}

FORKDEC_SPEC_AVX2 inline double reduce_pd(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

FORKDEC_SPEC_AVX2 double residual_avx2(const float* p, const float* q, int64_t n, float* r) {
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(q + i)), zero);
    _mm256_storeu_ps(r + i, d);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(d)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1)));
  }
  return reduce_pd(_mm256_add_pd(acc0, acc1)) + residual_scalar(p + i, q + i, n - i, r + i);
}

FORKDEC_SPEC_AVX2 void scale_avx2(float* r, int64_t n, double total) {
  const __m256d t = _mm256_set1_pd(total);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(r + i);
    const __m128 lo = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), t));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), t));
    _mm256_storeu_ps(r + i, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
  }
  scale_scalar(r + i, n - i, total);
}

FORKDEC_SPEC_AVX2 double sum_avx2(const float* p, int64_t n) {
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(p + i);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  return reduce_pd(_mm256_add_pd(acc0, acc1)) + sum_scalar(p + i, n - i);
}
#endif

double residual(const float* p, const float* q, int64_t n, float* r) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return residual_avx512(p, q, n, r);
    case Isa::avx2: return residual_avx2(p, q, n, r);
    default: break;
  }
#endif
  return residual_scalar(p, q, n, r);
}

void scale(float* r, int64_t n, double total) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return scale_avx512(r, n, total);
    case Isa::avx2: return scale_avx2(r, n, total);
    default: break;
  }
#endif
  scale_scalar(r, n, total);
}

double sum(const float* p, int64_t n) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return sum_avx512(p, n);
    case Isa::avx2: return sum_avx2(p, n);
    default: break;
  }
#endif
  return sum_scalar(p, n);
}

// Row r of `rows` as fp32: the row itself when it is fp32, else widened into scratch.
const float* fp32_row(const VocabRows& rows, int64_t r, float* scratch) {
  return with_row(rows, r, [&](auto row) -> const float* {
    if constexpr (std::is_same_v<decltype(row), F32>) {
      return row.p;
    } else {
      for (int64_t i = 0; i < rows.vocab; ++i) scratch[i] = row[i];
      return scratch;
    }
  });
}

// Inverse CDF: block sums first (vectorized), then a sequential scan inside
// the block that crosses u * total.
int64_t inverse_cdf(const float* p, int64_t n, double u) {
  constexpr int64_t kBlock = 512;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> block_sum(static_cast<size_t>(blocks));
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock;
    block_sum[b] = sum(p + lo, std::min(n, lo + kBlock) - lo);
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

int64_t sample_inverse_cdf(const float* p, int64_t n, double u) { return inverse_cdf(p, n, u); }

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
  // p: the residual; r: the next residual; t, q: 16-bit rows widened to fp32
  std::vector<float> p_buffer(static_cast<size_t>(vocab)), r_buffer(static_cast<size_t>(vocab));
  std::vector<float> t_buffer(static_cast<size_t>(vocab)), q_buffer(static_cast<size_t>(vocab));
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
      const float* q = nullptr;  // the draft row of `node` as fp32, widened on the first rejection
      for (int64_t c = node + 1; c < n && accepted < 0; ++c) {  // children have larger indices
        if (par[c] != node) continue;
        const int64_t x = tok[c];
        const double q_x = element(draft, draft_base + 1 + node, x);
        const double p_x = from_target ? element(target, base + 1 + node, x) : p[x];
        if (u[1 + c] * q_x < p_x) {  // accept with probability min(1, p(x) / q(x))
          accepted = c;
          break;
        }
        if (q == nullptr) q = fp32_row(draft, draft_base + 1 + node, q_buffer.data());
        const float* current = from_target ? fp32_row(target, base + 1 + node, t_buffer.data()) : p;
        const double total = residual(current, q, vocab, r);
        if (total > 0) {  // else p stays: nothing left to subtract from
          scale(r, vocab, total);
          std::swap(p, r);
          from_target = false;
        }
      }
      if (accepted < 0) break;
      path.push_back(static_cast<int32_t>(accepted));
      node = accepted;
      from_target = true;
    }
    const float* final_p = from_target ? fp32_row(target, base + 1 + node, t_buffer.data()) : p;
    write_path(out, b, tok, path, static_cast<int32_t>(inverse_cdf(final_p, vocab, u[0])));
  }
}

}  // namespace forkdec::cpu
