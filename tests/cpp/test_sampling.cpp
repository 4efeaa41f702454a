// Unit test of the torch-free sampling kernel (csrc/cpu/sampling.h): every
// available instruction set, fp32/fp16/bf16 rows, against a brute-force long
// double model of the semantics (O(V^2) top-p, plain inverse CDF). Exits
// non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/sampling.h"

namespace fc = forkdec::cpu;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
int g_failures = 0;
int g_checked = 0;

void fail(const std::string& what) {
  if (++g_failures <= 30) std::printf("FAIL: %s\n", what.c_str());
}

// Values are multiples of 1/4 in [-24, 24] (or -inf): exact in fp16, bf16 and
// fp32, and they tie often, which is what the tie rules need.
struct Row {
  std::vector<float> values;
  std::vector<uint16_t> half, bf16;
  const void* data(fc::DType d) const {
    return d == fc::DType::f32 ? static_cast<const void*>(values.data())
           : d == fc::DType::f16 ? static_cast<const void*>(half.data()) : bf16.data();
  }
};

uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // exact for these values
}

uint16_t to_half(float f) {
  if (f == -kInf) return 0xfc00;
  if (f == 0) return 0;
  const uint16_t sign = f < 0 ? 0x8000 : 0;
  int e;
  const float m = std::frexp(std::fabs(f), &e);  // |f| = m 2^e, m in [0.5, 1)
  const int units = static_cast<int>(std::ldexp(m, 11));  // exact: 11 bits suffice for these values
  return sign | static_cast<uint16_t>(((e - 1 + 15) << 10) | (units & 0x3ff));
}

Row make_row(std::mt19937& rng, int64_t vocab, double neg_inf_fraction) {
  Row row;
  std::uniform_int_distribution<int> quarter(-96, 96);
  std::uniform_real_distribution<double> coin(0, 1);
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = coin(rng) < neg_inf_fraction ? -kInf : quarter(rng) / 4.0f;
    row.values.push_back(v);
    row.half.push_back(to_half(v));
    row.bf16.push_back(to_bf16(v));
  }
  return row;
}

// The kept weights of the semantics in long double (0 = dropped).
std::vector<long double> model_weights(const std::vector<float>& x, const fc::SampleParams& p) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> a(n);
  for (int64_t i = 0; i < n; ++i) a[i] = x[i] / p.temperature + 0.0f;
  const float top = *std::max_element(a.begin(), a.end());
  std::vector<long double> w(n);
  for (int64_t i = 0; i < n; ++i) w[i] = std::exp(static_cast<long double>(a[i]) - top);
  if (p.top_k > 0 && p.top_k < n) {
    std::vector<float> sorted(a);
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    for (int64_t i = 0; i < n; ++i) if (a[i] < sorted[p.top_k - 1]) w[i] = 0;
  }
  if (p.top_p < 1) {
    long double total = 0;
    for (long double v : w) total += v;
    std::vector<long double> kept(w);
    for (int64_t i = 0; i < n; ++i) {
      long double above = 0;
      for (int64_t j = 0; j < n; ++j) if (a[j] > a[i]) above += w[j];
      if (!(above < static_cast<long double>(p.top_p) * total)) kept[i] = 0;
    }
    w = kept;
  }
  for (long double& v : w) if (v < p.min_p) v = 0;
  return w;
}

// The token of uniform u, or -1 when u * total lies within `margin` of a
// boundary between tokens (rounding may then go either way).
int64_t model_draw(const std::vector<long double>& w, float u, long double margin) {
  long double total = 0;
  for (long double v : w) total += v;
  const long double target = static_cast<long double>(u) * total;
  long double running = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] <= 0) continue;
    const long double next = running + w[i];
    if (std::fabs(next - target) < margin * total || std::fabs(running - target) < margin * total) return -1;
    if (next > target) return static_cast<int64_t>(i);
    running = next;
  }
  return -1;
}

const char* name(fc::DType d) { return d == fc::DType::f32 ? "fp32" : d == fc::DType::f16 ? "fp16" : "bf16"; }

