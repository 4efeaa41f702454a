// Sampling from one row of logits without sorting the vocabulary (contract in
// sampling.h, semantics in docs/sampling.md).
//
// Why this shape. Sorting V = 150k logits per row costs far more than reading
// them, so no step here sorts the vocabulary:
//  * top-k (the usual k of tens) is a streaming threshold selection: one pass
//    converts, scales and compares 16 (AVX-512) or 8 (AVX2) logits at a time
//    against the current k-th largest value; only the rare lanes at or above it
//    enter a small buffer, which is cut back to its k largest (nth_element) when
//    it fills, raising the threshold. Greedy is the same scan with k = 1. The
//    softmax is then computed over the few survivors only.
//  * without top-k, the row is scaled into a scratch buffer (pass 1, with the
//    max) and exponentiated in place with the row sum (pass 2) - the softmax
//    structure without any running-max rescaling.
//  * top-p is a pivot search on probability values (quickselect on the
//    survivors' weights, comparing masses instead of ranks): expected linear.
//  * the draw is an inverse CDF in index order over block sums (one per 64
//    weights, accumulated in double), so many draws from one row cost one walk.
//  * the signals (row_signals: the log-sum-exp of the raw logits and their k
//    largest values) are one more streaming pass: per chunk of 8 vectors a
//    lane-wise max, one rescale of the running sums, one exp per logit, and
//    the same threshold selection as top-k.
// Every path computes exp with the same operations (an FMA polynomial), so the
// scalar, AVX2 and AVX-512 paths return identical tokens.
//
// Like xquant.cpp, the file has two parts: this #ifndef branch (scalar code,
// filters, the draw, the public API) includes the #else branch (the vector
// kernels, written once with GCC vector types) into itself once per
// instruction set, each pass compiled with that set's target attribute.
#ifndef FORKDEC_SAMPLING_KERNEL_PASS

#include "cpu/sampling.h"
#include "cpu/scalar_types.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/simd.h"

