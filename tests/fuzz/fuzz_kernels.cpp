// Random-input driver for the torch-free CPU kernels, built by CMake and run by
// ctest; meant for the -DFORKDEC_SANITIZE=ON build, where AddressSanitizer and
// UBSan turn any out-of-bounds access or undefined behaviour into a failure.
//
// The kernels take metadata that the op layer has checked (op_checks.h): this
// driver draws every input the contract allows, edge cases first (empty
// requests, no keys, causal rows that see nothing, partial last pages, packed
// masks ending mid-byte, KV chunks, cascades, 2 threads, GQA groups, every head
// dim, NaN/inf in the data, vocabularies of 1) into buffers of exactly the
// documented size, so a read or write one element past any of them is caught.
// Metadata outside the contract is the op layer's to refuse: tests/fuzz/ops_fuzz.py.
//
// FORKDEC_FUZZ_ITERATIONS inputs per kernel (default 200); FORKDEC_FUZZ_SEED.
// Prints the count per kernel; exits non-zero on a failed check.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/attention.h"
#include "cpu/sampling.h"
#include "cpu/softmax.h"
#include "cpu/speculative.h"

namespace fc = forkdec::cpu;

namespace {

int g_failures = 0;
std::mt19937_64 rng;

void check(bool ok, const std::string& what) {
  if (!ok && ++g_failures <= 20) std::printf("FAIL: %s\n", what.c_str());
}

int64_t pick(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1)); }
template <class T>
T pick_of(std::initializer_list<T> values) {
  return *(values.begin() + pick(0, static_cast<int64_t>(values.size()) - 1));
}
float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
float special() {
  return pick_of<float>({std::nanf(""), INFINITY, -INFINITY, 3e38f, -3e38f, 1e-38f, 0.0f});
}

int64_t element_size(fc::DType t) { return t == fc::DType::f32 ? 4 : 2; }

uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>(u >> 16);
}
uint16_t f16_bits(float x) {  // values in [-1, 1] or specials, rounded toward zero: enough for a fuzzer
  if (std::isnan(x)) return 0x7e00;
  if (std::isinf(x) || std::fabs(x) > 65504.0f) return x > 0 ? 0x7c00 : 0xfc00;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const int e = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return sign;
  return static_cast<uint16_t>(sign | (e << 10) | ((u >> 13) & 0x3ff));
}

// n values of dtype in [-1, 1], with a few specials when asked; exactly n * size bytes.
std::vector<uint8_t> values(fc::DType t, int64_t n, bool specials, float* max_abs = nullptr) {
  std::vector<uint8_t> buf(static_cast<size_t>(n * element_size(t)));
  float top = 0;
  for (int64_t i = 0; i < n; ++i) {
    float x = uniform(-1, 1);
    if (specials && pick(0, 40) == 0) x = special();
    if (std::isfinite(x)) top = std::max(top, std::fabs(x));
    if (t == fc::DType::f32) {
      std::memcpy(buf.data() + 4 * i, &x, 4);
    } else {
      const uint16_t h = t == fc::DType::bf16 ? bf16_bits(x) : f16_bits(x);
      std::memcpy(buf.data() + 2 * i, &h, 2);
    }
  }
  if (max_abs) *max_abs = top;
  return buf;
}

float load(fc::DType t, const uint8_t* p, int64_t i) {
  if (t == fc::DType::f32) {
    float x;
    std::memcpy(&x, p + 4 * i, 4);
    return x;
  }
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  if (t == fc::DType::bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
  }
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -24)
                   : e == 31 ? (m ? NAN : INFINITY)
                             : std::ldexp(1.0f + m / 1024.0f, e - 15);
  return (h & 0x8000) ? -mag : mag;
}

fc::Threads threads_of(int64_t count) {
  fc::Threads t;
  t.count = count;
  if (count > 1) {
    t.run = [](int64_t workers, const std::function<void(int64_t)>& body) {
      std::vector<std::thread> pool;
      for (int64_t w = 1; w < workers; ++w) pool.emplace_back(body, w);
      body(0);
      for (std::thread& th : pool) th.join();
    };
  }
  return t;
}

// ---- attention, cascades -------------------------------------------------------------

