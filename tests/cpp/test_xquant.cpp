// Unit test of the torch-free XQuant attention kernel (csrc/cpu/xquant.h)
// against a naive double-precision rematerialize-then-attend, on every
// instruction set this CPU runs: bits 2/3/4/8, token and channel groups, float
// pages (fp32, bf16), K and V from one store (raw X) or two (latents) of
// different widths, GQA, causal and bit-packed masks, empty requests, runs
// split into chunks (LSE merge), biases, 1 and 2 threads. Non-zero on failure.
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

#include "cpu/xquant.h"

namespace fc = forkdec::cpu;

namespace {

int failures = 0;
void fail(const std::string& what) {
  if (++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

// fp16 bits of a float that fp16 represents exactly (a normal number or zero).
uint16_t exact_half(float f) {
  if (f == 0.0f) return 0;
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, mant = x & 0x7fffff;
  return static_cast<uint16_t>(sign | ((e - 112) << 10) | (mant >> 13));
}

// A store of X pages with its exact dequantized values.
struct Store {
  fc::XPagesView view;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scale, zero, raw16;
  std::vector<float> raw32;
  std::vector<double> value;  // [num_pages, page_size, W]
};

void make_store(Store& s, int kind, int bits, int64_t gs, bool channel, int64_t pages, int64_t ps, int64_t w,
                std::mt19937& rng) {
  s.value.assign(static_cast<size_t>(pages * ps * w), 0.0);
  fc::XPagesView& v = s.view;
  v.width = w;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  if (kind != 0) {  // float pages: 1 = fp32, 2 = bf16 (strided: one spare token per page)
    v.quantized = false;
    v.dtype = kind == 1 ? fc::DType::f32 : fc::DType::bf16;
    v.stride_token = w;
    v.stride_page = (ps + 1) * w;
    const size_t n = static_cast<size_t>(pages * (ps + 1) * w);
    if (kind == 1) s.raw32.assign(n, 0.0f); else s.raw16.assign(n, 0);
    for (int64_t p = 0; p < pages; ++p)
      for (int64_t t = 0; t < ps; ++t)
        for (int64_t c = 0; c < w; ++c) {
          float x = u(rng);
          const size_t at = static_cast<size_t>(p * v.stride_page + t * w + c);
          if (kind == 1) {
            s.raw32[at] = x;
          } else {
            uint32_t b;
            std::memcpy(&b, &x, 4);
            s.raw16[at] = static_cast<uint16_t>(b >> 16);  // truncation: exact value below
            b = uint32_t{s.raw16[at]} << 16;
            std::memcpy(&x, &b, 4);
          }
          s.value[static_cast<size_t>((p * ps + t) * w + c)] = x;
        }
    v.data = kind == 1 ? static_cast<const void*>(s.raw32.data()) : s.raw16.data();
    return;
  }
  v.quantized = true;
  v.bits = bits;
  v.group_size = gs;
  v.channel_axis = channel;
  const int64_t groups = ps * w / gs, bytes = gs * bits / 8;
  s.codes.assign(static_cast<size_t>(pages * groups * bytes), 0);
  s.scale.resize(static_cast<size_t>(pages * groups));
  s.zero.resize(static_cast<size_t>(pages * groups));
  std::uniform_int_distribution<int> code(0, (1 << bits) - 1), k(1, 16), z(-32, 32);
  for (int64_t p = 0; p < pages; ++p) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const size_t g = static_cast<size_t>(p * groups + gi);
      const float sc = static_cast<float>(k(rng)) / 64.0f, zr = static_cast<float>(z(rng)) / 16.0f;
      s.scale[g] = exact_half(sc);
      s.zero[g] = exact_half(zr);
      uint8_t* dst = s.codes.data() + g * static_cast<size_t>(bytes);
      for (int64_t e = 0; e < gs; ++e) {
        const int c = code(rng);
        for (int bit = 0; bit < bits; ++bit) {  // little-endian bit stream
          const int64_t at = e * bits + bit;
          if ((c >> bit) & 1) dst[at / 8] |= static_cast<uint8_t>(1u << (at % 8));
        }
        // where element e of group gi lives in the page
        int64_t t, ch;
        if (!channel) {
          t = gi / (w / gs);
          ch = (gi % (w / gs)) * gs + e;
        } else {
          t = (gi / w) * gs + e;
          ch = gi % w;
        }
        s.value[static_cast<size_t>((p * ps + t) * w + ch)] = static_cast<double>(c) * sc + zr;
      }
    }
  }
  v.codes = s.codes.data();
  v.scale = s.scale.data();
  v.zero = s.zero.data();
}

struct Config {
  std::string name;
  int k_kind, k_bits;
  int64_t k_gs;
  bool k_channel;
  bool same;  // V from the K store
  int v_kind, v_bits;
  int64_t v_gs;
  bool v_channel;
  int64_t wk, wv, ps, hq, hkv, d;
  std::vector<int64_t> kv_lens, qo_lens;
  bool causal, mask, bias;
  int64_t chunk;
};

void run_config(const Config& cfg, int threads_count) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t ps = cfg.ps, batch = static_cast<int64_t>(cfg.kv_lens.size());
  std::vector<int32_t> indptr{0}, indices, last, qo{0}, start;
  int64_t pages = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = (cfg.kv_lens[b] + ps - 1) / ps;
    for (int64_t i = 0; i < n; ++i) indices.push_back(static_cast<int32_t>(pages + n - 1 - i));  // reversed
    pages += n;
    indptr.push_back(static_cast<int32_t>(indices.size()));
    last.push_back(static_cast<int32_t>(n ? (cfg.kv_lens[b] - 1) % ps + 1 : 0));
    qo.push_back(static_cast<int32_t>(qo.back() + cfg.qo_lens[b]));
    start.push_back(static_cast<int32_t>(5 * b + 1));
  }
  pages += 1;
  Store ks, vs_own;
  make_store(ks, cfg.k_kind, cfg.k_bits, cfg.k_gs, cfg.k_channel, pages, ps, cfg.wk, rng);
  if (!cfg.same) make_store(vs_own, cfg.v_kind, cfg.v_bits, cfg.v_gs, cfg.v_channel, pages, ps, cfg.wv, rng);
  const Store& vs = cfg.same ? ks : vs_own;
  const int64_t hq = cfg.hq, hkv = cfg.hkv, d = cfg.d, hd = hkv * d, g = hq / hkv, total_q = qo.back();
  std::vector<float> q(static_cast<size_t>(total_q * hq * d)), wk(static_cast<size_t>(cfg.wk * hd)),
      wv(static_cast<size_t>(vs.view.width * hd)), bk(static_cast<size_t>(hd)), bv(static_cast<size_t>(hd));
  for (auto* vec : {&q, &wk, &wv, &bk, &bv})
    for (float& x : *vec) x = u(rng) * 0.3f;
  int64_t max_pos = 0;
  for (int64_t b = 0; b < batch; ++b) max_pos = std::max(max_pos, start[b] + cfg.kv_lens[b]);
  max_pos += 1;
  std::vector<float> cs(static_cast<size_t>(max_pos * d)), sn(cs.size());
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < d / 2; ++i) {
      const double ang = p * std::pow(10000.0, -2.0 * i / d);
      cs[p * d + i] = cs[p * d + i + d / 2] = static_cast<float>(std::cos(ang));
      sn[p * d + i] = sn[p * d + i + d / 2] = static_cast<float>(std::sin(ang));
    }
  int64_t mask_bits = 0;
  for (int64_t b = 0; b < batch; ++b) mask_bits += cfg.qo_lens[b] * cfg.kv_lens[b];
  std::vector<uint8_t> mask(static_cast<size_t>((mask_bits + 7) / 8));
  for (auto& m : mask) m = static_cast<uint8_t>(rng());

  fc::XQuantProblem p;
  p.q = q.data();
  p.total_q = total_q;
  p.num_qo_heads = hq;
  p.head_dim = d;
  p.q_stride_token = hq * d;
  p.q_stride_head = d;
  p.num_kv_heads = hkv;
  p.num_pages = pages;
  p.page_size = ps;
  p.xk = ks.view;
  p.xv = vs.view;
  p.v_is_k = cfg.same;
  p.wk = wk.data();
  p.wv = wv.data();
  p.bk = cfg.bias ? bk.data() : nullptr;
  p.bv = cfg.bias ? bv.data() : nullptr;
  p.rope_cos = cs.data();
  p.rope_sin = sn.data();
  p.max_pos = max_pos;
  p.level.batch = batch;
  p.level.qo_indptr = qo.data();
  p.level.kv_indptr = indptr.data();
  p.level.kv_indices = indices.data();
  p.level.kv_last_page_len = last.data();
  p.level.causal = cfg.causal;
  p.level.custom_mask = cfg.mask ? mask.data() : nullptr;
  p.level.mask_packed = true;
  p.kv_start_pos = start.data();
  p.sm_scale = 0.25f;
  p.kv_chunk_pages = cfg.chunk;

  std::vector<float> out(static_cast<size_t>(total_q * hq * d), 7.0f), lse(static_cast<size_t>(total_q * hq), 7.0f);
  fc::Threads threads;
  threads.count = threads_count;
  if (threads_count > 1) {
    threads.run = [](int64_t workers, const std::function<void(int64_t)>& body) {
      std::vector<std::thread> pool;
      for (int64_t w = 0; w < workers; ++w) pool.emplace_back(body, w);
      for (auto& t : pool) t.join();
    };
  }
  int64_t dequantized = 0;
  p.pages_dequantized = &dequantized;
  fc::xquant_attention(p, out.data(), lse.data(), threads);
  // Each page of a request with queries is dequantized once per store, whatever
  // the number of queries, heads, threads or runs.
  int64_t want_pages = 0;
  for (int64_t b = 0; b < batch; ++b) want_pages += cfg.qo_lens[b] > 0 ? indptr[b + 1] - indptr[b] : 0;
  if (dequantized != want_pages * (cfg.same ? 1 : 2)) {
    fail(cfg.name + ": " + std::to_string(dequantized) + " page dequantizations, expected " +
         std::to_string(want_pages * (cfg.same ? 1 : 2)));
  }

  // The naive version: K, V per request in double, then attention.
  int64_t mask_off = 0;
  double worst = 0, worst_lse = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t kl = cfg.kv_lens[b], ql = cfg.qo_lens[b];
    std::vector<double> kk(static_cast<size_t>(kl * hd)), vv(static_cast<size_t>(kl * hd));
    for (int64_t t = 0; t < kl; ++t) {
      const int64_t page = indices[static_cast<size_t>(indptr[b] + t / ps)], row = page * ps + t % ps;
      for (int64_t o = 0; o < hd; ++o) {
        double a = cfg.bias ? bk[o] : 0, c = cfg.bias ? bv[o] : 0;
        for (int64_t i = 0; i < cfg.wk; ++i) a += ks.value[static_cast<size_t>(row * cfg.wk + i)] * wk[i * hd + o];
        for (int64_t i = 0; i < vs.view.width; ++i)
          c += vs.value[static_cast<size_t>(row * vs.view.width + i)] * wv[i * hd + o];
        kk[t * hd + o] = a;
        vv[t * hd + o] = c;
      }
      const int64_t pos = start[b] + t;
      for (int64_t h = 0; h < hkv; ++h) {
        double* x = kk.data() + t * hd + h * d;
        std::vector<double> y(static_cast<size_t>(d));
        for (int64_t e = 0; e < d / 2; ++e) {
          y[e] = x[e] * cs[pos * d + e] - x[e + d / 2] * sn[pos * d + e];
          y[e + d / 2] = x[e + d / 2] * cs[pos * d + e] + x[e] * sn[pos * d + e];
        }
        std::copy(y.begin(), y.end(), x);
      }
    }
    for (int64_t i = 0; i < ql; ++i) {
      for (int64_t head = 0; head < hq; ++head) {
        const int64_t h = head / g;
        std::vector<double> sc(static_cast<size_t>(kl), -INFINITY);
        double mx = -INFINITY;
        for (int64_t t = 0; t < kl; ++t) {
          const int64_t bit = mask_off + i * kl + t;
          if (cfg.causal && t > kl - ql + i) continue;
          if (cfg.mask && !((mask[bit / 8] >> (bit % 8)) & 1)) continue;
          double s = 0;
          for (int64_t e = 0; e < d; ++e) s += q[((qo[b] + i) * hq + head) * d + e] * kk[t * hd + h * d + e];
          sc[t] = s * 0.25;
          mx = std::max(mx, sc[t]);
        }
        std::vector<double> o(static_cast<size_t>(d), 0.0);
        double l = 0;
        if (mx > -INFINITY) {
          for (int64_t t = 0; t < kl; ++t) {
            if (sc[t] == -INFINITY) continue;
            const double w = std::exp(sc[t] - mx);
            l += w;
            for (int64_t e = 0; e < d; ++e) o[e] += w * vv[t * hd + h * d + e];
          }
        }
        const size_t at = static_cast<size_t>((qo[b] + i) * hq + head);
        const double want_lse = l > 0 ? mx + std::log(l) : -INFINITY;
        if (std::isinf(want_lse) != std::isinf(lse[at])) {
          fail(cfg.name + ": lse " + std::to_string(lse[at]) + " vs " + std::to_string(want_lse));
        } else if (!std::isinf(want_lse)) {
          worst_lse = std::max(worst_lse, std::fabs(lse[at] - want_lse));
        }
        for (int64_t e = 0; e < d; ++e) {
          const double want = l > 0 ? o[e] / l : 0.0;
          worst = std::max(worst, std::fabs(out[at * d + e] - want) / (1.0 + std::fabs(want)));
        }
      }
    }
    mask_off += ql * kl;
  }
  if (!(worst < 2e-4) || !(worst_lse < 2e-4)) {
    fail(cfg.name + " [" + fc::isa_name(fc::current_isa()) + ", " + std::to_string(threads_count) +
         " threads]: out error " + std::to_string(worst) + ", lse error " + std::to_string(worst_lse));
  }
}

}  // namespace