namespace forkdec::cpu {

struct SampleWorkspace::Impl {
  std::vector<int64_t> index;     // top-k candidates: token ids, in index order
  std::vector<float> value;       // their scaled logits, then their weights
  std::vector<float> scratch;     // nth_element copy / full-row weights
  std::vector<float> pivots;      // top-p search buffer
  std::vector<double> blocks;     // block sums of the weights
  std::vector<int64_t> order;     // draws sorted by target
  std::vector<int64_t> signal_index;  // row_signals' top-k candidates
  std::vector<float> signal_value;
  std::vector<int64_t> signal_order;
};

SampleWorkspace::SampleWorkspace() : impl_(new Impl) {}
SampleWorkspace::~SampleWorkspace() = default;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e400p-1f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with 9 zero low bits
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
// exp(r) on |r| <= ln2/2: Taylor to degree 6, relative error below 2e-7.
constexpr float kExpC[7] = {1.0f, 1.0f, 0.5f, 0x1.555556p-3f, 0x1.555556p-5f, 0x1.111112p-7f, 0x1.6c16c2p-10f};
// Weights below e^-87 (relative to the largest) are taken as 0 on every path:
// 2^n then stays a normal float, and such a weight can never be drawn in fp32.
constexpr float kExpFloor = -87.0f;
// Weights per block of the inverse-CDF walk.
constexpr int64_t kBlock = 64;

// The scaled logit of the sampling semantics: x / t, with -0 made +0 so that
// ties compare as ties. divide = false for greedy (t = 0: raw order).
inline float scale(float x, float t, bool divide) { return (divide ? x / t : x) + 0.0f; }

// exp(x) for x <= 0 (x = a - max), the operation sequence every SIMD path repeats.
inline float exp_nonpositive(float x) {
  if (!(x >= kExpFloor)) return x != x ? x : 0.0f;  // NaN stays NaN
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  float p = kExpC[6];
  for (int k = 5; k >= 0; --k) p = std::fma(p, r, kExpC[k]);
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// ---- top-k: streaming threshold selection ----------------------------------------------

// Candidates: ids in index order and their values, in the caller's buffers.
class TopK {
 public:
  TopK(int64_t k, std::vector<int64_t>& index, std::vector<float>& value, std::vector<float>& scratch)
      : k_(k), cap_(2 * k + 256), index_(index), value_(value), scratch_(scratch) {
    index_.clear();
    value_.clear();
    index_.reserve(cap_);
    value_.reserve(cap_);
  }
  // Values below this cannot be among the k largest. -FLT_MAX at first, so
  // that -inf (weight 0, never drawn) and NaN never enter.
  float threshold() const { return threshold_; }
  void push(int64_t i, float a) {
    index_.push_back(i);
    value_.push_back(a);
    if (static_cast<int64_t>(value_.size()) >= cap_) shrink();
  }
  // Cuts the buffer to the values >= the k-th largest (ties kept), in index order.
  void shrink() {
    const int64_t size = static_cast<int64_t>(value_.size());
    if (size <= k_) return;
    scratch_.assign(value_.begin(), value_.end());
    std::nth_element(scratch_.begin(), scratch_.begin() + (k_ - 1), scratch_.end(), std::greater<float>());
    threshold_ = scratch_[k_ - 1];
    int64_t kept = 0;
    for (int64_t j = 0; j < size; ++j) {
      if (value_[j] >= threshold_) {
        value_[kept] = value_[j];
        index_[kept] = index_[j];
        ++kept;
      }
    }
    value_.resize(kept);
    index_.resize(kept);
    if (kept * 2 > cap_) cap_ *= 2;  // many ties at the threshold: make room
  }

 private:
  int64_t k_, cap_;
  std::vector<int64_t>& index_;
  std::vector<float>& value_;
  std::vector<float>& scratch_;
  float threshold_ = -FLT_MAX;
};

template <class T>
void scan_scalar(const T* x, int64_t begin, int64_t end, float t, bool divide, TopK& sel) {
  for (int64_t i = begin; i < end; ++i) {
    const float a = scale(to_float(x[i]), t, divide);
    if (a >= sel.threshold()) sel.push(i, a);
  }
}

// Full row: scratch[i] = a_i; returns max a (NaN ignored).
template <class T>
float scale_row_scalar(const T* x, int64_t n, float t, float* out) {
  float top = -kInf;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = scale(to_float(x[i]), t, true);
    top = std::fmax(top, out[i]);
  }
  return top;
}

void exp_row_scalar(float* w, int64_t n, float top) {
  for (int64_t i = 0; i < n; ++i) w[i] = exp_nonpositive(w[i] - top);
}

// The signals pass over x[begin..end): the running (max m, sum s of exp(x - m))
// updated per element, and the raw logits offered to sel (when given).
template <class T>
void signals_scalar(const T* x, int64_t begin, int64_t end, TopK* sel, float& m, float& s) {
  for (int64_t i = begin; i < end; ++i) {
    const float a = to_float(x[i]) + 0.0f;
    if (a > m) {
      s = s * exp_nonpositive(m - a) + 1.0f;
      m = a;
    } else {
      s += exp_nonpositive(a - m);
    }
    if (sel && a >= sel->threshold()) sel->push(i, a);
  }
}

}  // namespace
}  // namespace forkdec::cpu

// ---- the vector kernels, once per instruction set ------------------------------------------

#if defined(__x86_64__)
#define FORKDEC_SAMPLING_KERNEL_PASS 1
#define SK_NS avx2
#define SK_TARGET __attribute__((target("avx2,fma,f16c")))
#define SK_VBYTES 32
#include "sampling.cpp"
#undef SK_NS
#undef SK_TARGET
#undef SK_VBYTES

#define SK_NS avx512
#define SK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define SK_VBYTES 64
#include "sampling.cpp"
#undef SK_NS
#undef SK_TARGET
#undef SK_VBYTES
#undef FORKDEC_SAMPLING_KERNEL_PASS
#endif  // __x86_64__

namespace forkdec::cpu {
namespace {


// ---- dispatch on instruction set and element type ---------------------------------------

template <class T>
void scan(const T* x, int64_t n, float t, bool divide, TopK& sel) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return avx512::scan(x, n, t, divide, sel);
    case Isa::avx2: return avx2::scan(x, n, t, divide, sel);
    default: break;
  }
#endif
  scan_scalar(x, 0, n, t, divide, sel);
}