struct Level {
  std::vector<int32_t> qo, kv, pages, last;
  std::vector<uint8_t> mask;
  bool packed = false;
  fc::AttentionLevel view;
};

Level make_level(int64_t total_q, int64_t num_pages, int64_t page_size) {
  Level lv;
  const int64_t batch = total_q == 0 ? pick(0, 2) : pick(1, 5);
  lv.qo.push_back(0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t left = total_q - lv.qo.back();
    lv.qo.push_back(static_cast<int32_t>(lv.qo.back() + (b + 1 == batch ? left : pick(0, left))));
  }
  lv.kv.push_back(0);
  int64_t mask_entries = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = num_pages == 0 ? 0 : pick(0, 4);
    for (int64_t i = 0; i < n; ++i) lv.pages.push_back(static_cast<int32_t>(pick(0, num_pages - 1)));
    lv.kv.push_back(static_cast<int32_t>(lv.kv.back() + n));
    lv.last.push_back(static_cast<int32_t>(n ? pick(1, page_size) : pick(0, page_size)));
    const int64_t kv_len = n ? (n - 1) * page_size + lv.last.back() : 0;
    mask_entries += (lv.qo[b + 1] - lv.qo[b]) * kv_len;
  }
  lv.view.batch = batch;
  lv.view.causal = pick(0, 1);
  const int mask = static_cast<int>(pick(0, 2));  // none, bool, packed
  if (mask == 1) {
    lv.mask.resize(static_cast<size_t>(mask_entries));
    for (auto& m : lv.mask) m = pick(0, 3) != 0;
  } else if (mask == 2) {
    lv.packed = true;
    lv.mask.resize(static_cast<size_t>((mask_entries + 7) / 8));
    for (auto& m : lv.mask) m = static_cast<uint8_t>(rng());
  }
  return lv;
}

void point(Level& lv) {
  lv.view.qo_indptr = lv.qo.data();
  lv.view.kv_indptr = lv.kv.data();
  lv.view.kv_indices = lv.pages.empty() ? nullptr : lv.pages.data();
  lv.view.kv_last_page_len = lv.last.empty() ? nullptr : lv.last.data();
  lv.view.custom_mask = lv.mask.empty() ? nullptr : lv.mask.data();
  lv.view.mask_packed = lv.packed && !lv.mask.empty();
}

void fuzz_attention() {
  const fc::DType dtype = pick_of({fc::DType::f32, fc::DType::bf16, fc::DType::f16});
  const int64_t d = pick_of<int64_t>({32, 64, 96, 128, 256});
  const int64_t hkv = pick(1, 3), hq = hkv * pick_of<int64_t>({1, 2, 3, 4, 8});
  const int64_t page_size = pick_of<int64_t>({1, 3, 16});
  const int64_t num_pages = pick(0, 6), total_q = pick(0, 12);
  const bool specials = pick(0, 3) == 0;
  float v_max = 0;
  std::vector<uint8_t> q = values(dtype, total_q * hq * d, specials);
  std::vector<uint8_t> k = values(dtype, num_pages * page_size * hkv * d, specials);
  std::vector<uint8_t> v = values(dtype, num_pages * page_size * hkv * d, specials, &v_max);
  std::vector<Level> levels;
  const int64_t num_levels = pick(1, 3);
  for (int64_t i = 0; i < num_levels; ++i) levels.push_back(make_level(total_q, num_pages, page_size));
  std::vector<fc::AttentionLevel> views;
  for (Level& lv : levels) {
    point(lv);
    views.push_back(lv.view);
  }
  const int64_t es = element_size(dtype);
  fc::QueryView qv{q.empty() ? nullptr : q.data(), total_q, hq, d, hq * d, d};
  const int64_t token = hkv * d, page = token * page_size;
  fc::KvCacheView kv{k.empty() ? nullptr : k.data(), v.empty() ? nullptr : v.data(), num_pages, page_size, hkv,
                     page, token, d, page, token, d};
  std::vector<uint8_t> out(static_cast<size_t>(total_q * hq * d * es));
  std::vector<float> lse(static_cast<size_t>(total_q * hq));
  fc::AttentionOptions options;
  options.sm_scale = pick_of<float>({0.125f, 1.0f, 30.0f});
  options.kv_chunk = pick_of<int64_t>({0, 0, 1, 5, 16});
  fc::attention(dtype, qv, kv, views.data(), num_levels, options,
                fc::AttentionOutput{out.empty() ? nullptr : out.data(), lse.empty() ? nullptr : lse.data()},
                threads_of(pick(1, 2)));
  if (!specials) {
    for (int64_t i = 0; i < total_q * hq * d; ++i) {
      const float x = load(dtype, out.data(), i);
      check(std::isfinite(x) && std::fabs(x) <= v_max * 1.01f + 1e-2f, "attention: output outside the values' hull");
      if (!std::isfinite(x)) break;
    }
  }
}

