// Flash attention on the CPU over a paged KV cache (see attention.h).
//
// The file has two parts. The first (this #ifndef branch) is ISA-independent:
// element conversions, key masks, work planning, LSE merging, the public API.
// The second (the #else branch at the end) holds the kernels written once
// against a small vector shim; the first part includes this file into itself
// once per instruction set (scalar, AVX2+FMA, AVX-512), each pass compiling
// every kernel function with that pass's __attribute__((target(...))).
//
// Per work item and key tile (attention.h explains items):
//   1. gather the tile's K/V row pointers from the page table; items with many
//      rows pack K^T into panels of W keys (W = vector width) and V into rows,
//      both fp32 and contiguous, for every KV head of the item;
//   2. S = Q K^T: a register-blocked micro-kernel (rows x panels) on the packed
//      tile, or per-key dot products folded W at a time (few rows, in place);
//   3. per row: masked max, online-softmax rescale, P = 2^(S - m) in place;
//   4. O = O * alpha + P V with a second micro-kernel (rows x D columns).
// Meanwhile the next tile's rows are fetched: pages sit anywhere in memory.
// Q is packed once per item, pre-multiplied by sm_scale * log2(e), so scores
// live in the log2 domain and exp is a bare exp2.
#ifndef FORKDEC_ATTENTION_KERNEL_PASS

#include "cpu/attention.h"
#include "cpu/scalar_types.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>

#include "cpu/simd.h"

namespace forkdec::cpu {
namespace attn {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896340736f;
constexpr double kLn2 = 0.693147180559945309417;
// 2^r on [-1/2, 1/2], relative error 2.4e-7 (near-minimax fit, c0..c5): a
// few float ulps, far inside the 1e-5 the fp32 results are held to.
constexpr float kExp2Poly[6] = {0x1.000002p+0f, 0x1.62e428p-1f, 0x1.ebf918p-3f,
                                0x1.c6b6e6p-5f, 0x1.3d0c54p-7f, 0x1.5c08d6p-10f};
// Masks are handled as 16-bit words, one bit per key (1 = visible).
constexpr int64_t kWordKeys = 16;
// Stands in for the K row of a padding key (any element type: all bits zero).
alignas(64) inline constexpr float kZeroRow[256] = {};

inline int64_t element_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

// Calls f(T{}) with T the element type of dtype.
template <class F>
auto with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f16:
      return f(Half{});
    case DType::bf16:
      return f(BFloat{});
    default:
      return f(float{});
  }
}

// Writes n fp32 values as dtype.
inline void store_row(DType dtype, const float* src, void* dst, int64_t n) {
  with_type(dtype, [&](auto t) {
    using T = decltype(t);
    T* out = static_cast<T*>(dst);
    for (int64_t i = 0; i < n; ++i) from_float(src[i], out + i);
  });
}

// A 64-byte aligned, uninitialized float array that only grows.
class FloatBuffer {
 public:
  float* get(int64_t n) {
    if (n > capacity_) {
      const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
      data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!data_) throw std::bad_alloc();
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t capacity_ = 0;
};

// Per-thread working memory of the kernels, kept across calls (no page faults
// on the hot path).
struct Scratch {
  FloatBuffer q, o, s, kt, vt, m, l, alpha;
  std::vector<const char*> k_rows, v_rows, k_next, v_next;
  std::vector<uint16_t> words;
  std::vector<const uint16_t*> query_words, row_words;
};

// Everything shared by the work items of one call.
struct KernelArgs {
  DType dtype;
  QueryView q;
  KvCacheView kv;
  const AttentionLevel* levels;
  float q_scale;  // sm_scale * log2(e)
  int64_t group;  // g = Hq / Hkv
  AttentionOutput output;
  float* part_o;    // [partial rows, D] fp32
  float* part_lse;  // [partial rows] natural log
};

// One work item: rows [r0, r1) of a request's qo_len * g rows for each KV
// head in [hk0, hk1), over keys [k0, k1). part_row < 0: write the final output
// directly; else head hk's row r goes to partial row
// part_row + (hk - hk0) * (r1 - r0) + r - r0.
struct Item {
  int64_t level, b, hk0, hk1;
  int64_t r0, r1;
  int64_t k0, k1;
  int64_t q_start, qo_len, kv_len;
  int64_t mask_offset;  // index of the request's first mask entry
  int64_t page_begin;   // kv_indptr[b]
  int64_t part_row;
  double cost;
};

// Pointers to the K and V rows (head hk0) of keys [t, t + n) of the item's request.
inline void gather_rows(const KernelArgs& a, const Item& it, int64_t t, int64_t n, const char** k_rows,
                        const char** v_rows) {
  const KvCacheView& kv = a.kv;
  const int64_t es = element_size(a.dtype);
  const int32_t* pages = a.levels[it.level].kv_indices + it.page_begin;
  const char* k_base = static_cast<const char*>(kv.k_cache) + it.hk0 * kv.k_stride_head * es;
  const char* v_base = static_cast<const char*>(kv.v_cache) + it.hk0 * kv.v_stride_head * es;
  int64_t page = t / kv.page_size, offset = t % kv.page_size;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pages[page];
    k_rows[i] = k_base + (p * kv.k_stride_page + offset * kv.k_stride_token) * es;
    v_rows[i] = v_base + (p * kv.v_stride_page + offset * kv.v_stride_token) * es;
    if (++offset == kv.page_size) {
      offset = 0;
      ++page;
    }
  }
}

inline uint16_t low_bits(int64_t count) {
  return count >= kWordKeys ? 0xffff : count <= 0 ? 0 : static_cast<uint16_t>((1u << count) - 1);
}

// count (<= 16) mask entries from entry `index` as bits.
inline uint16_t mask_bits(const AttentionLevel& lv, int64_t index, int64_t count) {
  if (lv.mask_packed) {
    uint32_t window = 0;
    const int64_t first = index >> 3, last = (index + count - 1) >> 3;
    for (int64_t byte = first; byte <= last; ++byte) window |= uint32_t{lv.custom_mask[byte]} << (8 * (byte - first));
    return static_cast<uint16_t>((window >> (index & 7)) & low_bits(count));
  }
  const uint8_t* p = lv.custom_mask + index;
#if defined(__x86_64__)
  if (count == kWordKeys) {  // SSE2 is part of x86-64
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return static_cast<uint16_t>(~_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128())));
  }
#endif
  uint16_t bits = 0;
  for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint16_t>(p[i] != 0) << i;
  return bits;
}