template <class T>
float scale_row(const T* x, int64_t n, float t, float* out) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return avx512::scale_row(x, n, t, out);
    case Isa::avx2: return avx2::scale_row(x, n, t, out);
    default: break;
  }
#endif
  return scale_row_scalar(x, n, t, out);
}

void exp_row(float* w, int64_t n, float top) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return avx512::exp_row(w, n, top);
    case Isa::avx2: return avx2::exp_row(w, n, top);
    default: break;
  }
#endif
  exp_row_scalar(w, n, top);
}

template <class T>
void signals(const T* x, int64_t n, TopK* sel, float& m, double& s) {
#if defined(__x86_64__)
  switch (current_isa()) {
    case Isa::avx512: return avx512::signals(x, n, sel, m, s);
    case Isa::avx2: return avx2::signals(x, n, sel, m, s);
    default: break;
  }
#endif
  float sum = 0.0f;
  m = -FLT_MAX;
  signals_scalar(x, 0, n, sel, m, sum);
  s = sum;
}

template <class F>
auto with_type(const void* x, DType dtype, const F& f) {
  switch (dtype) {
    case DType::f16: return f(static_cast<const Half*>(x));
    case DType::bf16: return f(static_cast<const BFloat*>(x));
    default: return f(static_cast<const float*>(x));
  }
}

// ---- filters on weights -----------------------------------------------------------------

// top-p: the smallest weight that is kept, i.e. the smallest w_i whose
// strictly-larger mass is below limit. Quickselect on values: a pivot from the
// undecided set either is kept (then so is every larger weight; the search
// goes on below it, with their mass carried in `above`) or is not (then no
// smaller weight is; the search goes on above it). Each round drops the pivot,
// and with a median-of-three pivot the expected work is linear.
//
// Weights below floor = (total - limit) / n never matter: were the threshold
// below one of them, every weight >= floor would be kept with less than
// `limit` above the threshold, leaving more than total - limit to the n
// weights below floor, which is impossible. So only the (usually few) weights
// >= floor enter the search; an exact cut, not a heuristic.
float top_p_threshold(const float* w, int64_t n, double total, double limit, std::vector<float>& undecided) {
  const float floor = static_cast<float>((total - limit) / static_cast<double>(n) * (1.0 - 1e-6));
  undecided.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] > 0 && w[i] >= floor) undecided.push_back(w[i]);
  }
  double above = 0;    // mass of the weights above every undecided one
  float smallest = kInf;  // the smallest weight known to be kept
  while (!undecided.empty()) {
    const size_t size = undecided.size();
    float pivot[3] = {undecided[0], undecided[size / 2], undecided[size - 1]};
    std::sort(pivot, pivot + 3);
    const float v = pivot[1];
    double larger = 0, equal = 0;
    for (float u : undecided) {
      if (u > v) larger += u;
      else if (u == v) equal += u;
    }
    size_t kept = 0;
    if (above + larger < limit) {  // v is kept: continue with the smaller weights
      smallest = v;
      above += larger + equal;
      for (float u : undecided) if (u < v) undecided[kept++] = u;
    } else {  // v is not kept: neither is anything smaller
      for (float u : undecided) if (u > v) undecided[kept++] = u;
    }
    undecided.resize(kept);
  }
  return smallest;
}

// Zeroes the weights that top-p or min-p drop. total: the sum of all w.
void apply_filters(float* w, int64_t n, double total, const SampleParams& p, std::vector<float>& buffer) {
  float threshold = p.min_p;  // min-p: the largest weight is exactly 1
  if (p.top_p < 1.0f) {
    threshold = std::max(threshold, top_p_threshold(w, n, total, static_cast<double>(p.top_p) * total, buffer));
  }
  if (threshold > 0) {
    for (int64_t i = 0; i < n; ++i) w[i] = w[i] >= threshold ? w[i] : 0.0f;
  }
}

double sum(const float* w, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += w[i];
  return s;
}

// ---- the draw -------------------------------------------------------------------------------

