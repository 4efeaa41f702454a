// XQuant attention on the CPU (see xquant.h).
//
// Like attention.cpp, the file has two parts. The first (this #ifndef branch)
// is ISA-independent: dequantization, work planning, LSE merging, the public
// API. The second (the #else branch) holds the per-item kernel written once
// with GCC vector types of the pass's native width; the first part includes
// this file into itself once per instruction set, each pass compiling the
// kernel with that pass's __attribute__((target(...))).
#ifndef FORKDEC_XQUANT_KERNEL_PASS

#include "cpu/xquant.h"
#include "cpu/scalar_types.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always-inlined calls

namespace forkdec::cpu {
namespace xq {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896340736f;
constexpr double kLn2 = 0.693147180559945309417;
// Keys per tile: pages are grouped until a tile holds this many keys (a page
// larger than this is one tile), so GEMMs stay large on small pages.
constexpr int64_t kTileKeys = 64;

// count codes of `bits` bits from a little-endian bit stream (count % 8 == 0).
inline void unpack(const uint8_t* src, int bits, int64_t count, uint8_t* out) {
  switch (bits) {
    case 8:
      std::memcpy(out, src, static_cast<size_t>(count));
      return;
    case 4:
      for (int64_t i = 0; i < count / 2; ++i) {
        out[2 * i] = src[i] & 0xf;
        out[2 * i + 1] = src[i] >> 4;
      }
      return;
    case 2:
      for (int64_t i = 0; i < count / 4; ++i) {
        for (int k = 0; k < 4; ++k) out[4 * i + k] = (src[i] >> (2 * k)) & 3;
      }
      return;
    default:  // 3 bits: eight codes in three bytes
      for (int64_t i = 0; i < count / 8; ++i) {
        const uint32_t w = src[3 * i] | (uint32_t{src[3 * i + 1]} << 8) | (uint32_t{src[3 * i + 2]} << 16);
        for (int k = 0; k < 8; ++k) out[8 * i + k] = (w >> (3 * k)) & 7;
      }
  }
}

// The first n_tokens tokens of one page as fp32 rows dst[t * W + c].
inline void dequantize_page(const XPagesView& x, int64_t page_size, int64_t page, int64_t n_tokens, float* dst) {
  const int64_t w = x.width;
  if (!x.quantized) {
    const char* base = static_cast<const char*>(x.data);
    const int64_t es = x.dtype == DType::f32 ? 4 : 2;
    for (int64_t t = 0; t < n_tokens; ++t) {
      const char* row = base + (page * x.stride_page + t * x.stride_token) * es;
      float* d = dst + t * w;
      if (x.dtype == DType::f32) {
        std::memcpy(d, row, static_cast<size_t>(w) * 4);
      } else {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
        if (x.dtype == DType::f16) {
          for (int64_t c = 0; c < w; ++c) d[c] = to_float(Half{h[c]});
        } else {
          for (int64_t c = 0; c < w; ++c) d[c] = to_float(BFloat{h[c]});
        }
      }
    }
    return;
  }
  const int64_t gs = x.group_size, groups = page_size * w / gs, group_bytes = gs * x.bits / 8;
  const uint8_t* codes = x.codes + page * groups * group_bytes;
  const uint16_t* scale = x.scale + page * groups;
  const uint16_t* zero = x.zero + page * groups;
  uint8_t q[128];
  if (!x.channel_axis) {  // group (t, j) holds channels j*gs .. of token t
    const int64_t per_token = w / gs;
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t j = 0; j < per_token; ++j) {
        const int64_t g = t * per_token + j;
        unpack(codes + g * group_bytes, x.bits, gs, q);
        const float s = to_float(Half{scale[g]}), z = to_float(Half{zero[g]});
        float* d = dst + t * w + j * gs;
        for (int64_t e = 0; e < gs; ++e) d[e] = static_cast<float>(q[e]) * s + z;
      }
    }
    return;
  }
  // Group (block, c) holds tokens block*gs .. of channel c. Channels are decoded
  // kChannels at a time into a small buffer, then written out token by token, so
  // the stores run along rows instead of striding W floats apart (4x faster).
  constexpr int64_t kChannels = 16;
  float tile[kChannels * 128];
  for (int64_t block = 0; block * gs < n_tokens; ++block) {
    const int64_t n = std::min(gs, n_tokens - block * gs);
    for (int64_t c0 = 0; c0 < w; c0 += kChannels) {
      const int64_t cn = std::min(kChannels, w - c0);
      for (int64_t cc = 0; cc < cn; ++cc) {
        const int64_t g = block * w + c0 + cc;
        unpack(codes + g * group_bytes, x.bits, gs, q);
        const float s = to_float(Half{scale[g]}), z = to_float(Half{zero[g]});
        float* row = tile + cc * gs;
        for (int64_t e = 0; e < n; ++e) row[e] = static_cast<float>(q[e]) * s + z;
      }
      float* d = dst + block * gs * w + c0;
      for (int64_t e = 0; e < n; ++e) {
        for (int64_t cc = 0; cc < cn; ++cc) d[e * w + cc] = tile[cc * gs + e];
      }
    }
  }
}