// The visibility words of the item's rows for keys [t, t + n_valid), padded to
// n_pad keys: sc.row_words[r] is row r's words, or null when the row sees the
// whole tile. Returns false when no row needs a mask.
inline bool tile_mask(const KernelArgs& a, const Item& it, int64_t t, int64_t n_valid, int64_t n_pad, Scratch& sc) {
  const AttentionLevel& lv = a.levels[it.level];
  const int64_t g = a.group;
  const int64_t i_lo = it.r0 / g, i_hi = (it.r1 - 1) / g;
  const int64_t diagonal = it.kv_len - it.qo_len;  // query i sees keys j <= diagonal + i
  const bool custom = lv.custom_mask != nullptr;
  const bool cut = lv.causal && t + n_valid - 1 > diagonal + i_lo;
  if (!custom && !cut && n_valid == n_pad) return false;
  const int64_t words = n_pad / kWordKeys;
  const int64_t shared = !custom && !cut;  // only the padded tail: one row of words serves all
  const int64_t queries = shared ? 1 : i_hi - i_lo + 1;
  sc.words.resize(static_cast<size_t>(queries * words));
  sc.row_words.resize(static_cast<size_t>(it.r1 - it.r0));
  std::vector<const uint16_t*>& query_words = sc.query_words;
  query_words.resize(static_cast<size_t>(queries));
  for (int64_t qi = 0; qi < queries; ++qi) {
    const int64_t i = i_lo + qi;
    uint16_t* w = sc.words.data() + qi * words;
    uint16_t all = 0xffff;
    for (int64_t k = 0; k < words; ++k) {
      const int64_t j0 = t + k * kWordKeys;  // first key of the word
      const int64_t count = std::min<int64_t>(kWordKeys, n_valid - k * kWordKeys);
      uint16_t bits = low_bits(count);
      if (lv.causal) bits &= low_bits(diagonal + i - j0 + 1);
      if (custom && bits) bits &= mask_bits(lv, it.mask_offset + i * it.kv_len + j0, count);
      w[k] = bits;
      all &= bits;
    }
    query_words[qi] = all == 0xffff ? nullptr : w;
  }
  for (int64_t r = it.r0; r < it.r1; ++r) {
    sc.row_words[r - it.r0] = query_words[shared ? 0 : r / g - i_lo];
  }
  return true;
}

// Writes row r of head hk's final state: o / l and its lse, directly or as a partial state.
inline void finish_row(const KernelArgs& a, const Item& it, int64_t hk, int64_t r, int64_t d, const float* o, float m,
                       float l) {
  const bool seen = l > 0;
  const float inverse = seen ? 1.0f / l : 0.0f;
  const float lse = seen ? static_cast<float>((static_cast<double>(m) + std::log2(static_cast<double>(l))) * kLn2)
                         : -kInf;
  float row[256];
  for (int64_t k = 0; k < d; ++k) row[k] = o[k] * inverse;
  if (it.part_row >= 0) {
    const int64_t pr = it.part_row + (hk - it.hk0) * (it.r1 - it.r0) + (r - it.r0);
    std::memcpy(a.part_o + pr * d, row, static_cast<size_t>(d) * sizeof(float));
    a.part_lse[pr] = lse;
    return;
  }
  const int64_t t = it.q_start + r / a.group, h = hk * a.group + r % a.group;
  const int64_t hq = a.q.num_qo_heads;
  store_row(a.dtype, row, static_cast<char*>(a.output.out) + (t * hq + h) * d * element_size(a.dtype), d);
  a.output.lse[t * hq + h] = lse;
}

// Keys per tile: S [rows, keys], packed K^T and V, Q and O of an item
// stay within a 1 MiB L2. An item over several heads packs all of them at
// once; its tile shrinks so that they take at most 256 KiB.
constexpr int64_t tile_keys(int64_t d) { return d > 128 ? 128 : 256; }
inline int64_t item_tile_keys(int64_t d, int64_t heads) {
  int64_t keys = tile_keys(d);
  while (keys > kWordKeys && heads * keys * d * 8 > (int64_t{256} << 10)) keys /= 2;
  return keys;
}

using RunItem = void (*)(const KernelArgs&, const Item&, Scratch&);

}  // namespace attn

// ---- kernels, once per instruction set ------------------------------------------

#define FORKDEC_ATTENTION_KERNEL_PASS 1
#define FD_NS attn_scalar
#define FD_TARGET
#define FD_ISA_SCALAR 1
#include "attention.cpp"
#undef FD_NS
#undef FD_TARGET
#undef FD_ISA_SCALAR

#if defined(__x86_64__)
#define FD_NS attn_avx2
#define FD_TARGET __attribute__((target("avx2,fma,f16c")))
#define FD_ISA_AVX2 1
#include "attention.cpp"
#undef FD_NS
#undef FD_TARGET
#undef FD_ISA_AVX2

#define FD_NS attn_avx512
#define FD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FD_ISA_AVX512 1
#include "attention.cpp"
#undef FD_NS
#undef FD_TARGET
#undef FD_ISA_AVX512
#endif
#undef FORKDEC_ATTENTION_KERNEL_PASS