// tokens[j] = map(first i with running sum of w > uniforms[j] * total), in
// index order. Block sums first (the same ones give the total), so the walk
// for any number of draws reads w once. false if the total is not positive.
bool draw(const float* w, int64_t n, const int64_t* map, const float* uniforms, int64_t draws, int64_t* tokens,
          SampleWorkspace::Impl& ws) {
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  ws.blocks.resize(num_blocks);
  double total = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    ws.blocks[b] = sum(w + b * kBlock, std::min(kBlock, n - b * kBlock));
    total += ws.blocks[b];
  }
  if (!(total > 0 && total < HUGE_VAL)) return false;
  ws.order.resize(draws);
  std::iota(ws.order.begin(), ws.order.end(), int64_t{0});
  std::sort(ws.order.begin(), ws.order.end(), [&](int64_t a, int64_t b) { return uniforms[a] < uniforms[b]; });
  double running = 0;  // sum of the blocks before block b
  int64_t b = 0;
  for (int64_t j : ws.order) {
    const double target = static_cast<double>(uniforms[j]) * total;
    while (b + 1 < num_blocks && running + ws.blocks[b] <= target) running += ws.blocks[b++];
    // The crossing is in block b: walk it (the last kept weight when rounding
    // leaves the target at the block's end).
    const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
    double inside = running;
    int64_t token = -1;
    for (int64_t i = begin; i < end; ++i) {
      if (w[i] <= 0) continue;
      token = i;
      inside += w[i];
      if (inside > target) break;
    }
    for (int64_t i = begin - 1; token < 0 && i >= 0; --i) {  // an empty last block: the last kept before it
      if (w[i] > 0) token = i;
    }
    tokens[j] = map ? map[token] : token;
  }
  return true;
}

// ---- the two paths -------------------------------------------------------------------------

template <class T>
bool sample_top_k(const T* x, int64_t vocab, const SampleParams& p, bool greedy, const float* uniforms, int64_t n,
                  int64_t* tokens, SampleWorkspace::Impl& ws) {
  TopK sel(greedy ? 1 : p.top_k, ws.index, ws.value, ws.scratch);
  scan(x, vocab, p.temperature, !greedy, sel);
  sel.shrink();
  const int64_t count = static_cast<int64_t>(ws.value.size());
  if (count == 0) return false;
  float top = -kInf;
  for (float a : ws.value) top = std::max(top, a);
  if (!(top < kInf)) return false;  // x / t overflowed
  if (greedy) {  // the survivors are the ties at the max, in index order
    std::fill(tokens, tokens + n, ws.index[0]);
    return true;
  }
  float* w = ws.value.data();
  for (int64_t j = 0; j < count; ++j) w[j] = exp_nonpositive(w[j] - top);
  apply_filters(w, count, sum(w, count), p, ws.pivots);
  return draw(w, count, ws.index.data(), uniforms, n, tokens, ws);
}

template <class T>
bool sample_full(const T* x, int64_t vocab, const SampleParams& p, const float* uniforms, int64_t n,
                 int64_t* tokens, SampleWorkspace::Impl& ws) {
  ws.scratch.resize(vocab);
  float* w = ws.scratch.data();
  const float top = scale_row(x, vocab, p.temperature, w);
  if (!(top > -kInf && top < kInf)) return false;
  exp_row(w, vocab, top);
  if (p.top_p < 1.0f || p.min_p > 0.0f) {
    apply_filters(w, vocab, p.top_p < 1.0f ? sum(w, vocab) : 0.0, p, ws.pivots);
  }
  return draw(w, vocab, nullptr, uniforms, n, tokens, ws);
}

}  // namespace

bool sample_row(const void* x, DType dtype, int64_t vocab, const SampleParams& params, const float* uniforms,
                int64_t n, int64_t* tokens, SampleWorkspace& workspace) {
  if (n <= 0) return true;
  if (vocab <= 0) return false;
  const bool greedy = params.temperature == 0.0f;
  const bool top_k = params.top_k > 0 && params.top_k < vocab;
  return with_type(x, dtype, [&](auto* row) {
    if (greedy || top_k) return sample_top_k(row, vocab, params, greedy, uniforms, n, tokens, workspace.impl());
    return sample_full(row, vocab, params, uniforms, n, tokens, workspace.impl());
  });
}