struct Buffer {
  std::vector<float> v;
  float* get(int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
  }
};

struct Scratch {
  Buffer q, xk, xv, kall, vall, kt, s, acc, m, l, alpha, fin;
};

// Pages [p0, p1) of request b; state >= 0: a partial state slot (merged later).
struct Item {
  int64_t b = 0, p0 = 0, p1 = 0, state = -1;
};

struct Ctx {
  const XQuantProblem* p = nullptr;
  const int64_t* mask_offset = nullptr;  // [batch]: where request b's mask entries start
  float* out = nullptr;
  float* lse = nullptr;
  // Partial states of split requests: state k's o rows start at part_o + part_offset[k]
  // (row h * rows + r, D wide), its lse at part_lse + part_offset[k] / D.
  float* part_o = nullptr;
  float* part_lse = nullptr;
  const int64_t* part_offset = nullptr;
};

inline int64_t kv_len(const AttentionLevel& lv, int64_t b, int64_t page_size) {
  const int64_t n = lv.kv_indptr[b + 1] - lv.kv_indptr[b];
  return n == 0 ? 0 : (n - 1) * page_size + lv.kv_last_page_len[b];
}

inline bool mask_bit(const AttentionLevel& lv, int64_t index) {
  return lv.mask_packed ? (lv.custom_mask[index >> 3] >> (index & 7)) & 1 : lv.custom_mask[index] != 0;
}

using RunItem = void (*)(const Ctx&, const Item&, Scratch&);

}  // namespace xq
}  // namespace forkdec::cpu

// ---- the kernel, once per instruction set ------------------------------------------

#define FORKDEC_XQUANT_KERNEL_PASS 1
#define XQ_NS xq_scalar
#define XQ_TARGET
#define XQ_VBYTES 16
#define XQ_ROWS 4
#define XQ_NV 2
#include "xquant.cpp"
#undef XQ_NS
#undef XQ_TARGET
#undef XQ_VBYTES
#undef XQ_ROWS
#undef XQ_NV

#if defined(__x86_64__)
#define XQ_NS xq_avx2
#define XQ_TARGET __attribute__((target("avx2,fma")))
#define XQ_VBYTES 32
#define XQ_ROWS 6
#define XQ_NV 2
#include "xquant.cpp"
#undef XQ_NS
#undef XQ_TARGET
#undef XQ_VBYTES
#undef XQ_ROWS
#undef XQ_NV

#define XQ_NS xq_avx512
#define XQ_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define XQ_VBYTES 64
#define XQ_ROWS 6
#define XQ_NV 4
#include "xquant.cpp"
#undef XQ_NS
#undef XQ_TARGET
#undef XQ_VBYTES
#undef XQ_ROWS
#undef XQ_NV
#endif
#undef FORKDEC_XQUANT_KERNEL_PASS