namespace attn {
namespace {

RunItem item_kernel() {
  switch (current_isa()) {
#if defined(__x86_64__)
    case Isa::avx512:
      return attn_avx512::run_item;
    case Isa::avx2:
      return attn_avx2::run_item;
#endif
    default:
      return attn_scalar::run_item;
  }
}

// Most rows per item: with tile_keys, S [rows, keys], the packed K^T and V, Q
// and O together stay within a 1 MiB L2.
int64_t max_rows(int64_t d) { return d > 128 ? 96 : 192; }
// Rows below this cost about as much as this many: small items are bound by
// reading K/V, not by arithmetic.
constexpr double kMinRowsCost = 8;
// Requests with at most this many rows per KV head take all KV heads in one
// item: their pages are then read front to back (every head's row of a token
// is adjacent), which is what a bandwidth-bound item needs.
constexpr int64_t kHeadGroupRows = 16;
// Split KV into chunks of at least this many keys, and aim at this many items
// per worker so that dynamic scheduling can balance them.
constexpr int64_t kMinChunk = 512;
constexpr int64_t kItemsPerWorker = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys per chunk of a unit costing about `target` per chunk: whole tiles,
// at least kMinChunk keys (or the whole range).
int64_t chunk_keys(const Item& whole, double target, int64_t d) {
  const int64_t tile = item_tile_keys(d, whole.hk1 - whole.hk0);
  const int64_t tiles = ceil_div(whole.k1, tile);
  const int64_t wanted = std::min(ceil_div(whole.k1, kMinChunk), static_cast<int64_t>(std::ceil(whole.cost / target)));
  return std::max<int64_t>(1, tiles / std::max<int64_t>(wanted, 1)) * tile;
}

int64_t kv_length(const AttentionLevel& lv, int64_t b, int64_t page_size) {
  const int64_t pages = lv.kv_indptr[b + 1] - lv.kv_indptr[b];
  return pages == 0 ? 0 : (pages - 1) * page_size + lv.kv_last_page_len[b];
}

// Where the rows of one request of one level went: head hk's row block
// `block` is unit unit_base + (hk / heads_per_unit) * blocks + block.
struct Group {
  int64_t unit_base = 0;
  int64_t rows_per_block = 1;
  int64_t blocks = 0;
  int64_t heads_per_unit = 1;
  int64_t q_start = 0;
};

// The items computing one (level, request, KV heads, row block), contiguous in Plan::items.
struct Unit {
  int64_t first_item = 0;
  int64_t items = 0;
  bool direct = false;
};

struct Plan {
  std::vector<Item> items;
  std::vector<int64_t> order;                 // items, most expensive first
  std::vector<std::vector<Group>> groups;     // [level][b]
  std::vector<std::vector<int32_t>> row_group;  // [level][t] -> b
  std::vector<Unit> units;
  int64_t part_rows = 0;
  bool needs_combine = false;
};

// The work items of a call: row blocks of every request and KV head, KV split
// into chunks when there are few items for the workers (or when asked to).
Plan make_plan(const QueryView& q, const KvCacheView& kv, const AttentionLevel* levels, int64_t num_levels,
               const AttentionOptions& options, int64_t workers) {
  Plan plan;
  const int64_t hkv = kv.num_kv_heads, g = q.num_qo_heads / hkv, d = q.head_dim;
  plan.groups.resize(static_cast<size_t>(num_levels));
  plan.row_group.resize(static_cast<size_t>(num_levels));
  std::vector<Item> units;  // one item per unit, the whole key range
  for (int64_t level = 0; level < num_levels; ++level) {
    const AttentionLevel& lv = levels[level];
    auto& groups = plan.groups[level];
    groups.resize(static_cast<size_t>(lv.batch));
    auto& row_group = plan.row_group[level];
    row_group.resize(static_cast<size_t>(q.total_q));
    int64_t mask_offset = 0;
    for (int64_t b = 0; b < lv.batch; ++b) {
      const int64_t q_start = lv.qo_indptr[b], qo_len = lv.qo_indptr[b + 1] - q_start;
      const int64_t kv_len = kv_length(lv, b, kv.page_size);
      for (int64_t t = q_start; t < q_start + qo_len; ++t) row_group[t] = static_cast<int32_t>(b);
      Group& group = groups[b];
      group.q_start = q_start;
      const int64_t rows = qo_len * g;
      if (rows > 0) {
        group.blocks = ceil_div(rows, max_rows(d));
        group.rows_per_block = ceil_div(rows, group.blocks);
        group.unit_base = static_cast<int64_t>(units.size());
        group.heads_per_unit = rows <= kHeadGroupRows ? hkv : 1;
        for (int64_t hk = 0; hk < hkv; hk += group.heads_per_unit) {
          for (int64_t block = 0; block < group.blocks; ++block) {
            Item it{};
            it.level = level;
            it.b = b;
            it.hk0 = hk;
            it.hk1 = hk + group.heads_per_unit;
            it.r0 = block * group.rows_per_block;
            it.r1 = std::min(rows, it.r0 + group.rows_per_block);
            it.q_start = q_start;
            it.qo_len = qo_len;
            it.kv_len = kv_len;
            it.mask_offset = mask_offset;
            it.page_begin = lv.kv_indptr[b];
            it.k0 = 0;
            // Causal: the block's last query sees the most keys; none past them.
            it.k1 = lv.causal ? std::clamp<int64_t>(kv_len - qo_len + (it.r1 - 1) / g + 1, 0, kv_len) : kv_len;
            it.cost = std::max<double>(it.r1 - it.r0, kMinRowsCost) * static_cast<double>(it.k1) *
                      static_cast<double>(group.heads_per_unit);
            units.push_back(it);
          }
        }
      }
      mask_offset += qo_len * kv_len;
    }
  }
  double total = 0;
  for (const Item& u : units) total += u.cost;
  const double target = total / static_cast<double>(std::max<int64_t>(1, workers * kItemsPerWorker));
  plan.units.resize(units.size());
  for (size_t u = 0; u < units.size(); ++u) {
    const Item& whole = units[u];
    int64_t chunk = whole.k1;
    if (options.kv_chunk > 0) {
      chunk = options.kv_chunk;
    } else if (workers > 1 && whole.cost > target) {
      chunk = chunk_keys(whole, target, d);
    }
    Unit& unit = plan.units[u];
    unit.first_item = static_cast<int64_t>(plan.items.size());
    for (int64_t k0 = 0; k0 < whole.k1; k0 += std::max<int64_t>(chunk, 1)) {
      Item it = whole;
      it.k0 = k0;
      it.k1 = std::min(whole.k1, k0 + chunk);
      it.cost = whole.cost * static_cast<double>(it.k1 - it.k0) / static_cast<double>(whole.k1);
      plan.items.push_back(it);
    }
    unit.items = static_cast<int64_t>(plan.items.size()) - unit.first_item;
    unit.direct = num_levels == 1 && unit.items == 1;
    if (!unit.direct) plan.needs_combine = true;
    for (int64_t i = unit.first_item; i < unit.first_item + unit.items; ++i) {
      Item& it = plan.items[static_cast<size_t>(i)];
      it.part_row = -1;
      if (!unit.direct) {
        it.part_row = plan.part_rows;
        plan.part_rows += (it.r1 - it.r0) * (it.hk1 - it.hk0);
      }
    }
  }
  plan.order.resize(plan.items.size());
  std::iota(plan.order.begin(), plan.order.end(), 0);
  std::stable_sort(plan.order.begin(), plan.order.end(),
                   [&](int64_t x, int64_t y) { return plan.items[x].cost > plan.items[y].cost; });
  return plan;
}

// Runs body(worker) on `workers` workers (serially without a runner).
void run_workers(const Threads& threads, int64_t workers, const std::function<void(int64_t)>& body) {
  if (workers <= 1 || !threads.run) {
    for (int64_t w = 0; w < workers; ++w) body(w);
    return;
  }
  threads.run(workers, body);
}

// Runs f(begin, end) over [0, n) split into contiguous ranges, one per worker.
template <class F>
void parallel_ranges(const Threads& threads, int64_t n, int64_t min_per_worker, F&& f) {
  const int64_t workers = std::clamp<int64_t>(n / std::max<int64_t>(min_per_worker, 1), 1, std::max<int64_t>(threads.count, 1));
  run_workers(threads, workers, [&](int64_t w) {
    const int64_t begin = n * w / workers, end = n * (w + 1) / workers;
    if (begin < end) f(begin, end);
  });
}

// Merges n states (o_k [D] of element type T, lse_k natural log) into out_f32, *lse_out.
template <class T>
void merge_row(const T* const* o, const float* lse, int64_t n, int64_t d, float* out, float* lse_out) {
  float top = -kInf;
  bool nan = false;
  for (int64_t k = 0; k < n; ++k) {
    nan |= std::isnan(lse[k]);
    top = std::max(top, lse[k]);
  }
  std::fill(out, out + d, 0.0f);
  if (nan || std::isinf(top)) {  // nothing seen (-inf), or a state that no finite weight describes
    *lse_out = nan ? std::numeric_limits<float>::quiet_NaN() : top;
    return;
  }
  constexpr int64_t kStack = 16;
  float stack[kStack];
  std::vector<float> heap(n > kStack ? static_cast<size_t>(n) : 0);
  float* weight = n > kStack ? heap.data() : stack;
  float sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += weight[k] = std::exp(lse[k] - top);
  const float inverse = 1.0f / sum;
  for (int64_t k = 0; k < n; ++k) {
    const float w = weight[k] * inverse;
    if (w == 0.0f) continue;
    for (int64_t i = 0; i < d; ++i) out[i] += w * to_float(o[k][i]);
  }
  *lse_out = top + std::log(sum);
}

// Final states of the rows not written directly: every level's chunks merged.
void combine(const KernelArgs& a, const Plan& plan, int64_t num_levels, const Threads& threads) {
  const int64_t hq = a.q.num_qo_heads, d = a.q.head_dim, g = a.group;
  parallel_ranges(threads, a.q.total_q, 16, [&](int64_t begin, int64_t end) {
    std::vector<const float*> o;
    std::vector<float> lse;
    std::vector<float> row(static_cast<size_t>(d));
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < hq; ++h) {
        o.clear();
        lse.clear();
        bool direct = false;
        for (int64_t level = 0; level < num_levels; ++level) {
          const Group& group = plan.groups[level][plan.row_group[level][t]];
          const int64_t r = (t - group.q_start) * g + h % g, hk = h / g;
          const Unit& unit =
              plan.units[group.unit_base + (hk / group.heads_per_unit) * group.blocks + r / group.rows_per_block];
          direct |= unit.direct;
          if (unit.direct) continue;  // its item wrote the output itself: part_row is -1
          for (int64_t i = unit.first_item; i < unit.first_item + unit.items; ++i) {
            const Item& it = plan.items[static_cast<size_t>(i)];
            const int64_t pr = it.part_row + (hk - it.hk0) * (it.r1 - it.r0) + (r - it.r0);
            o.push_back(a.part_o + pr * d);
            lse.push_back(a.part_lse[pr]);
          }
        }
        if (direct) continue;  // one level, one item: already final
        float* lse_out = a.output.lse + t * hq + h;
        merge_row(o.data(), lse.data(), static_cast<int64_t>(o.size()), d, row.data(), lse_out);
        store_row(a.dtype, row.data(), static_cast<char*>(a.output.out) + (t * hq + h) * d * element_size(a.dtype), d);
      }
    }
  });
}