void fuzz_merge_states() {
  const fc::DType dtype = pick_of({fc::DType::f32, fc::DType::bf16, fc::DType::f16});
  const int64_t t = pick(0, 5), n = pick(0, 20), h = pick(1, 4), d = pick_of<int64_t>({1, 7, 64, 128});
  std::vector<uint8_t> o = values(dtype, t * n * h * d, false);
  std::vector<float> lse(static_cast<size_t>(t * n * h));
  for (auto& x : lse) x = pick(0, 5) ? uniform(-30, 30) : pick_of<float>({-INFINITY, INFINITY, NAN, -3e38f, 88.0f});
  std::vector<fc::StateView> states(static_cast<size_t>(n));
  const int64_t es = element_size(dtype);
  for (int64_t s = 0; s < n; ++s) {  // o [T, n, H, D], lse [T, n, H]
    states[s] = fc::StateView{o.data() + s * h * d * es, n * h * d, d, lse.data() + s * h, n * h, 1};
  }
  std::vector<uint8_t> out(static_cast<size_t>(t * h * d * es));
  std::vector<float> lse_out(static_cast<size_t>(t * h));
  if (t * h == 0) return;
  fc::merge_states(dtype, states.data(), n, t, h, d, out.data(), lse_out.data(), threads_of(pick(1, 2)));
  for (int64_t i = 0; i < t * h * d; ++i) {
    const float x = load(dtype, out.data(), i);
    check(!std::isfinite(x) || std::fabs(x) <= 1.01f, "merge_states: output outside the states' hull");
  }
}

void fuzz_append_kv() {
  const int64_t pages = pick(1, 4), page_size = pick_of<int64_t>({1, 3, 16}), hkv = pick(1, 3);
  const int64_t d = pick_of<int64_t>({1, 8, 64});
  const int64_t es = pick_of<int64_t>({2, 4});
  const int64_t capacity = pages * page_size, n = pick(0, capacity);
  std::vector<int64_t> slots(static_cast<size_t>(capacity));
  for (int64_t i = 0; i < capacity; ++i) slots[i] = i;
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(static_cast<size_t>(n));
  std::vector<uint8_t> kc(static_cast<size_t>(capacity * hkv * d * es)), vc(kc.size());
  std::vector<uint8_t> k(static_cast<size_t>(n * hkv * d * es)), v(k.size());
  for (auto& b : k) b = static_cast<uint8_t>(rng());
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  const int64_t token = hkv * d;
  fc::AppendTarget kt{kc.data(), es, page_size * token, token, d}, vt{vc.data(), es, page_size * token, token, d};
  fc::append_kv(kt, vt, page_size, hkv, d, k.empty() ? nullptr : k.data(), v.empty() ? nullptr : v.data(),
                slots.empty() ? nullptr : slots.data(), n, threads_of(pick(1, 2)));
  for (int64_t i = 0; i < n; ++i) {
    check(std::memcmp(kc.data() + slots[i] * token * es, k.data() + i * token * es, token * es) == 0,
          "append_kv: a row not at its slot");
  }
}

// ---- speculative verification ------------------------------------------------------------

struct Forest {
  std::vector<int32_t> tokens, parents, indptr;
  int64_t max_depth = 0;
};