namespace forkdec::cpu {
namespace xq {
namespace {

RunItem item_kernel() {
  switch (current_isa()) {
#if defined(__x86_64__)
    case Isa::avx512:
      return xq_avx512::run_item;
    case Isa::avx2:
      return xq_avx2::run_item;
#endif
    default:
      return xq_scalar::run_item;
  }
}

void run_workers(const Threads& threads, int64_t workers, const std::function<void(int64_t)>& body) {
  if (workers <= 1 || !threads.run) {
    for (int64_t w = 0; w < workers; ++w) body(w);
  } else {
    threads.run(workers, body);
  }
}

// Merges the partial states of one request's rows into out / lse.
void merge_request(const XQuantProblem& p, const Ctx& ctx, const std::vector<Item>& items, int64_t first,
                   int64_t count, float* out, float* lse) {
  const Item& it0 = items[static_cast<size_t>(first)];
  const int64_t g = p.num_qo_heads / p.num_kv_heads, d = p.head_dim;
  const int64_t q0 = p.level.qo_indptr[it0.b], qo = p.level.qo_indptr[it0.b + 1] - q0, rows = qo * g;
  for (int64_t h = 0; h < p.num_kv_heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = h * rows + r;
      float mx = -kInf;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t off = ctx.part_offset[items[static_cast<size_t>(first + c)].state];
        mx = std::max(mx, ctx.part_lse[off / d + row]);
      }
      float* o = out + ((q0 + r / g) * p.num_qo_heads + h * g + r % g) * d;
      float* l = lse + (q0 + r / g) * p.num_qo_heads + h * g + r % g;
      std::fill(o, o + d, 0.0f);
      if (mx == -kInf) {
        *l = -kInf;
        continue;
      }
      double total = 0;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t off = ctx.part_offset[items[static_cast<size_t>(first + c)].state];
        const float w = std::exp(ctx.part_lse[off / d + row] - mx);
        total += w;
        const float* src = ctx.part_o + off + row * d;
        for (int64_t e = 0; e < d; ++e) o[e] += w * src[e];
      }
      const float inv = static_cast<float>(1.0 / total);
      for (int64_t e = 0; e < d; ++e) o[e] *= inv;
      *l = mx + static_cast<float>(std::log(total));
    }
  }
}

}  // namespace
}  // namespace xq

void xquant_dequantize_pages(const XPagesView& x, int64_t page_size, const int32_t* pages, int64_t count,
                             float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    xq::dequantize_page(x, page_size, pages[i], page_size, dst + i * page_size * x.width);
  }
}