// Working memory of the calling thread: partial states, kept across calls.
struct CallBuffers {
  FloatBuffer part_o, part_lse;
};

}  // namespace
}  // namespace attn

// ---- public API ------------------------------------------------------------------

void attention(DType dtype, const QueryView& q, const KvCacheView& kv, const AttentionLevel* levels,
               int64_t num_levels, const AttentionOptions& options, const AttentionOutput& output,
               const Threads& threads) {
  using namespace attn;
  if (q.total_q == 0 || q.num_qo_heads == 0) return;
  const int64_t workers = std::max<int64_t>(threads.count, 1);
  const Plan plan = make_plan(q, kv, levels, num_levels, options, workers);
  thread_local CallBuffers buffers;
  KernelArgs a{dtype, q, kv, levels, options.sm_scale * kLog2e, q.num_qo_heads / kv.num_kv_heads, output,
               buffers.part_o.get(std::max<int64_t>(plan.part_rows * q.head_dim, 1)),
               buffers.part_lse.get(std::max<int64_t>(plan.part_rows, 1))};
  const RunItem run_item = item_kernel();
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(plan.items.size());
  run_workers(threads, std::min(workers, n), [&](int64_t) {
    thread_local Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      run_item(a, plan.items[static_cast<size_t>(plan.order[i])], scratch);
    }
  });
  if (plan.needs_combine) combine(a, plan, num_levels, threads);
}

void merge_states(DType dtype, const StateView* states, int64_t num_states, int64_t num_tokens, int64_t num_heads,
                  int64_t head_dim, void* out, float* lse_out, const Threads& threads) {
  using namespace attn;
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    parallel_ranges(threads, num_tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<const T*> o(static_cast<size_t>(num_states));
      std::vector<float> lse(static_cast<size_t>(num_states));
      std::vector<float> row(static_cast<size_t>(head_dim));
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < num_heads; ++h) {
          for (int64_t k = 0; k < num_states; ++k) {
            const StateView& s = states[k];
            o[k] = static_cast<const T*>(s.o) + t * s.o_stride_token + h * s.o_stride_head;
            lse[k] = s.lse[t * s.lse_stride_token + h * s.lse_stride_head];
          }
          merge_row(o.data(), lse.data(), num_states, head_dim, row.data(), lse_out + t * num_heads + h);
          store_row(dtype, row.data(), static_cast<T*>(out) + (t * num_heads + h) * head_dim, head_dim);
        }
      }
    });
  });
}

void append_kv(const AppendTarget& k_cache, const AppendTarget& v_cache, int64_t page_size, int64_t num_kv_heads,
               int64_t head_dim, const void* k, const void* v, const int64_t* slots, int64_t num_tokens,
               const Threads& threads) {
  auto write = [&](const AppendTarget& cache, const void* src, int64_t n) {
    const size_t row_bytes = static_cast<size_t>(head_dim * cache.element_size);
    const int64_t page = slots[n] / page_size, offset = slots[n] % page_size;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      char* dst = static_cast<char*>(cache.cache) +
                  (page * cache.stride_page + offset * cache.stride_token + h * cache.stride_head) * cache.element_size;
      std::memcpy(dst, static_cast<const char*>(src) + (n * num_kv_heads + h) * row_bytes, row_bytes);
    }
  };
  attn::parallel_ranges(threads, num_tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      write(k_cache, k, n);
      write(v_cache, v, n);
    }
  });
}

const char* attention_isa() { return isa_name(current_isa()); }

}  // namespace forkdec::cpu

#else  // FORKDEC_ATTENTION_KERNEL_PASS: the kernels, compiled once per instruction set

