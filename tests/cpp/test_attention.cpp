// Unit test of the torch-free attention kernels (csrc/cpu/attention.h) against
// a naive double-precision attention, on every instruction set this CPU runs:
// GQA ratios 1/3/4/8, head dims 64 and 128, page sizes 1 and 16, causal and
// bit-packed custom masks, empty requests, KV split into chunks, cascades,
// fp32 and bf16; plus merge_states and append_kv. Returns non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/attention.h"

namespace fc = forkdec::cpu;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

int failures = 0;

void fail(const std::string& what) {
  if (++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

// ---- element storage --------------------------------------------------------------

uint16_t to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

float from_bf16(uint16_t b) {
  const uint32_t x = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Values in a kernel dtype, with the exact float value of every element.
struct Buffer {
  fc::DType dtype = fc::DType::f32;
  std::vector<float> values;
  std::vector<uint16_t> halves;

  Buffer(fc::DType t, size_t n) : dtype(t), values(n), halves(t == fc::DType::f32 ? 0 : n) {}
  void set(size_t i, float v) {
    if (dtype == fc::DType::bf16) {
      halves[i] = to_bf16(v);
      v = from_bf16(halves[i]);
    }
    values[i] = v;
  }
  const void* data() const { return dtype == fc::DType::f32 ? static_cast<const void*>(values.data()) : halves.data(); }
};

float read(fc::DType dtype, const std::vector<uint8_t>& raw, size_t i) {
  if (dtype == fc::DType::f32) {
    float f;
    std::memcpy(&f, raw.data() + 4 * i, 4);
    return f;
  }
  uint16_t b;
  std::memcpy(&b, raw.data() + 2 * i, 2);
  return from_bf16(b);
}

// ---- problems ---------------------------------------------------------------------------

struct Shape {
  int hq, hkv, d, page_size;
  fc::DType dtype;
};

// One level: per request qo_len queries (rows are consecutive over requests)
// and its own pages holding kv_len keys.
struct LevelSpec {
  std::vector<int32_t> qo_indptr, kv_indptr, kv_indices, kv_last_page_len;
  std::vector<int> kv_len;
  bool causal = false;
  std::vector<uint8_t> packed_mask;  // empty: none
  std::vector<uint8_t> mask_bits;    // one entry per mask bit, for the reference

  fc::AttentionLevel view() const {
    fc::AttentionLevel lv;
    lv.batch = static_cast<int64_t>(kv_len.size());
    lv.qo_indptr = qo_indptr.data();
    lv.kv_indptr = kv_indptr.data();
    lv.kv_indices = kv_indices.data();
    lv.kv_last_page_len = kv_last_page_len.data();
    lv.causal = causal;
    lv.custom_mask = packed_mask.empty() ? nullptr : packed_mask.data();
    lv.mask_packed = true;
    return lv;
  }
};

struct Problem {
  Shape shape;
  int total_q = 0, num_pages = 0;
  Buffer q, k, v;
  std::vector<LevelSpec> levels;

  explicit Problem(const Shape& s) : shape(s), q(s.dtype, 0), k(s.dtype, 0), v(s.dtype, 0) {}
};

// Page ids are handed out in a shuffled order so that no request's pages are adjacent.
struct PagePool {
  std::vector<int32_t> ids;
  size_t next = 0;
};

LevelSpec make_level(const std::vector<int>& qo_lens, const std::vector<int>& kv_lens, bool causal, bool masked,
                     int page_size, PagePool& pool, std::mt19937& rng) {
  LevelSpec lv;
  lv.causal = causal;
  lv.kv_len = kv_lens;
  lv.qo_indptr.push_back(0);
  lv.kv_indptr.push_back(0);
  for (size_t b = 0; b < kv_lens.size(); ++b) {
    lv.qo_indptr.push_back(lv.qo_indptr.back() + qo_lens[b]);
    const int pages = (kv_lens[b] + page_size - 1) / page_size;
    for (int p = 0; p < pages; ++p) lv.kv_indices.push_back(pool.ids[pool.next++]);
    lv.kv_indptr.push_back(static_cast<int32_t>(lv.kv_indices.size()));
    lv.kv_last_page_len.push_back(pages == 0 ? 0 : kv_lens[b] - (pages - 1) * page_size);
  }
  if (masked) {
    std::bernoulli_distribution coin(0.7);
    for (size_t b = 0; b < kv_lens.size(); ++b) {
      for (int i = 0; i < qo_lens[b] * kv_lens[b]; ++i) lv.mask_bits.push_back(coin(rng));
    }
    lv.packed_mask.assign((lv.mask_bits.size() + 7) / 8, 0);
    for (size_t i = 0; i < lv.mask_bits.size(); ++i) {
      lv.packed_mask[i / 8] |= static_cast<uint8_t>(lv.mask_bits[i] << (i % 8));
    }
  }
  return lv;
}

int pages_needed(const std::vector<int>& kv_lens, int page_size) {
  int n = 0;
  for (int len : kv_lens) n += (len + page_size - 1) / page_size;
  return n;
}

void fill_random(Buffer& b, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < b.values.size(); ++i) b.set(i, normal(rng));
}

// ---- naive attention in double ------------------------------------------------------------

struct State {
  std::vector<double> o;    // [total_q, Hq, D]
  std::vector<double> lse;  // [total_q, Hq]
};

State naive(const Problem& p, const LevelSpec& lv, double scale) {
  const Shape& s = p.shape;
  const int g = s.hq / s.hkv;
  State st{std::vector<double>(static_cast<size_t>(p.total_q) * s.hq * s.d, 0.0),
           std::vector<double>(static_cast<size_t>(p.total_q) * s.hq, -kInf)};
  size_t mask_offset = 0;
  for (size_t b = 0; b < lv.kv_len.size(); ++b) {
    const int q0 = lv.qo_indptr[b], qo_len = lv.qo_indptr[b + 1] - q0, kv_len = lv.kv_len[b];
    auto row = [&](const Buffer& cache, int j, int hk) {  // key j's row of head hk
      const int page = lv.kv_indices[lv.kv_indptr[b] + j / s.page_size], slot = j % s.page_size;
      return &cache.values[((static_cast<size_t>(page) * s.page_size + slot) * s.hkv + hk) * s.d];
    };
    for (int i = 0; i < qo_len; ++i) {
      for (int h = 0; h < s.hq; ++h) {
        const float* qv = &p.q.values[(static_cast<size_t>(q0 + i) * s.hq + h) * s.d];
        std::vector<double> scores;
        std::vector<int> keys;
        for (int j = 0; j < kv_len; ++j) {
          if (lv.causal && j > kv_len - qo_len + i) continue;
          if (!lv.mask_bits.empty() && !lv.mask_bits[mask_offset + static_cast<size_t>(i) * kv_len + j]) continue;
          const float* kr = row(p.k, j, h / g);
          double dot = 0;
          for (int c = 0; c < s.d; ++c) dot += static_cast<double>(qv[c]) * kr[c];
          scores.push_back(dot * scale);
          keys.push_back(j);
        }
        if (keys.empty()) continue;
        double top = -kInf;
        for (double x : scores) top = std::max(top, x);
        double sum = 0;
        for (double x : scores) sum += std::exp(x - top);
        const size_t out = (static_cast<size_t>(q0 + i) * s.hq + h);
        st.lse[out] = top + std::log(sum);
        for (size_t n = 0; n < keys.size(); ++n) {
          const double w = std::exp(scores[n] - top) / sum;
          const float* vr = row(p.v, keys[n], h / g);
          for (int c = 0; c < s.d; ++c) st.o[out * s.d + c] += w * vr[c];
        }
      }
    }
    mask_offset += static_cast<size_t>(qo_len) * kv_len;
  }
  return st;
}

State merge(const std::vector<State>& states, int rows, int d) {
  State m{std::vector<double>(static_cast<size_t>(rows) * d, 0.0), std::vector<double>(rows, -kInf)};
  for (int r = 0; r < rows; ++r) {
    double top = -kInf;
    for (const State& s : states) top = std::max(top, s.lse[r]);
    if (top == -kInf) continue;
    double sum = 0;
    for (const State& s : states) sum += std::exp(s.lse[r] - top);
    m.lse[r] = top + std::log(sum);
    for (const State& s : states) {
      const double w = std::exp(s.lse[r] - top) / sum;
      for (int c = 0; c < d; ++c) m.o[static_cast<size_t>(r) * d + c] += w * s.o[static_cast<size_t>(r) * d + c];
    }
  }
  return m;
}

// ---- running the kernels ------------------------------------------------------------------

fc::Threads two_threads() {
  fc::Threads t;
  t.count = 2;
  t.run = [](int64_t workers, const std::function<void(int64_t)>& body) {
    std::vector<std::thread> pool;
    for (int64_t w = 1; w < workers; ++w) pool.emplace_back(body, w);
    body(0);
    for (std::thread& th : pool) th.join();
  };
  return t;
}

void compare(const Problem& p, const State& want, const std::vector<uint8_t>& out, const std::vector<float>& lse,
             const std::string& name) {
  const bool f32 = p.shape.dtype == fc::DType::f32;
  const double tol = f32 ? 2e-5 : 1.6e-2;
  const size_t rows = want.lse.size();
  for (size_t r = 0; r < rows; ++r) {
    const double wl = want.lse[r], gl = lse[r];
    const bool both_empty = wl == -kInf && gl == -HUGE_VALF;
    if (!both_empty && !(std::abs(wl - gl) <= 1e-4 * (1 + std::abs(wl)))) {
      fail(name + ": lse[" + std::to_string(r) + "] = " + std::to_string(gl) + ", want " + std::to_string(wl));
      return;
    }
    for (int c = 0; c < p.shape.d; ++c) {
      const size_t i = r * p.shape.d + c;
      const double w = want.o[i], got = read(p.shape.dtype, out, i);
      if (!(std::abs(w - got) <= tol * (1 + std::abs(w)))) {
        fail(name + ": out[" + std::to_string(r) + "][" + std::to_string(c) + "] = " + std::to_string(got) +
             ", want " + std::to_string(w));
        return;
      }
    }
  }
}

void run_attention(const Problem& p, const std::vector<const LevelSpec*>& levels, double scale, int64_t kv_chunk,
                   bool threaded, const std::string& name) {
  const Shape& s = p.shape;
  const int64_t es = s.dtype == fc::DType::f32 ? 4 : 2;
  fc::QueryView q{p.q.data(), p.total_q, s.hq, s.d, static_cast<int64_t>(s.hq) * s.d, s.d};
  const int64_t token = static_cast<int64_t>(s.hkv) * s.d, page = token * s.page_size;
  fc::KvCacheView kv{p.k.data(), p.v.data(), p.num_pages, s.page_size, s.hkv, page, token, s.d, page, token, s.d};
  std::vector<fc::AttentionLevel> views;
  std::vector<State> states;
  for (const LevelSpec* lv : levels) {
    views.push_back(lv->view());
    states.push_back(naive(p, *lv, scale));
  }
  const State want = states.size() == 1 ? states[0] : merge(states, p.total_q * s.hq, s.d);
  std::vector<uint8_t> out(static_cast<size_t>(p.total_q) * s.hq * s.d * es, 0xff);
  std::vector<float> lse(static_cast<size_t>(p.total_q) * s.hq, 12345.0f);
  fc::AttentionOptions options;
  options.sm_scale = static_cast<float>(scale);
  options.kv_chunk = kv_chunk;
  fc::attention(s.dtype, q, kv, views.data(), static_cast<int64_t>(views.size()), options,
                fc::AttentionOutput{out.data(), lse.data()}, threaded ? two_threads() : fc::Threads{});
  compare(p, want, out, lse, name);
}

std::string shape_name(const Shape& s) {
  return "hq" + std::to_string(s.hq) + "/hkv" + std::to_string(s.hkv) + " d" + std::to_string(s.d) + " page" +
         std::to_string(s.page_size) + (s.dtype == fc::DType::f32 ? " fp32" : " bf16");
}

// A batch with empty requests (no queries, no keys, fewer keys than queries),
// checked plain, causal, masked, split into KV chunks and threaded.
void test_attention(const Shape& s, std::mt19937& rng, const std::string& isa) {
  const std::vector<int> qo_lens = {1, 5, 0, 3, 1, 7, 2};
  const std::vector<int> kv_lens = {300, 37, 12, 0, 1, 70, 5};
  Problem p(s);
  for (int n : qo_lens) p.total_q += n;
  const int per_level = pages_needed(kv_lens, s.page_size);
  p.num_pages = 2 * per_level + 3;
  PagePool pool;
  for (int i = 0; i < p.num_pages; ++i) pool.ids.push_back(i);
  std::shuffle(pool.ids.begin(), pool.ids.end(), rng);
  p.q = Buffer(s.dtype, static_cast<size_t>(p.total_q) * s.hq * s.d);
  p.k = Buffer(s.dtype, static_cast<size_t>(p.num_pages) * s.page_size * s.hkv * s.d);
  p.v = Buffer(s.dtype, p.k.values.size());
  fill_random(p.q, rng);
  fill_random(p.k, rng);
  fill_random(p.v, rng);
  const LevelSpec plain = make_level(qo_lens, kv_lens, false, false, s.page_size, pool, rng);
  PagePool reuse = pool;  // same pages, other masks
  reuse.next -= per_level;
  const LevelSpec causal = make_level(qo_lens, kv_lens, true, false, s.page_size, reuse, rng);
  reuse.next -= per_level;
  const LevelSpec masked = make_level(qo_lens, kv_lens, true, true, s.page_size, reuse, rng);
  const std::string name = isa + " " + shape_name(s);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
  run_attention(p, {&plain}, scale, 0, false, name + " plain");
  run_attention(p, {&causal}, 0.3, 0, false, name + " causal");
  run_attention(p, {&masked}, scale, 0, false, name + " causal+mask");
  run_attention(p, {&masked}, scale, 16, true, name + " causal+mask, KV chunks of 16, 2 threads");
  run_attention(p, {&plain}, scale, 100, true, name + " plain, KV chunks of 100, 2 threads");

  // A cascade: level 0 puts all queries in one group over a shared prompt,
  // level 1 gives each request its own (causal) keys.
  const int total = p.total_q;
  const LevelSpec prompt = make_level({total}, {45}, false, false, s.page_size, pool, rng);
  run_attention(p, {&prompt, &causal}, scale, 0, true, name + " cascade");
  run_attention(p, {&prompt, &masked}, scale, 32, false, name + " cascade with mask, KV chunks");
}

// merge_states against the double-precision merge, with empty (-inf) states.
void test_merge_states(std::mt19937& rng, const std::string& isa) {
  const int t = 5, n = 3, h = 2, d = 40;
  std::normal_distribution<float> normal;
  std::vector<float> o(static_cast<size_t>(t) * n * h * d), lse(static_cast<size_t>(t) * n * h);
  for (float& x : o) x = normal(rng);
  for (size_t i = 0; i < lse.size(); ++i) lse[i] = i % 4 == 1 ? -HUGE_VALF : 3 * normal(rng);
  for (int k = 0; k < n; ++k) lse[(static_cast<size_t>(2) * n + k) * h + 1] = -HUGE_VALF;  // row (2, 1): all empty
  std::vector<fc::StateView> views(n);
  std::vector<State> states(n);
  for (int k = 0; k < n; ++k) {
    views[k] = fc::StateView{o.data() + static_cast<size_t>(k) * h * d, static_cast<int64_t>(n) * h * d, d,
                             lse.data() + static_cast<size_t>(k) * h, static_cast<int64_t>(n) * h, 1};
    states[k].o.resize(static_cast<size_t>(t) * h * d);
    states[k].lse.resize(static_cast<size_t>(t) * h);
    for (int r = 0; r < t * h; ++r) {
      const int tt = r / h, hh = r % h;
      states[k].lse[r] = lse[(static_cast<size_t>(tt) * n + k) * h + hh];
      for (int c = 0; c < d; ++c) states[k].o[static_cast<size_t>(r) * d + c] = o[((static_cast<size_t>(tt) * n + k) * h + hh) * d + c];
    }
  }
  const State want = merge(states, t * h, d);
  std::vector<uint8_t> out(static_cast<size_t>(t) * h * d * 4);
  std::vector<float> lse_out(static_cast<size_t>(t) * h);
  fc::merge_states(fc::DType::f32, views.data(), n, t, h, d, out.data(), lse_out.data(), two_threads());
  Problem shape_only(Shape{h, h, d, 1, fc::DType::f32});
  compare(shape_only, want, out, lse_out, isa + " merge_states");
}

void test_append_kv(const std::string& isa) {
  const int pages = 3, page_size = 4, hkv = 2, d = 8, n = 2;
  std::vector<uint16_t> k_cache(pages * page_size * hkv * d, 0), v_cache(k_cache.size(), 0);
  std::vector<uint16_t> k(n * hkv * d), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<uint16_t>(i + 1);
    v[i] = static_cast<uint16_t>(1000 + i);
  }
  const int64_t slots[n] = {9, 2};
  const fc::AppendTarget kt{k_cache.data(), 2, page_size * hkv * d, hkv * d, d};
  const fc::AppendTarget vt{v_cache.data(), 2, page_size * hkv * d, hkv * d, d};
  fc::append_kv(kt, vt, page_size, hkv, d, k.data(), v.data(), slots, n);
  int written = 0;
  for (size_t i = 0; i < k_cache.size(); ++i) written += k_cache[i] != 0;
  bool ok = written == n * hkv * d;
  for (int t = 0; t < n; ++t) {
    for (int j = 0; j < hkv * d; ++j) {
      ok &= k_cache[slots[t] * hkv * d + j] == k[t * hkv * d + j];
      ok &= v_cache[slots[t] * hkv * d + j] == v[t * hkv * d + j];
    }
  }
  if (!ok) fail(isa + " append_kv");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (fc::Isa isa : fc::available_isas()) {
    fc::set_isa(isa);
    const std::string name = fc::isa_name(isa);
    if (std::string(fc::attention_isa()) != name) fail(name + ": attention_isa() = " + fc::attention_isa());
    const int before = failures;
    for (fc::DType dtype : {fc::DType::f32, fc::DType::bf16}) {
      for (int d : {64, 128}) {
        for (int page_size : {1, 16}) {
          for (int gqa : {1, 3, 4, 8}) {
            test_attention(Shape{2 * gqa, 2, d, page_size, dtype}, rng, name);
          }
        }
      }
    }
    test_attention(Shape{9, 3, 32, 16, fc::DType::f32}, rng, name);
    test_attention(Shape{4, 1, 96, 16, fc::DType::f32}, rng, name);
    test_attention(Shape{4, 2, 256, 16, fc::DType::bf16}, rng, name);
    test_merge_states(rng, name);
    test_append_kv(name);
    std::printf("%s: %s\n", name.c_str(), failures == before ? "ok" : "FAILED");
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