int main() {
  const std::vector<Config> configs = {
      {"x4_channel_gqa3", 0, 4, 64, true, true, 0, 0, 0, false, 96, 96, 64, 9, 3, 64, {130, 64, 0, 200},
       {1, 3, 2, 4}, false, false, false, 0},
      {"x3_token_causal_chunks", 0, 3, 32, false, true, 0, 0, 0, false, 64, 64, 16, 4, 2, 32, {50, 7, 33},
       {5, 7, 1}, true, false, true, 1},
      {"latent_2bit_k_8bit_v", 0, 2, 32, true, false, 0, 8, 32, false, 64, 96, 32, 6, 2, 32, {96, 40}, {2, 1},
       false, false, true, 0},
      {"float_pages_mask_p1", 1, 0, 0, false, true, 0, 0, 0, false, 40, 40, 1, 4, 4, 32, {9, 0, 5}, {3, 2, 2},
       false, true, false, 2},
      {"bf16_k_f32_v_causal_mask", 2, 0, 0, false, false, 1, 0, 0, false, 37, 53, 16, 8, 2, 64, {40, 17}, {4, 3},
       true, true, true, 0},
      {"many_rows_deferred_off", 0, 4, 64, true, true, 0, 0, 0, false, 64, 64, 64, 4, 1, 128, {256}, {40},
       false, false, true, 1},
      {"d256_and_a_request_without_queries", 0, 8, 128, false, true, 0, 0, 0, false, 128, 128, 32, 2, 1, 256,
       {70, 40}, {3, 0}, true, false, false, 0},
  };
  for (const fc::Isa isa : fc::available_isas()) {
    fc::set_isa(isa);
    for (const Config& c : configs) {
      run_config(c, 1);
      run_config(c, 2);
    }
  }
  // Dequantization alone: two pages of a 3-bit channel store read back in the given order.
  {
    std::mt19937 rng(7);
    Store s;
    make_store(s, 0, 3, 32, true, 3, 64, 40, rng);
    const int32_t order[2] = {2, 0};
    std::vector<float> dst(2 * 64 * 40);
    fc::xquant_dequantize_pages(s.view, 64, order, 2, dst.data());
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 64 * 40; ++j)
        if (dst[i * 64 * 40 + j] != static_cast<float>(s.value[order[i] * 64 * 40 + j])) {
          fail("dequantize_pages mismatch");
          i = 2;
          break;
        }
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("test_xquant: all passed\n");
  return 0;
}