// Included inside namespace forkdec::cpu.
namespace FD_NS {

using namespace attn;

// ---- vector shim: V holds W floats ---------------------------------------------------

#if defined(FD_ISA_AVX512)

using V = __m512;
constexpr int W = 16;
constexpr int kQkRows = 6, kQkPanels = 4;  // S micro-tile: 6 rows x 64 keys, 24 accumulators
constexpr int kPvRows = 6, kPvVectors = 4;  // O micro-tile: 6 rows x 64 columns

FD_TARGET inline V vzero() { return _mm512_setzero_ps(); }
FD_TARGET inline V vset(float x) { return _mm512_set1_ps(x); }
FD_TARGET inline V vload(const float* p) { return _mm512_loadu_ps(p); }
FD_TARGET inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
FD_TARGET inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
FD_TARGET inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
FD_TARGET inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
FD_TARGET inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
FD_TARGET inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
FD_TARGET inline float vreduce_max(V v) { return _mm512_reduce_max_ps(v); }
FD_TARGET inline float vreduce_add(V v) { return _mm512_reduce_add_ps(v); }

// Lanes of vector v (keys v*W ...) whose mask bit is 0 become `fill`.
FD_TARGET inline V vkeep(V x, const uint16_t* words, int64_t v, V fill) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>(words[v]), fill, x);
}