void xquant_attention(const XQuantProblem& p, float* out, float* lse, const Threads& threads) {
  using namespace xq;
  const AttentionLevel& lv = p.level;
  const int64_t hq = p.num_qo_heads, d = p.head_dim;
  // Rows that see no key at all are written here; items write all the others.
  std::fill(out, out + p.total_q * hq * d, 0.0f);
  std::fill(lse, lse + p.total_q * hq, -kInf);

  std::vector<int64_t> mask_offset(static_cast<size_t>(lv.batch), 0);
  int64_t total_pages = 0, off = 0;
  for (int64_t b = 0; b < lv.batch; ++b) {
    mask_offset[static_cast<size_t>(b)] = off;
    const int64_t qo = lv.qo_indptr[b + 1] - lv.qo_indptr[b];
    off += qo * kv_len(lv, b, p.page_size);
    if (qo > 0) total_pages += lv.kv_indptr[b + 1] - lv.kv_indptr[b];
  }
  if (total_pages == 0) return;

  // Runs of pages: enough items to keep every thread busy (4 per thread, as
  // items differ in size), but never runs shorter than ~256 keys, whose merge
  // would cost more than the balance gains. Each page still belongs to one item.
  int64_t run = p.kv_chunk_pages;
  if (run <= 0) {
    const int64_t target = std::max<int64_t>(1, threads.count) * 4;
    run = std::max((total_pages + target - 1) / target, (int64_t{256} + p.page_size - 1) / p.page_size);
    if (threads.count <= 1) run = total_pages;
  }
  std::vector<Item> items;
  std::vector<int64_t> part_offset;
  std::vector<std::pair<int64_t, int64_t>> merges;  // (first item, count) of split requests
  int64_t part_size = 0;
  for (int64_t b = 0; b < lv.batch; ++b) {
    const int64_t qo = lv.qo_indptr[b + 1] - lv.qo_indptr[b];
    const int64_t np = lv.kv_indptr[b + 1] - lv.kv_indptr[b];
    if (qo == 0 || np == 0) continue;
    const int64_t pieces = (np + run - 1) / run;
    if (pieces > 1) merges.emplace_back(static_cast<int64_t>(items.size()), pieces);
    for (int64_t k = 0; k < pieces; ++k) {
      Item it{b, k * run, std::min(np, (k + 1) * run), -1};
      if (pieces > 1) {
        it.state = static_cast<int64_t>(part_offset.size());
        part_offset.push_back(part_size);
        part_size += qo * hq * d;
      }
      items.push_back(it);
    }
  }
  std::vector<float> part_o(static_cast<size_t>(part_size)), part_lse(static_cast<size_t>(part_size / d));

  Ctx ctx;
  ctx.p = &p;
  ctx.mask_offset = mask_offset.data();
  ctx.out = out;
  ctx.lse = lse;
  ctx.part_o = part_o.data();
  ctx.part_lse = part_lse.data();
  ctx.part_offset = part_offset.data();
  // Large items first, so the dynamic schedule ends with small ones.
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto cost = [&](const Item& it) {
    return (it.p1 - it.p0) * (lv.qo_indptr[it.b + 1] - lv.qo_indptr[it.b]);
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost(items[a]) > cost(items[b]); });

  const RunItem kernel = item_kernel();
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, threads.count), static_cast<int64_t>(items.size()));
  std::atomic<int64_t> next{0};
  run_workers(threads, workers, [&](int64_t) {
    Scratch sc;
    for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size()); i = next.fetch_add(1)) {
      kernel(ctx, items[static_cast<size_t>(order[static_cast<size_t>(i)])], sc);
    }
  });
  run_workers(threads, std::min<int64_t>(workers, static_cast<int64_t>(merges.size())), [&](int64_t w) {
    for (size_t k = static_cast<size_t>(w); k < merges.size(); k += static_cast<size_t>(workers)) {
      merge_request(p, ctx, items, merges[k].first, merges[k].second, out, lse);
    }
  });
}

}  // namespace forkdec::cpu

#else  // FORKDEC_XQUANT_KERNEL_PASS: the kernel of one instruction set

namespace forkdec::cpu {
namespace XQ_NS {

using namespace xq;

constexpr int L = XQ_VBYTES / 4;  // floats per vector
typedef float V __attribute__((vector_size(XQ_VBYTES)));
typedef int32_t VI __attribute__((vector_size(XQ_VBYTES)));

#define XQ_INLINE XQ_TARGET inline __attribute__((always_inline))

XQ_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
XQ_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof v); }
// x - 0 is x for every x (V{} + x is not, for -0), so this folds to a plain broadcast.
XQ_INLINE V vset(float x) { return x - V{}; }