Forest make_forest(int64_t vocab) {
  Forest f;
  const int64_t batch = pick(0, 4);
  f.indptr.push_back(0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = pick(0, 9);
    std::vector<int64_t> depth(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int32_t parent = static_cast<int32_t>(pick(-1, i - 1));
      f.parents.push_back(parent);
      f.tokens.push_back(static_cast<int32_t>(pick(0, vocab - 1)));
      depth[i] = parent < 0 ? 1 : depth[parent] + 1;
      f.max_depth = std::max(f.max_depth, depth[i]);
    }
    f.indptr.push_back(static_cast<int32_t>(f.indptr.back() + n));
  }
  f.max_depth += pick(0, 2);
  return f;
}

void fuzz_verify(bool sampling) {
  const int64_t vocab = pick_of<int64_t>({1, 2, 5, 33});
  const fc::DType dtype = pick_of({fc::DType::f32, fc::DType::bf16, fc::DType::f16});
  Forest f = make_forest(vocab);
  const int64_t batch = static_cast<int64_t>(f.indptr.size()) - 1, n = static_cast<int64_t>(f.tokens.size());
  const int64_t rows = n + batch;
  fc::DraftTrees trees{f.tokens.empty() ? nullptr : f.tokens.data(), f.parents.empty() ? nullptr : f.parents.data(),
                       f.indptr.data(), batch};
  std::vector<int32_t> acc_tokens(static_cast<size_t>(batch * (f.max_depth + 1))),
      acc_nodes(static_cast<size_t>(batch * f.max_depth)), num(static_cast<size_t>(batch)),
      bonus(static_cast<size_t>(batch));
  fc::Verdicts out{acc_tokens.data(), acc_nodes.data(), num.data(), bonus.data(), f.max_depth};
  const bool specials = pick(0, 3) == 0;
  if (!sampling) {
    std::vector<uint8_t> logits = values(dtype, rows * vocab, specials);
    fc::verify_tree_greedy(trees, fc::VocabRows{logits.data(), dtype, vocab, vocab}, out, 0, batch);
  } else {
    auto probs = [&](int64_t r) {  // non-negative rows, sometimes all zero or with a NaN
      std::vector<uint8_t> p = values(dtype, r * vocab, false);
      for (int64_t i = 0; i < r * vocab; ++i) {
        float x = std::fabs(load(dtype, p.data(), i));
        if (pick(0, 30) == 0) x = specials ? special() : 0.0f;
        if (dtype == fc::DType::f32) std::memcpy(p.data() + 4 * i, &x, 4);
        else {
          const uint16_t h = dtype == fc::DType::bf16 ? bf16_bits(x) : f16_bits(x);
          std::memcpy(p.data() + 2 * i, &h, 2);
        }
      }
      return p;
    };
    const bool match = pick(0, 1);
    std::vector<uint8_t> target = probs(rows), draft = probs(match ? rows : n);
    std::vector<double> u(static_cast<size_t>(rows));
    for (auto& x : u) x = pick(0, 10) ? std::uniform_real_distribution<double>(0, 1)(rng) : pick_of<double>({0.0, 0.999999999});
    fc::verify_tree_sampling(trees, fc::VocabRows{draft.empty() ? nullptr : draft.data(), dtype, vocab, vocab}, match,
                             fc::VocabRows{target.data(), dtype, vocab, vocab}, u.empty() ? nullptr : u.data(), out, 0,
                             batch);
  }
  for (int64_t b = 0; b < batch; ++b) {
    check(num[b] >= 0 && num[b] <= f.max_depth, "verify: num_accepted out of [0, max_depth]");
    check(bonus[b] >= 0 && bonus[b] < vocab, "verify: bonus token outside the vocabulary");
    const int64_t size = f.indptr[b + 1] - f.indptr[b];
    for (int64_t j = 0; j < f.max_depth; ++j) {
      check(acc_nodes[b * f.max_depth + j] >= -1 && acc_nodes[b * f.max_depth + j] < size, "verify: node id");
    }
  }
}

// ---- sampling and softmax ------------------------------------------------------------------