void row_signals(const void* x, DType dtype, int64_t vocab, int64_t k, float* lse, float* top_values,
                 int64_t* top_ids, SampleWorkspace& workspace) {
  SampleWorkspace::Impl& ws = workspace.impl();
  k = std::clamp<int64_t>(k, 0, std::max<int64_t>(vocab, 0));
  if (vocab <= 0) {
    *lse = -kInf;
    return;
  }
  TopK sel(std::max<int64_t>(k, 1), ws.signal_index, ws.signal_value, ws.scratch);
  float m = -FLT_MAX;
  double s = 0;
  with_type(x, dtype, [&](auto* row) { signals(row, vocab, k > 0 ? &sel : nullptr, m, s); });
  *lse = static_cast<float>(static_cast<double>(m) + std::log(s));
  if (k == 0) return;
  sel.shrink();
  // The candidates are in index order: a stable sort by value gives ties by lower index.
  const int64_t count = static_cast<int64_t>(ws.signal_value.size());
  ws.signal_order.resize(count);
  std::iota(ws.signal_order.begin(), ws.signal_order.end(), int64_t{0});
  std::stable_sort(ws.signal_order.begin(), ws.signal_order.end(),
                   [&](int64_t a, int64_t b) { return ws.signal_value[a] > ws.signal_value[b]; });
  int64_t filled = std::min(k, count);
  for (int64_t j = 0; j < filled; ++j) {
    top_values[j] = ws.signal_value[ws.signal_order[j]];
    top_ids[j] = ws.signal_index[ws.signal_order[j]];
  }
  // Fewer than k values above -inf: the -inf logits follow, in index order.
  with_type(x, dtype, [&](auto* row) {
    for (int64_t i = 0; i < vocab && filled < k; ++i) {
      if (to_float(row[i]) == -kInf) {
        top_values[filled] = -kInf;
        top_ids[filled++] = i;
      }
    }
  });
  for (; filled < k; ++filled) {  // NaN logits (the caller's to reject): a defined, in-range filler
    top_values[filled] = std::numeric_limits<float>::quiet_NaN();
    top_ids[filled] = 0;
  }
}

}  // namespace forkdec::cpu

#else  // FORKDEC_SAMPLING_KERNEL_PASS: the vector kernels of one instruction set

