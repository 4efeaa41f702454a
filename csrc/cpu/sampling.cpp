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
// Every path computes exp with the same operations (an FMA polynomial), so the
// scalar, AVX2 and AVX-512 paths return identical tokens.
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

class TopK {
 public:
  TopK(int64_t k, SampleWorkspace::Impl& ws) : k_(k), cap_(2 * k + 256), ws_(ws) {
    ws_.index.clear();
    ws_.value.clear();
    ws_.index.reserve(cap_);
    ws_.value.reserve(cap_);
  }
  // Values below this cannot be among the k largest. -FLT_MAX at first, so
  // that -inf (weight 0, never drawn) and NaN never enter.
  float threshold() const { return threshold_; }
  void push(int64_t i, float a) {
    ws_.index.push_back(i);
    ws_.value.push_back(a);
    if (static_cast<int64_t>(ws_.value.size()) >= cap_) shrink();
  }
  // Cuts the buffer to the values >= the k-th largest (ties kept), in index order.
  void shrink() {
    const int64_t size = static_cast<int64_t>(ws_.value.size());
    if (size <= k_) return;
    ws_.scratch.assign(ws_.value.begin(), ws_.value.end());
    std::nth_element(ws_.scratch.begin(), ws_.scratch.begin() + (k_ - 1), ws_.scratch.end(), std::greater<float>());
    threshold_ = ws_.scratch[k_ - 1];
    int64_t kept = 0;
    for (int64_t j = 0; j < size; ++j) {
      if (ws_.value[j] >= threshold_) {
        ws_.value[kept] = ws_.value[j];
        ws_.index[kept] = ws_.index[j];
        ++kept;
      }
    }
    ws_.value.resize(kept);
    ws_.index.resize(kept);
    if (kept * 2 > cap_) cap_ *= 2;  // many ties at the threshold: make room
  }

 private:
  int64_t k_, cap_;
  SampleWorkspace::Impl& ws_;
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

#if defined(__x86_64__)

#define FORKDEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FORKDEC_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace avx512 {

FORKDEC_AVX512 inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
FORKDEC_AVX512 inline __m512 load(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FORKDEC_AVX512 inline __m512 load(const BFloat* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

FORKDEC_AVX512 inline __m512 scaled(__m512 v, __m512 t, bool divide) {
  return _mm512_add_ps(divide ? _mm512_div_ps(v, t) : v, _mm512_setzero_ps());
}

template <class T>
FORKDEC_AVX512 void scan(const T* x, int64_t n, float t, bool divide, TopK& sel) {
  const __m512 tv = _mm512_set1_ps(t);
  alignas(64) float lanes[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = scaled(load(x + i), tv, divide);
    __mmask16 hit = _mm512_cmp_ps_mask(a, _mm512_set1_ps(sel.threshold()), _CMP_GE_OQ);
    if (hit) {  // rare once the threshold has risen
      _mm512_store_ps(lanes, a);
      for (; hit; hit &= hit - 1) {
        const int lane = __builtin_ctz(hit);
        if (lanes[lane] >= sel.threshold()) sel.push(i + lane, lanes[lane]);
      }
    }
  }
  scan_scalar(x, i, n, t, divide, sel);
}

template <class T>
FORKDEC_AVX512 float scale_row(const T* x, int64_t n, float t, float* out) {
  const __m512 tv = _mm512_set1_ps(t);
  __m512 top = _mm512_set1_ps(-kInf);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = scaled(load(x + i), tv, true);
    _mm512_storeu_ps(out + i, a);
    top = _mm512_max_ps(a, top);  // NaN in a loses to top
  }
  return std::fmax(_mm512_reduce_max_ps(top), scale_row_scalar(x + i, n - i, t, out + i));
}

FORKDEC_AVX512 void exp_row(float* w, int64_t n, float top) {
  const __m512 topv = _mm512_set1_ps(top);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(w + i), topv);
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512 n_ = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n_, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n_, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpC[6]);
    for (int k = 5; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[k]));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n_), _mm512_set1_epi32(127)), 23);
    __m512 e = _mm512_maskz_mul_ps(live, p, _mm512_castsi512_ps(bits));
    e = _mm512_mask_mov_ps(e, nan, x);
    _mm512_storeu_ps(w + i, e);
  }
  exp_row_scalar(w + i, n - i, top);
}

}  // namespace avx512

namespace avx2 {

FORKDEC_AVX2 inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
FORKDEC_AVX2 inline __m256 load(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FORKDEC_AVX2 inline __m256 load(const BFloat* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

FORKDEC_AVX2 inline __m256 scaled(__m256 v, __m256 t, bool divide) {
  return _mm256_add_ps(divide ? _mm256_div_ps(v, t) : v, _mm256_setzero_ps());
}

template <class T>
FORKDEC_AVX2 void scan(const T* x, int64_t n, float t, bool divide, TopK& sel) {
  const __m256 tv = _mm256_set1_ps(t);
  alignas(32) float lanes[8];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = scaled(load(x + i), tv, divide);
    int hit = _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(sel.threshold()), _CMP_GE_OQ));
    if (hit) {
      _mm256_store_ps(lanes, a);
      for (; hit; hit &= hit - 1) {
        const int lane = __builtin_ctz(hit);
        if (lanes[lane] >= sel.threshold()) sel.push(i + lane, lanes[lane]);
      }
    }
  }
  scan_scalar(x, i, n, t, divide, sel);
}

template <class T>
FORKDEC_AVX2 float scale_row(const T* x, int64_t n, float t, float* out) {
  const __m256 tv = _mm256_set1_ps(t);
  __m256 top = _mm256_set1_ps(-kInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = scaled(load(x + i), tv, true);
    _mm256_storeu_ps(out + i, a);
    top = _mm256_max_ps(a, top);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float result = scale_row_scalar(x + i, n - i, t, out + i);
  for (float v : lanes) result = std::fmax(result, v);
  return result;
}

FORKDEC_AVX2 void exp_row(float* w, int64_t n, float top) {
  const __m256 topv = _mm256_set1_ps(top);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(w + i), topv);
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(kExpFloor), _CMP_GE_OQ);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 n_ = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n_, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n_, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpC[6]);
    for (int k = 5; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[k]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n_), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
    e = _mm256_blendv_ps(e, x, nan);
    _mm256_storeu_ps(w + i, e);
  }
  exp_row_scalar(w + i, n - i, top);
}

}  // namespace avx2

#endif  // __x86_64__

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
  TopK sel(greedy ? 1 : p.top_k, ws);
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

}  // namespace forkdec::cpu