void fuzz_sample() {
  const int64_t vocab = pick_of<int64_t>({1, 2, 7, 64, 300, 5000});
  const fc::DType dtype = pick_of({fc::DType::f32, fc::DType::bf16, fc::DType::f16});
  const bool specials = pick(0, 2) == 0;
  std::vector<uint8_t> x = values(dtype, vocab, false);
  for (int64_t i = 0; i < vocab; ++i) {  // logits with ties, -inf and (sometimes) NaN / +inf
    float v = static_cast<float>(pick(-4, 4));
    if (pick(0, 8) == 0) v = -INFINITY;
    if (specials && pick(0, 50) == 0) v = special();
    if (dtype == fc::DType::f32) std::memcpy(x.data() + 4 * i, &v, 4);
    else {
      const uint16_t h = dtype == fc::DType::bf16 ? bf16_bits(v) : f16_bits(v);
      std::memcpy(x.data() + 2 * i, &h, 2);
    }
  }
  fc::SampleParams p;
  p.temperature = pick_of<float>({0.0f, 1.0f, 0.3f, 1e-30f, 1e30f});
  p.top_k = pick_of<int64_t>({0, 1, 2, vocab - 1, vocab, vocab + 5});
  p.top_p = pick_of<float>({1.0f, 0.5f, 1e-6f, 0.0f, 0.999f});
  p.min_p = pick_of<float>({0.0f, 0.1f, 1.0f, 0.999f});
  const int64_t n = pick(1, 4);
  std::vector<float> u(static_cast<size_t>(n));
  for (auto& v : u) v = pick(0, 5) ? uniform(0, 1) : pick_of<float>({0.0f, 0.99999994f});
  std::vector<int64_t> tokens(static_cast<size_t>(n), -7);
  thread_local fc::SampleWorkspace workspace;
  if (fc::sample_row(x.data(), dtype, vocab, p, u.data(), n, tokens.data(), workspace)) {
    for (int64_t t : tokens) check(t >= 0 && t < vocab, "sample: token outside the vocabulary");
  }
}

void fuzz_softmax() {
  const fc::DType dtype = pick_of({fc::DType::f32, fc::DType::bf16, fc::DType::f16});
  const int64_t rows = pick(0, 4), cols = pick_of<int64_t>({1, 3, 15, 16, 17, 64, 1000});
  const int64_t stride = cols + pick(0, 3);
  const bool specials = pick(0, 2) == 0;
  std::vector<uint8_t> x = values(dtype, rows == 0 ? 0 : (rows - 1) * stride + cols, specials);
  std::vector<float> temps(static_cast<size_t>(rows));
  for (auto& t : temps) t = pick_of<float>({1.0f, 0.5f, 1e-30f, 1e30f});
  const bool per_row = pick(0, 1);
  std::vector<float> y(static_cast<size_t>(rows * cols));
  const bool three = pick(0, 1);
  (three ? fc::softmax_three_pass : fc::softmax)(x.empty() ? nullptr : x.data(), dtype, rows, cols, stride, 1.0f,
                                                 per_row && rows ? temps.data() : nullptr,
                                                 y.empty() ? nullptr : y.data(), pick(0, 1));
  for (float v : y) check(std::isnan(v) || (v >= 0.0f && v <= 1.0f + 1e-6f), "softmax: probability outside [0, 1]");
}

}  // namespace

int main() {
  const char* it = std::getenv("FORKDEC_FUZZ_ITERATIONS");
  const char* seed = std::getenv("FORKDEC_FUZZ_SEED");
  const int64_t iterations = it ? std::atoll(it) : 200;
  rng.seed(seed ? std::strtoull(seed, nullptr, 10) : 20261206);
  const std::pair<const char*, std::function<void()>> kernels[] = {
      {"attention", fuzz_attention},       {"merge_states", fuzz_merge_states},
      {"append_kv", fuzz_append_kv},       {"verify_tree_greedy", [] { fuzz_verify(false); }},
      {"verify_tree_sampling", [] { fuzz_verify(true); }}, {"sample_row", fuzz_sample},
      {"softmax", fuzz_softmax}};
  for (fc::Isa isa : fc::available_isas()) {
    fc::set_isa(isa);
    for (const auto& [name, fuzz] : kernels) {
      for (int64_t i = 0; i < iterations; ++i) fuzz();
      std::printf("fuzz_kernels %s %s: %lld inputs\n", fc::isa_name(isa), name, static_cast<long long>(iterations));
    }
  }
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "ok", g_failures);
  return g_failures ? 1 : 0;
}