namespace forkdec::cpu {
namespace {
namespace SK_NS {

constexpr int L = SK_VBYTES / 4;  // floats per vector
typedef float V __attribute__((vector_size(SK_VBYTES)));
typedef int32_t VI __attribute__((vector_size(SK_VBYTES)));
typedef uint16_t VH __attribute__((vector_size(SK_VBYTES / 2)));

#define SK_INLINE SK_TARGET inline __attribute__((always_inline))

// The few operations GCC's vector extensions do not spell: fp16 loads, FMA,
// rounding to the nearest integer and the lane mask of a comparison.
#if SK_VBYTES == 64
SK_INLINE V vload(const Half* p) { return (V)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
SK_INLINE V vfma(V a, V b, V c) { return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
SK_INLINE V vround(V x) { return (V)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SK_INLINE uint32_t ge_bits(V a, float t) {
  return _mm512_cmp_ps_mask((__m512)a, _mm512_set1_ps(t), _CMP_GE_OQ);
}
#else
SK_INLINE V vload(const Half* p) { return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
SK_INLINE V vfma(V a, V b, V c) { return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
SK_INLINE V vround(V x) { return (V)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SK_INLINE uint32_t ge_bits(V a, float t) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, _mm256_set1_ps(t), _CMP_GE_OQ)));
}
#endif

SK_INLINE V vset(float x) { return x - V{}; }  // x - 0 is x for every x, -0 included
SK_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SK_INLINE V vload(const BFloat* p) {
  VH h;
  std::memcpy(&h, p, sizeof h);
  return (V)(__builtin_convertvector(h, VI) << 16);
}
SK_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof v); }
SK_INLINE V vmax(V a, V b) { return a > b ? a : b; }  // NaN in a loses to b
SK_INLINE float hmax(V v) {
  float result = -kInf;
  for (int l = 0; l < L; ++l) result = std::fmax(result, v[l]);
  return result;
}

// exp_nonpositive, lane by lane, with the same operations.
SK_INLINE V vexp_nonpositive(V x) {
  const V floor = vset(kExpFloor);
  const V live = x >= floor ? x : floor;
  const V n = vround(live * kLog2e);
  V r = vfma(-n, vset(kLn2Hi), live);
  r = vfma(-n, vset(kLn2Lo), r);
  V p = vset(kExpC[6]);
  for (int k = 5; k >= 0; --k) p = vfma(p, r, vset(kExpC[k]));
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const V e = x >= floor ? p * (V)bits : V{};
  return x != x ? x : e;  // NaN stays NaN
}

// Offers the lanes of a (at indices at..at+L) that reach the selection's threshold.
SK_INLINE void offer(V a, int64_t at, TopK& sel) {
  uint32_t hit = ge_bits(a, sel.threshold());
  if (!hit) return;  // rare once the threshold has risen
  float lanes[L];
  std::memcpy(lanes, &a, sizeof a);
  for (; hit; hit &= hit - 1) {
    const int lane = __builtin_ctz(hit);
    if (lanes[lane] >= sel.threshold()) sel.push(at + lane, lanes[lane]);
  }
}

SK_INLINE V scaled(V v, V t, bool divide) { return (divide ? v / t : v) + 0.0f; }

template <class T>
SK_TARGET void scan(const T* x, int64_t n, float t, bool divide, TopK& sel) {
  const V tv = vset(t);
  int64_t i = 0;
  for (; i + L <= n; i += L) offer(scaled(vload(x + i), tv, divide), i, sel);
  scan_scalar(x, i, n, t, divide, sel);
}

template <class T>
SK_TARGET float scale_row(const T* x, int64_t n, float t, float* out) {
  const V tv = vset(t);
  V top = vset(-kInf);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V a = scaled(vload(x + i), tv, true);
    vstore(out + i, a);
    top = vmax(a, top);
  }
  return std::fmax(hmax(top), scale_row_scalar(x + i, n - i, t, out + i));
}

SK_TARGET void exp_row(float* w, int64_t n, float top) {
  const V topv = vset(top);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(w + i, vexp_nonpositive(vload(w + i) - topv));
  exp_row_scalar(w + i, n - i, top);
}

// The signals pass: on return sum_i exp(x_i - m) = s (m the row max, or
// -FLT_MAX for a row of only -inf), and sel (when given) has seen every x_i.
// Per chunk of C vectors: a lane-wise max, one rescale of the lane sums, then
// one exp per logit; the chunk stays in registers, the row is read once.
template <class T>
SK_TARGET void signals(const T* x, int64_t n, TopK* sel, float& m_out, double& s_out) {
  constexpr int C = 8;
  V m = vset(-FLT_MAX), s = V{};
  int64_t i = 0;
  for (; i + C * L <= n; i += C * L) {
    V v[C];
    for (int j = 0; j < C; ++j) v[j] = vload(x + i + j * L) + 0.0f;
    V top = m;
    for (int j = 0; j < C; ++j) top = vmax(v[j], top);
    s *= vexp_nonpositive(m - top);
    for (int j = 0; j < C; ++j) s += vexp_nonpositive(v[j] - top);
    m = top;
    if (sel) {
      for (int j = 0; j < C; ++j) offer(v[j], i + j * L, *sel);
    }
  }
  for (; i + L <= n; i += L) {
    const V v = vload(x + i) + 0.0f;
    const V top = vmax(v, m);
    s = s * vexp_nonpositive(m - top) + vexp_nonpositive(v - top);
    m = top;
    if (sel) offer(v, i, *sel);
  }
  float tail_m = -FLT_MAX, tail_s = 0.0f;
  signals_scalar(x, i, n, sel, tail_m, tail_s);
  float top = tail_m;
  for (int l = 0; l < L; ++l) top = std::fmax(top, m[l]);
  double total = static_cast<double>(tail_s) * std::exp(static_cast<double>(tail_m) - top);
  for (int l = 0; l < L; ++l) total += static_cast<double>(s[l]) * std::exp(static_cast<double>(m[l]) - top);
  m_out = top;
  s_out = total;
}

#undef SK_INLINE

}  // namespace SK_NS
}  // namespace
}  // namespace forkdec::cpu

#endif  // FORKDEC_SAMPLING_KERNEL_PASS