// 2^x: x = n + r, r in [-1/2, 1/2], 2^r by its Taylor series to degree 6
// (relative error < 2e-7); x <= -127 (masked keys: -inf) gives exactly 0.
XQ_INLINE V vexp2(V x) {
  const V lo = vset(-127.0f), hi = vset(127.0f), magic = vset(12582912.0f);  // 1.5 * 2^23: rounds to integer
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V t = x + magic;
  const V n = t - magic;
  const V r = x - n;
  V y = vset(1.5403530e-4f);
  y = y * r + 1.3333558e-3f;
  y = y * r + 9.6181291e-3f;
  y = y * r + 5.5504109e-2f;
  y = y * r + 2.4022651e-1f;
  y = y * r + 6.9314718e-1f;
  y = y * r + 1.0f;
  const VI e = (((VI)t - (VI)magic) + 127) << 23;
  return y * (V)e;
}

// C[R, NV*L] = (accumulate ? C : 0) + A[R, k] B[k, NV*L]: the register-blocked micro-kernel.
template <int R, int NV>
XQ_TARGET void micro(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
                     bool accumulate) {
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(c + r * ldc + v * L) : V{};
  for (int64_t i = 0; i < k; ++i) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + i * ldb + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V x = vset(a[r * lda + i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * L, acc[r][v]);
}

template <int NV, int R = XQ_ROWS>
XQ_TARGET void micro_rows(int64_t m, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                          int64_t k, bool accumulate) {
  int64_t r = 0;
  for (; r + R <= m; r += R) micro<R, NV>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, k, accumulate);
  if constexpr (R > 1) {
    if (r < m) micro_rows<NV, R - 1>(m - r, a + r * lda, lda, b, ldb, c + r * ldc, ldc, k, accumulate);
  }
}

// C[m, n] = (accumulate ? C : 0) + A[m, k] B[k, n], all row-major fp32 with leading dimensions.
XQ_TARGET void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + XQ_NV * L <= n; j += XQ_NV * L) micro_rows<XQ_NV>(m, a, lda, b + j, ldb, c + j, ldc, k, accumulate);
  for (; j + L <= n; j += L) micro_rows<1>(m, a, lda, b + j, ldb, c + j, ldc, k, accumulate);
  if (j == n) return;
  for (int64_t r = 0; r < m; ++r) {  // the last n % L columns (odd widths of float pages)
    for (int64_t col = j; col < n; ++col) {
      float s = accumulate ? c[r * ldc + col] : 0.0f;
      for (int64_t i = 0; i < k; ++i) s += a[r * lda + i] * b[i * ldb + col];
      c[r * ldc + col] = s;
    }
  }
}

// Online softmax over one row of scores s[0, n_pad) (log2 domain, masked = -inf):
// updates m, l, turns s into P and returns the factor that rescales the row's accumulator.
XQ_TARGET float softmax_row(float* s, int64_t n_pad, float& m, float& l) {
  V mx = vset(-kInf);
  for (int64_t j = 0; j < n_pad; j += L) {
    const V x = vload(s + j);
    mx = x > mx ? x : mx;
  }
  float tile_max = -kInf;
  for (int e = 0; e < L; ++e) tile_max = std::max(tile_max, mx[e]);
  const float m_new = std::max(m, tile_max);
  if (m_new == -kInf) {  // nothing visible yet: P = 0, the accumulator stays 0
    std::fill(s, s + n_pad, 0.0f);
    return 1.0f;
  }
  const float alpha = m == -kInf ? 0.0f : std::exp2(m - m_new);
  const V mv = vset(m_new);
  V sum{};
  for (int64_t j = 0; j < n_pad; j += L) {
    const V p = vexp2(vload(s + j) - mv);
    vstore(s + j, p);
    sum += p;
  }
  float total = 0.0f;
  for (int e = 0; e < L; ++e) total += sum[e];
  m = m_new;
  l = l * alpha + total;
  return alpha;
}