std::string describe(const fc::SampleParams& p, int64_t vocab, fc::DType d) {
  char text[160];
  std::snprintf(text, sizeof text, "%s V=%lld isa=%s t=%g k=%lld p=%g min_p=%g", name(d),
                static_cast<long long>(vocab), fc::isa_name(fc::current_isa()), p.temperature,
                static_cast<long long>(p.top_k), p.top_p, p.min_p);
  return text;
}

void check_against_model(std::mt19937& rng, int64_t vocab, const fc::SampleParams& p, double neg_inf) {
  const Row row = make_row(rng, vocab, neg_inf);
  if (*std::max_element(row.values.begin(), row.values.end()) == -kInf) return;
  const std::vector<long double> w = model_weights(row.values, p);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> u(64);
  for (float& v : u) v = uniform(rng);
  for (fc::DType d : {fc::DType::f32, fc::DType::f16, fc::DType::bf16}) {
    fc::SampleWorkspace ws;
    std::vector<int64_t> tokens(u.size(), -7);
    if (!fc::sample_row(row.data(d), d, vocab, p, u.data(), static_cast<int64_t>(u.size()), tokens.data(), ws)) {
      fail(describe(p, vocab, d) + ": returned false for a row with finite logits");
      continue;
    }
    for (size_t j = 0; j < u.size(); ++j) {
      const int64_t expected = model_draw(w, u[j], 1e-5L);
      if (tokens[j] < 0 || tokens[j] >= vocab || w[tokens[j]] <= 0) {
        fail(describe(p, vocab, d) + ": drew a filtered-out token " + std::to_string(tokens[j]));
      } else if (expected >= 0 && tokens[j] != expected) {
        fail(describe(p, vocab, d) + ": token " + std::to_string(tokens[j]) + ", expected " +
             std::to_string(expected));
      }
      ++g_checked;
    }
  }
}

void check_greedy(std::mt19937& rng, int64_t vocab) {
  const Row row = make_row(rng, vocab, 0.2);
  float best = -kInf;
  int64_t first = -1;
  for (int64_t i = 0; i < vocab; ++i) {
    if (row.values[i] > best) best = row.values[i], first = i;
  }
  const fc::SampleParams p{0.0f, 0, 1.0f, 0.0f};
  for (fc::DType d : {fc::DType::f32, fc::DType::f16, fc::DType::bf16}) {
    fc::SampleWorkspace ws;
    const float u = 0.5f;
    int64_t token = -7;
    const bool ok = fc::sample_row(row.data(d), d, vocab, p, &u, 1, &token, ws);
    if (first < 0 ? ok : (!ok || token != first)) {
      fail(describe(p, vocab, d) + ": greedy token " + std::to_string(token) + ", expected " + std::to_string(first));
    }
    ++g_checked;
  }
}

void check_no_token_rows() {
  const std::vector<float> all_neg_inf(37, -kInf);
  fc::SampleWorkspace ws;
  const float u = 0.25f;
  int64_t token = -7;
  for (const fc::SampleParams& p : {fc::SampleParams{1.0f, 0, 1.0f, 0.0f}, fc::SampleParams{1.0f, 5, 0.9f, 0.1f},
                                    fc::SampleParams{0.0f, 0, 1.0f, 0.0f}}) {
    if (fc::sample_row(all_neg_inf.data(), fc::DType::f32, 37, p, &u, 1, &token, ws) || token != -7) {
      fail(describe(p, 37, fc::DType::f32) + ": a row of only -inf must return false and write nothing");
    }
  }
  // x / t overflowing to +inf leaves no finite distribution either.
  const std::vector<float> big = {3e38f, 1.0f, -2.0f};
  if (fc::sample_row(big.data(), fc::DType::f32, 3, fc::SampleParams{1e-3f, 0, 1.0f, 0.0f}, &u, 1, &token, ws)) {
    fail("x / t overflowing to +inf must return false");
  }
}