// 2^x for finite x <= 0 (masked lanes are replaced afterwards, so any value
// may pass). scalef needs no clamping: a very negative n gives 0.
FD_TARGET inline V vexp2(V x) {
  const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V r = vsub(x, n);
  V p = vset(kExp2Poly[5]);
  for (int k = 4; k >= 0; --k) p = vfma(p, r, vset(kExp2Poly[k]));
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result is the sum of the lanes of a[i].
FD_TARGET inline V vsum_lanes(V (&a)[16]) {
  V t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // 128-bit lane j of t[i]: a[2i] and a[2i+1] folded to 2 values each
    t[i] = vadd(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane j of u[i]: a[4i..4i+3], each folded over that lane
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = vadd(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const V lo01 = _mm512_shuffle_f32x4(u[0], u[1], 0x44), hi01 = _mm512_shuffle_f32x4(u[0], u[1], 0xee);
  const V lo23 = _mm512_shuffle_f32x4(u[2], u[3], 0x44), hi23 = _mm512_shuffle_f32x4(u[2], u[3], 0xee);
  const V x01 = vadd(lo01, hi01), x23 = vadd(lo23, hi23);  // 128-bit lanes: u0 0+2, u0 1+3, u1 0+2, u1 1+3
  return vadd(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xdd));
}

FD_TARGET inline V vload_as_float(const float* p) { return _mm512_loadu_ps(p); }
FD_TARGET inline V vload_as_float(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FD_TARGET inline V vload_as_float(const BFloat* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// In-register transpose of 16 rows of 16 floats.
FD_TARGET inline void transpose(V (&r)[16]) {
  V t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: columns c, c + 4, c + 8, c + 12 of rows i..i+3
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {
    const V even_a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), even_b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const V odd_a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd), odd_b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(even_a, even_b, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(even_a, even_b, 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(odd_a, odd_b, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(odd_a, odd_b, 0xdd);
  }
}

#elif defined(FD_ISA_AVX2)

using V = __m256;
constexpr int W = 8;
constexpr int kQkRows = 6, kQkPanels = 2;  // 12 accumulators of 16 ymm registers
constexpr int kPvRows = 6, kPvVectors = 2;

FD_TARGET inline V vzero() { return _mm256_setzero_ps(); }
FD_TARGET inline V vset(float x) { return _mm256_set1_ps(x); }
FD_TARGET inline V vload(const float* p) { return _mm256_loadu_ps(p); }
FD_TARGET inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
FD_TARGET inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
FD_TARGET inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
FD_TARGET inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
FD_TARGET inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
FD_TARGET inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
FD_TARGET inline float vreduce_max(V v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
FD_TARGET inline float vreduce_add(V v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

FD_TARGET inline V vkeep(V x, const uint16_t* words, int64_t v, V fill) {
  const int bits = (words[v >> 1] >> ((v & 1) * 8)) & 0xff;
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bit), lane_bit);
  return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(set));
}

// 2^x for x <= 0; the clamp keeps n + 127 a valid exponent (2^-126 ~ 0 here).
FD_TARGET inline V vexp2(V x) {
  x = _mm256_min_ps(_mm256_max_ps(x, vset(-126.0f)), vset(127.0f));
  const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V r = vsub(x, n);
  V p = vset(kExp2Poly[5]);
  for (int k = 4; k >= 0; --k) p = vfma(p, r, vset(kExp2Poly[k]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return vmul(p, _mm256_castsi256_ps(e));
}

// Lane i of the result is the sum of the lanes of a[i].
FD_TARGET inline V vsum_lanes(V (&a)[8]) {
  V t[4], u[2];
  for (int i = 0; i < 4; ++i) {
    t[i] = vadd(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {  // 128-bit half j of u[i]: a[4i..4i+3], each folded over that half
    const __m256d x = _mm256_castps_pd(t[2 * i]), y = _mm256_castps_pd(t[2 * i + 1]);
    u[i] = vadd(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return vadd(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

FD_TARGET inline V vload_as_float(const float* p) { return _mm256_loadu_ps(p); }
FD_TARGET inline V vload_as_float(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FD_TARGET inline V vload_as_float(const BFloat* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// In-register transpose of 8 rows of 8 floats.
FD_TARGET inline void transpose(V (&r)[8]) {
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + c]: columns c, c + 4 of rows i..i+3
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

#else  // scalar: one lane; the same kernels, for CPUs without AVX2 and for other architectures

using V = float;
constexpr int W = 1;
constexpr int kQkRows = 4, kQkPanels = 4;
constexpr int kPvRows = 4, kPvVectors = 4;

inline V vzero() { return 0.0f; }
inline V vset(float x) { return x; }
inline V vload(const float* p) { return *p; }
inline void vstore(float* p, V v) { *p = v; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline V vmul(V a, V b) { return a * b; }
inline V vadd(V a, V b) { return a + b; }
inline V vsub(V a, V b) { return a - b; }
inline V vmax(V a, V b) { return std::max(a, b); }
inline float vreduce_max(V v) { return v; }
inline float vreduce_add(V v) { return v; }
inline V vkeep(V x, const uint16_t* words, int64_t v, V fill) { return (words[v >> 4] >> (v & 15)) & 1 ? x : fill; }
inline V vexp2(V x) { return std::exp2(x); }
template <class T>
inline V vload_as_float(const T* p) { return to_float(*p); }
inline void transpose(V (&)[1]) {}
inline V vsum_lanes(V (&a)[1]) { return a[0]; }

#endif

// ---- packing ---------------------------------------------------------------------------

// Where a tile's K/V rows are: pointers to head hk0's rows, and the byte
// distance to the next head's.
struct TileRows {
  const char** k;
  const char** v;
  int64_t k_head_bytes, v_head_bytes;
  int64_t heads;  // heads the item reads
};

// A load whose value nobody needs. Unlike a prefetch instruction it is never
// dropped when the memory system is saturated (measured: for the
// bandwidth-bound items, prefetches barely helped and touches did), but a
// miss stalls retirement.
inline void touch(const char* p) { (void)*static_cast<const volatile char*>(p); }

// Asks for keys [begin, end) of a tile's K/V rows (every head) ahead of their
// use. Pages sit anywhere, so the hardware prefetchers cannot guess them.
// `touch_all`: load every line, for bandwidth-bound items (their arithmetic
// cannot hide a miss anyway); else prefetch, which never stalls the
// arithmetic of a compute-bound item.
FD_TARGET inline void prefetch_keys(const TileRows& rows, int64_t begin, int64_t end, int64_t row_bytes,
                                    bool touch_all) {
  for (int64_t key = begin; key < end; ++key) {
    for (int64_t h = 0; h < rows.heads; ++h) {
      const char* k = rows.k[key] + h * rows.k_head_bytes;
      const char* v = rows.v[key] + h * rows.v_head_bytes;
      if (touch_all) {
        for (int64_t b = 0; b < row_bytes; b += 64) {
          touch(k + b);
          touch(v + b);
        }
        continue;
      }
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(k + b, 0, 2);
        __builtin_prefetch(v + b, 0, 2);
      }
    }
  }
}

// The next tile's rows, prefetched in `parts` even steps spread over the
// current tile's micro-kernel calls, so that the requests trickle out while
// the arithmetic runs instead of flooding the memory system at once.
struct Prefetch {
  const TileRows* rows = nullptr;  // null: nothing to prefetch
  int64_t keys = 0, row_bytes = 0;
  int64_t parts = 1, done = 0;
  bool touch_all = false;
};

FD_TARGET inline void prefetch_step(Prefetch& pf) {
  if (pf.rows == nullptr || pf.done >= pf.parts) return;
  prefetch_keys(*pf.rows, pf.keys * pf.done / pf.parts, pf.keys * (pf.done + 1) / pf.parts, pf.row_bytes,
                pf.touch_all);
  ++pf.done;
}

// Whatever the steps did not cover yet.
FD_TARGET inline void prefetch_rest(Prefetch& pf) {
  if (pf.rows == nullptr || pf.done >= pf.parts) return;
  prefetch_keys(*pf.rows, pf.keys * pf.done / pf.parts, pf.keys, pf.row_bytes, pf.touch_all);
  pf.done = pf.parts;
}

// One head's K rows [key0, key0 + W) as a panel of K^T: kt[(d * W) + lane] is
// key key0 + lane, dimension d; keys from n_valid on are zero.
template <int D, class T>
FD_TARGET inline void pack_key_panel(const char* const* k_rows, int64_t offset, int64_t key0, int64_t n_valid,
                                     float* kt) {
  for (int d0 = 0; d0 < D; d0 += W) {
    V r[W];
    for (int i = 0; i < W; ++i) {
      const int64_t key = key0 + i;
      r[i] = key < n_valid ? vload_as_float(reinterpret_cast<const T*>(k_rows[key] + offset) + d0) : vzero();
    }
    transpose(r);
    for (int i = 0; i < W; ++i) vstore(kt + (d0 + i) * W, r[i]);
  }
}

// Packs keys [0, n_pad) of every head of the item, walking the rows in memory
// order (a token's heads are adjacent, a page's tokens too) so that the
// hardware prefetchers see one stream per page:
//  - K^T of head h in panels of W keys at kt + h * stride: element
//    (p * D + d) * W + lane is key p * W + lane, dimension d (zero past n_valid);
//  - V of head h as fp32 rows [key, D] at vt + h * stride. Copying fp32 V too
//    keeps the P V micro-kernel on one sequential stream: rows in place can sit
//    4 KiB apart (Hkv * D * 4 bytes) and then share a few L1 sets.
// A tile that nothing prefetched (an item's first) prefetches its own rows a
// few panels ahead.
template <int D, class T>
FD_TARGET void pack_tile(const TileRows& rows, int64_t n_valid, int64_t n_pad, int64_t stride_rows, float* kt,
                         float* vt, bool prefetch) {
  constexpr int64_t kAhead = 2 * kWordKeys;  // keys
  constexpr int64_t kRowBytes = D * sizeof(T);
  const int64_t stride = stride_rows * D;
  if (prefetch) prefetch_keys(rows, 0, std::min(n_valid, kAhead), kRowBytes, false);
  for (int64_t p = 0; p < n_pad / W; ++p) {
    const int64_t ahead = p * W + kAhead;
    if (prefetch && ahead < n_valid) prefetch_keys(rows, ahead, std::min(n_valid, ahead + W), kRowBytes, false);
    for (int64_t h = 0; h < rows.heads; ++h) {
      pack_key_panel<D, T>(rows.k, h * rows.k_head_bytes, p * W, n_valid, kt + h * stride + p * D * W);
    }
    const int64_t end = std::min(n_valid, (p + 1) * W);
    for (int64_t key = p * W; key < end; ++key) {
      for (int64_t h = 0; h < rows.heads; ++h) {
        const T* src = reinterpret_cast<const T*>(rows.v[key] + h * rows.v_head_bytes);
        float* dst = vt + h * stride + key * D;
        for (int d = 0; d < D; d += W) vstore(dst + d, vload_as_float(src + d));
      }
    }
  }
}

// Head hk's queries of the item, times q_scale: row r = query r / g, head hk * g + r % g.
template <int D, class T>
FD_TARGET void pack_queries(const KernelArgs& a, const Item& it, int64_t hk, float* qp) {
  const T* q = static_cast<const T*>(a.q.q);
  const V scale = vset(a.q_scale);
  for (int64_t r = it.r0; r < it.r1; ++r) {
    const int64_t t = it.q_start + r / a.group, h = hk * a.group + r % a.group;
    const T* src = q + t * a.q.stride_token + h * a.q.stride_head;
    for (int d = 0; d < D; d += W) vstore(qp + (r - it.r0) * D + d, vmul(vload_as_float(src + d), scale));
  }
}

// ---- S = Q K^T -----------------------------------------------------------------------------

// R rows of S for C panels (C * W keys): s[r][c * W + lane] = q[r] . key.
template <int D, int R, int C>
FD_TARGET inline void qk_block(const float* q, const float* kt, float* s, int64_t s_stride) {
  V acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = vzero();
  for (int d = 0; d < D; ++d) {
    V k[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) k[c] = vload(kt + (c * D + d) * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V qv = vset(q[r * D + d]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(qv, k[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vstore(s + r * s_stride + c * W, acc[r][c]);
}

// All rows for C panels: full blocks of kQkRows rows, then the rest.
template <int D, int C, int R = kQkRows>
FD_TARGET void qk_rows(const float* q, int64_t rows, const float* kt, float* s, int64_t s_stride, Prefetch& pf) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    qk_block<D, R, C>(q + r * D, kt, s + r * s_stride, s_stride);
    prefetch_step(pf);
  }
  const int64_t rest = rows - r;
  if constexpr (R > 1) {
    if (rest > 0) qk_rows<D, C, R - 1>(q + r * D, rest, kt, s + r * s_stride, s_stride, pf);
  }
}

template <int D, int C = kQkPanels>
FD_TARGET void qk_tail(const float* q, int64_t rows, const float* kt, int64_t panels, float* s, int64_t s_stride,
                       Prefetch& pf) {
  if constexpr (C > 0) {
    if (panels == C) return qk_rows<D, C>(q, rows, kt, s, s_stride, pf);
    qk_tail<D, C - 1>(q, rows, kt, panels, s, s_stride, pf);
  }
}

// S [rows, n_pad] for the whole tile, panel block by panel block (the block's
// K^T stays in L1 while every row block passes over it).
template <int D>
FD_TARGET void qk_tile(const float* q, int64_t rows, const float* kt, int64_t n_pad, float* s, Prefetch& pf) {
  const int64_t panels = n_pad / W;
  int64_t p = 0;
  for (; p + kQkPanels <= panels; p += kQkPanels) {
    qk_rows<D, kQkPanels>(q, rows, kt + p * D * W, s + p * W, n_pad, pf);
  }
  if (p < panels) qk_tail<D>(q, rows, kt + p * D * W, panels - p, s + p * W, n_pad, pf);
}

// S [rows, n_pad] straight from head `head`'s K rows in the cache, for items
// with few rows: a dot product per key over D, W keys' sums folded into one
// vector at a time. Cheaper than transposing K when few rows reuse it. The
// first tile of an item (prefetch) asks for its rows a little ahead.
template <int D, class T>
FD_TARGET void qk_direct(const float* q, int64_t rows, const TileRows& k, int64_t head, int64_t n_valid,
                         int64_t n_pad, float* s, bool prefetch, Prefetch& pf) {
  constexpr int64_t kAhead = 2 * kWordKeys;  // keys
  const int64_t offset = head * k.k_head_bytes;
  prefetch = prefetch && head == 0;
  if (prefetch) prefetch_keys(k, 0, std::min(n_valid, kAhead), D * sizeof(T), true);
  for (int64_t k0 = 0; k0 < n_pad; k0 += W) {
    if (prefetch && k0 + kAhead < n_valid) {
      prefetch_keys(k, k0 + kAhead, std::min(n_valid, k0 + kAhead + W), D * sizeof(T), true);
    }
    const T* rows_k[W];
    for (int i = 0; i < W; ++i) {
      rows_k[i] = k0 + i < n_valid ? reinterpret_cast<const T*>(k.k[k0 + i] + offset)
                                   : reinterpret_cast<const T*>(kZeroRow);
    }
    for (int64_t r = 0; r < rows; ++r) {
      V acc[W];
      for (int i = 0; i < W; ++i) acc[i] = vzero();
      for (int d = 0; d < D; d += W) {
        const V qv = vload(q + r * D + d);
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) acc[i] = vfma(qv, vload_as_float(rows_k[i] + d), acc[i]);
      }
      vstore(s + r * n_pad + k0, vsum_lanes(acc));
    }
    prefetch_step(pf);
  }
}

// ---- online softmax -----------------------------------------------------------------------

// One row of the tile: updates the running max m and sum l, returns the factor
// alpha that rescales the row's O, and turns s into P = 2^(s - m) (0 where
// masked). A row that has seen no key yet keeps m = -inf and P = 0.
FD_TARGET inline float softmax_row(float* s, int64_t vectors, const uint16_t* words, float& m, float& l) {
  V top = vset(-kInf);
  if (words) {
    for (int64_t v = 0; v < vectors; ++v) top = vmax(top, vkeep(vload(s + v * W), words, v, vset(-kInf)));
  } else {
    for (int64_t v = 0; v < vectors; ++v) top = vmax(top, vload(s + v * W));
  }
  const float m_new = std::max(m, vreduce_max(top));
  if (m_new == -kInf) {
    for (int64_t v = 0; v < vectors; ++v) vstore(s + v * W, vzero());
    return 1.0f;
  }
  const float alpha = std::exp2(m - m_new);
  const V shift = vset(m_new);
  V sum = vzero();
  if (words) {
    for (int64_t v = 0; v < vectors; ++v) {
      const V p = vkeep(vexp2(vsub(vload(s + v * W), shift)), words, v, vzero());
      vstore(s + v * W, p);
      sum = vadd(sum, p);
    }
  } else {
    for (int64_t v = 0; v < vectors; ++v) {
      const V p = vexp2(vsub(vload(s + v * W), shift));
      vstore(s + v * W, p);
      sum = vadd(sum, p);
    }
  }
  l = l * alpha + vreduce_add(sum);
  m = m_new;
  return alpha;
}

// ---- O = O * alpha + P V -----------------------------------------------------------------

// Where P V reads V rows from: a packed fp32 tile, or the cache's pages in place.
struct PackedRows {
  const float* v;
  int64_t stride;
  const float* row(int64_t k) const { return v + k * stride; }
};
template <class T>
struct PagedRows {
  const char* const* rows;
  int64_t offset;  // bytes, to the item's head
  const T* row(int64_t k) const { return reinterpret_cast<const T*>(rows[k] + offset); }
};

// R rows x NV vectors of O (columns [col, col + NV * W)) over keys [0, n).
template <int R, int NV, class Rows>
FD_TARGET inline void pv_block(const float* p, int64_t p_stride, const Rows& v, int64_t col, int64_t n,
                               const float* alpha, float* o, int64_t o_stride) {
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const V a = vset(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = vmul(vload(o + r * o_stride + col + c * W), a);
  }
  for (int64_t k = 0; k < n; ++k) {
    const auto* row = v.row(k) + col;
    V x[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) x[c] = vload_as_float(row + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V pr = vset(p[r * p_stride + k]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = vfma(pr, x[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) vstore(o + r * o_stride + col + c * W, acc[r][c]);
}

template <int NV, class Rows, int R = kPvRows>
FD_TARGET void pv_rows(const float* p, int64_t p_stride, int64_t rows, const Rows& v, int64_t col, int64_t n,
                       const float* alpha, float* o, int64_t o_stride, Prefetch& pf) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    pv_block<R, NV>(p + r * p_stride, p_stride, v, col, n, alpha + r, o + r * o_stride, o_stride);
    prefetch_step(pf);
  }
  const int64_t rest = rows - r;
  if constexpr (R > 1) {
    if (rest > 0) {
      pv_rows<NV, Rows, R - 1>(p + r * p_stride, p_stride, rest, v, col, n, alpha + r, o + r * o_stride, o_stride, pf);
    }
  }
}

// O [rows, D] += P [rows, n] V [n, D], in column blocks of kPvVectors vectors.
template <int D, class Rows>
FD_TARGET void pv_tile(const float* p, int64_t p_stride, int64_t rows, const Rows& v, int64_t n, const float* alpha,
                       float* o, Prefetch& pf) {
  constexpr int kBlock = kPvVectors * W;
  int col = 0;
  for (; col + kBlock <= D; col += kBlock) pv_rows<kPvVectors>(p, p_stride, rows, v, col, n, alpha, o, D, pf);
  constexpr int kRest = (D % kBlock) / W;
  if constexpr (kRest > 0) pv_rows<kRest>(p, p_stride, rows, v, col, n, alpha, o, D, pf);
}

// Micro-kernel calls of one head's tile: the steps a Prefetch spreads over.
template <int D>
constexpr int64_t tile_steps(int64_t rows, int64_t n_pad, bool direct) {
  const int64_t col_blocks = (D + kPvVectors * W - 1) / (kPvVectors * W);
  const int64_t pv_steps = (rows + kPvRows - 1) / kPvRows * col_blocks;
  if (direct) return n_pad / W + pv_steps;
  const int64_t panel_blocks = (n_pad / W + kQkPanels - 1) / kQkPanels;
  return (rows + kQkRows - 1) / kQkRows * panel_blocks + pv_steps;
}

// ---- one work item -------------------------------------------------------------------------

// Items with at most this many rows per head read K and V in place: packing
// (transposing K) would cost more than the few rows save by reusing it.
constexpr int64_t kDirectRows = 8;

template <int D, class T>
FD_TARGET void run_item_typed(const KernelArgs& a, const Item& it, Scratch& sc) {
  const int64_t rows = it.r1 - it.r0, heads = it.hk1 - it.hk0, all = rows * heads;
  const bool direct = rows <= kDirectRows;
  const int64_t tile = direct ? tile_keys(D) : item_tile_keys(D, heads);
  float* q = sc.q.get(all * D);  // head h's rows start at h * rows (q, o, m, l, alpha)
  float* o = sc.o.get(all * D);
  float* s = sc.s.get(rows * tile);
  float* kt = direct ? nullptr : sc.kt.get(heads * tile * D);
  float* vt = direct ? nullptr : sc.vt.get(heads * tile * D);
  float* m = sc.m.get(all);
  float* l = sc.l.get(all);
  float* alpha = sc.alpha.get(all);
  for (auto* rows_of : {&sc.k_rows, &sc.v_rows, &sc.k_next, &sc.v_next}) rows_of->resize(static_cast<size_t>(tile));
  const int64_t es = sizeof(T);
  TileRows cur{sc.k_rows.data(), sc.v_rows.data(), a.kv.k_stride_head * es, a.kv.v_stride_head * es, heads};
  TileRows next{sc.k_next.data(), sc.v_next.data(), cur.k_head_bytes, cur.v_head_bytes, heads};

  for (int64_t h = 0; h < heads; ++h) pack_queries<D, T>(a, it, it.hk0 + h, q + h * rows * D);
  std::fill(o, o + all * D, 0.0f);
  std::fill(m, m + all, -kInf);
  std::fill(l, l + all, 0.0f);
  if (it.k0 < it.k1) gather_rows(a, it, it.k0, std::min(tile, it.k1 - it.k0), cur.k, cur.v);
  for (int64_t t = it.k0; t < it.k1; t += tile) {
    const int64_t n = std::min(tile, it.k1 - t);
    const int64_t n_pad = (n + kWordKeys - 1) / kWordKeys * kWordKeys;
    if (!direct) pack_tile<D, T>(cur, n, n_pad, tile, kt, vt, t == it.k0);
    const bool masked = tile_mask(a, it, t, n, n_pad, sc);  // the same for every head
    const int64_t n_next = std::clamp<int64_t>(it.k1 - t - tile, 0, tile);
    Prefetch pf;
    if (n_next > 0) {
      gather_rows(a, it, t + tile, n_next, next.k, next.v);
      pf = Prefetch{&next, n_next, D * es, heads * tile_steps<D>(rows, n_pad, direct), 0, direct};
    }
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = h * rows;
      if (direct) {
        qk_direct<D, T>(q + base * D, rows, cur, h, n, n_pad, s, t == it.k0, pf);
      } else {
        qk_tile<D>(q + base * D, rows, kt + h * tile * D, n_pad, s, pf);
      }
      for (int64_t r = 0; r < rows; ++r) {
        alpha[base + r] =
            softmax_row(s + r * n_pad, n_pad / W, masked ? sc.row_words[r] : nullptr, m[base + r], l[base + r]);
      }
      if (direct) {
        pv_tile<D>(s, n_pad, rows, PagedRows<T>{cur.v, h * cur.v_head_bytes}, n, alpha + base, o + base * D, pf);
      } else {
        pv_tile<D>(s, n_pad, rows, PackedRows{vt + h * tile * D, D}, n, alpha + base, o + base * D, pf);
      }
    }
    prefetch_rest(pf);
    std::swap(cur.k, next.k);
    std::swap(cur.v, next.v);
  }
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = h * rows + r;
      finish_row(a, it, it.hk0 + h, it.r0 + r, D, o + i * D, m[i], l[i]);
    }
  }
}

template <int D>
FD_TARGET void run_item_d(const KernelArgs& a, const Item& it, Scratch& sc) {
  switch (a.dtype) {
    case DType::f16:
      return run_item_typed<D, Half>(a, it, sc);
    case DType::bf16:
      return run_item_typed<D, BFloat>(a, it, sc);
    default:
      return run_item_typed<D, float>(a, it, sc);
  }
}

FD_TARGET void run_item(const KernelArgs& a, const Item& it, Scratch& sc) {
  switch (a.q.head_dim) {
    case 32:
      return run_item_d<32>(a, it, sc);
    case 64:
      return run_item_d<64>(a, it, sc);
    case 96:
      return run_item_d<96>(a, it, sc);
    case 128:
      return run_item_d<128>(a, it, sc);
    default:
      return run_item_d<256>(a, it, sc);
  }
}

}  // namespace FD_NS

#endif  // FORKDEC_ATTENTION_KERNEL_PASS