XQ_TARGET void run_item(const Ctx& ctx, const Item& it, Scratch& sc) {
  const XQuantProblem& p = *ctx.p;
  const AttentionLevel& lv = p.level;
  const int64_t d = p.head_dim, hkv = p.num_kv_heads, hq = p.num_qo_heads, g = hq / hkv, hd = hkv * d;
  const int64_t ps = p.page_size, wk = p.xk.width, wv = p.xv.width;
  const int64_t b = it.b, q0 = lv.qo_indptr[b], qo = lv.qo_indptr[b + 1] - q0, rows = qo * g;
  const int64_t klen = kv_len(lv, b, ps), start = p.kv_start_pos[b];
  const int32_t* pages = lv.kv_indices + lv.kv_indptr[b];
  const int64_t tile_pages = std::max<int64_t>(1, kTileKeys / ps), tile_max = tile_pages * ps;
  const int64_t tile_pad = (tile_max + L - 1) / L * L;
  // P·X̂v costs rows * Wv per key and head; rematerializing V costs (Wv + rows) * D.
  const bool deferred = rows * wv <= (wv + rows) * d;
  const int64_t accw = deferred ? wv : d;

  float* q = sc.q.get(hkv * rows * d);
  float* acc = sc.acc.get(hkv * rows * accw);
  float* m = sc.m.get(hkv * rows);
  float* l = sc.l.get(hkv * rows);
  float* xk = sc.xk.get(tile_max * wk);
  float* xv = p.v_is_k ? xk : sc.xv.get(tile_max * wv);
  float* kall = sc.kall.get(tile_max * hd);
  float* vall = deferred ? nullptr : sc.vall.get(tile_max * hd);
  float* kt = sc.kt.get(d * tile_pad);
  float* s = sc.s.get(rows * tile_pad);

  // Q packed per KV head (row r: query r / g, head h * g + r % g), scaled into the log2 domain.
  const float qs = p.sm_scale * kLog2e;
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = p.q + (q0 + r / g) * p.q_stride_token + (h * g + r % g) * p.q_stride_head;
      float* dst = q + (h * rows + r) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * qs;
    }
  }
  std::fill(acc, acc + hkv * rows * accw, 0.0f);
  std::fill(m, m + hkv * rows, -kInf);
  std::fill(l, l + hkv * rows, 0.0f);

  for (int64_t pg = it.p0; pg < it.p1; pg += tile_pages) {
    const int64_t pend = std::min(it.p1, pg + tile_pages);
    const int64_t t0 = pg * ps;                              // first key of the tile (request index)
    const int64_t n = std::min(klen, pend * ps) - t0;        // keys in the tile
    const int64_t n_pad = (n + L - 1) / L * L;
    // 1. X̂ rows of the tile, once for every query and head.
    for (int64_t k = pg; k < pend; ++k) {
      const int64_t nk = std::min(ps, klen - k * ps);
      dequantize_page(p.xk, ps, pages[k], nk, xk + (k - pg) * ps * wk);
      if (!p.v_is_k) dequantize_page(p.xv, ps, pages[k], nk, xv + (k - pg) * ps * wv);
    }
    if (p.pages_dequantized) __atomic_fetch_add(p.pages_dequantized, (pend - pg) * (p.v_is_k ? 1 : 2), __ATOMIC_RELAXED);
    // 2. K = X̂k·wk + bk for all heads, then RoPE into K^T per head (below).
    for (int64_t t = 0; t < n; ++t) {
      float* row = kall + t * hd;
      if (p.bk) std::memcpy(row, p.bk, static_cast<size_t>(hd) * 4); else std::fill(row, row + hd, 0.0f);
    }
    gemm(n, hd, wk, xk, wk, p.wk, hd, kall, hd, true);
    if (!deferred) {
      for (int64_t t = 0; t < n; ++t) {
        float* row = vall + t * hd;
        if (p.bv) std::memcpy(row, p.bv, static_cast<size_t>(hd) * 4); else std::fill(row, row + hd, 0.0f);
      }
      gemm(n, hd, wv, xv, wv, p.wv, hd, vall, hd, true);
    }
    for (int64_t h = 0; h < hkv; ++h) {
      // K^T [D, n_pad] of head h with RoPE at positions start + t0 + t (rotate-half layout).
      const int64_t half = d / 2;
      for (int64_t t = 0; t < n; ++t) {
        const float* x = kall + t * hd + h * d;
        const float* cs = p.rope_cos + (start + t0 + t) * d;
        const float* sn = p.rope_sin + (start + t0 + t) * d;
        for (int64_t e = 0; e < half; ++e) {
          kt[e * n_pad + t] = x[e] * cs[e] - x[e + half] * sn[e];
          kt[(e + half) * n_pad + t] = x[e + half] * cs[e + half] + x[e] * sn[e + half];
        }
      }
      for (int64_t e = 0; e < d; ++e) std::fill(kt + e * n_pad + n, kt + (e + 1) * n_pad, 0.0f);
      // 3. S = Q K^T, masks, online softmax.
      const float* qh = q + h * rows * d;
      gemm(rows, n_pad, d, qh, d, kt, n_pad, s, n_pad, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s + r * n_pad;
        const int64_t i = r / g;
        int64_t visible_end = n;  // keys [0, visible_end) of the tile pass the causal limit
        if (lv.causal) visible_end = std::clamp<int64_t>(klen - qo + i + 1 - t0, 0, n);
        std::fill(sr + visible_end, sr + n_pad, -kInf);
        if (lv.custom_mask) {
          const int64_t base = ctx.mask_offset[b] + i * klen + t0;
          for (int64_t j = 0; j < visible_end; ++j) {
            if (!mask_bit(lv, base + j)) sr[j] = -kInf;
          }
        }
        const int64_t row = h * rows + r;
        const float alpha = softmax_row(sr, n_pad, m[row], l[row]);
        float* ar = acc + row * accw;
        if (alpha != 1.0f) {
          for (int64_t e = 0; e < accw; ++e) ar[e] *= alpha;
        }
      }
      // 4. acc += P·X̂v (deferred) or P·V.
      if (deferred) {
        gemm(rows, wv, n, s, n_pad, xv, wv, acc + h * rows * accw, accw, true);
      } else {
        gemm(rows, d, n, s, n_pad, vall + h * d, hd, acc + h * rows * accw, accw, true);
      }
    }
  }

  // Normalize; the deferred path applies wv (and bv: the probabilities sum to 1) once.
  float* fin = deferred ? sc.fin.get(rows * d) : nullptr;
  for (int64_t h = 0; h < hkv; ++h) {
    float* ah = acc + h * rows * accw;
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = l[h * rows + r] > 0 ? 1.0f / l[h * rows + r] : 0.0f;
      for (int64_t e = 0; e < accw; ++e) ah[r * accw + e] *= inv;
    }
    const float* res = ah;
    if (deferred) {
      gemm(rows, d, wv, ah, wv, p.wv + h * d, hd, fin, d, false);
      res = fin;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = h * rows + r;
      const bool seen = l[row] > 0;
      const float row_lse = seen ? static_cast<float>((m[row] + std::log2(static_cast<double>(l[row]))) * kLn2) : -kInf;
      float* o;
      float* ls;
      if (it.state < 0) {
        o = ctx.out + ((q0 + r / g) * hq + h * g + r % g) * d;
        ls = ctx.lse + (q0 + r / g) * hq + h * g + r % g;
      } else {
        const int64_t off = ctx.part_offset[it.state];
        o = ctx.part_o + off + row * d;
        ls = ctx.part_lse + off / d + row;
      }
      *ls = row_lse;
      const float* src = res + r * d;
      for (int64_t e = 0; e < d; ++e) {
        o[e] = seen ? src[e] + (deferred && p.bv ? p.bv[h * d + e] : 0.0f) : 0.0f;
      }
    }
  }
}

}  // namespace XQ_NS
}  // namespace forkdec::cpu

#endif  // FORKDEC_XQUANT_KERNEL_PASS