// The same row and uniforms give the same tokens on every instruction set.
void check_isas_agree(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(4099);
  for (float& v : x) v = normal(rng);
  std::vector<float> u(200);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (float& v : u) v = uniform(rng);
  const fc::SampleParams cases[] = {{1.0f, 0, 1.0f, 0.0f}, {0.7f, 0, 0.9f, 0.0f}, {1.3f, 40, 0.8f, 0.05f},
                                    {1.0f, 0, 1.0f, 0.02f}, {0.0f, 0, 1.0f, 0.0f}};
  for (const fc::SampleParams& p : cases) {
    std::vector<std::vector<int64_t>> per_isa;
    for (fc::Isa isa : fc::available_isas()) {
      fc::set_isa(isa);
      fc::SampleWorkspace ws;
      per_isa.emplace_back(u.size());
      if (!fc::sample_row(x.data(), fc::DType::f32, 4099, p, u.data(), 200, per_isa.back().data(), ws)) {
        fail(describe(p, 4099, fc::DType::f32) + ": returned false");
      }
    }
    for (size_t i = 1; i < per_isa.size(); ++i) {
      if (per_isa[i] != per_isa[0]) fail(describe(p, 4099, fc::DType::f32) + ": instruction sets disagree");
    }
    ++g_checked;
  }
}

}  // namespace

// row_signals against long double: log-sum-exp within 1e-5 (relative to its
// size, at least 1), the top k by value descending and lower id on ties, -inf
// logits filling in after the finite ones.
void check_signals(std::mt19937& rng, int64_t vocab, int64_t k, double neg_inf_fraction) {
  fc::SampleWorkspace ws;
  const Row row = make_row(rng, vocab, neg_inf_fraction);
  const std::vector<float>& x = row.values;
  const float top = *std::max_element(x.begin(), x.end());
  long double sum = 0;
  for (float v : x) sum += std::exp(static_cast<long double>(v) - top);
  const long double lse = top + std::log(sum);
  std::vector<int64_t> order(vocab);
  for (int64_t i = 0; i < vocab; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
  for (fc::DType d : {fc::DType::f32, fc::DType::f16, fc::DType::bf16}) {
    float got = 0;
    std::vector<float> values(k);
    std::vector<int64_t> ids(k);
    fc::row_signals(row.data(d), d, vocab, k, &got, values.data(), ids.data(), ws);
    ++g_checked;
    char what[120];
    std::snprintf(what, sizeof what, "row_signals %s V=%lld k=%lld isa=%s", name(d), static_cast<long long>(vocab),
                  static_cast<long long>(k), fc::isa_name(fc::current_isa()));
    if (top == -kInf ? got != -kInf : !(std::fabs(got - lse) <= 1e-5L * std::max<long double>(1, std::fabs(lse)))) {
      fail(std::string(what) + ": lse " + std::to_string(got) + " vs " + std::to_string(static_cast<double>(lse)));
    }
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] != order[j] || values[j] != x[order[j]]) {
        fail(std::string(what) + ": top " + std::to_string(j) + " is id " + std::to_string(ids[j]) + ", expected " +
             std::to_string(order[j]));
        break;
      }
    }
  }
}

int main() {
  std::mt19937 rng(20261130);
  const std::vector<fc::Isa> isas = fc::available_isas();
  for (fc::Isa isa : isas) {
    fc::set_isa(isa);
    for (int64_t vocab : {1, 2, 7, 16, 17, 100, 1000, 1031}) {
      check_greedy(rng, vocab);
      for (const fc::SampleParams& p :
           {fc::SampleParams{1.0f, 0, 1.0f, 0.0f}, fc::SampleParams{0.5f, 0, 1.0f, 0.0f},
            fc::SampleParams{1.0f, 3, 1.0f, 0.0f}, fc::SampleParams{2.0f, 50, 1.0f, 0.0f},
            fc::SampleParams{1.0f, 0, 0.6f, 0.0f}, fc::SampleParams{1.0f, 0, 1.0f, 0.3f},
            fc::SampleParams{0.8f, 20, 0.7f, 0.05f}, fc::SampleParams{1.0f, 1, 1.0f, 0.0f}}) {
        check_against_model(rng, vocab, p, 0.0);
        check_against_model(rng, vocab, p, 0.5);
      }
      for (int64_t k : {int64_t{0}, int64_t{1}, std::min<int64_t>(20, vocab), vocab}) {
        check_signals(rng, vocab, k, 0.0);
        check_signals(rng, vocab, k, 0.7);
      }
    }
  }
  check_no_token_rows();
  check_isas_agree(rng);
  std::printf("sampling: %d checks on %zu instruction sets, %d failures\n", g_checked, isas.size(), g_failures);
  return g_failures == 0 ? 0 : 1;
}
