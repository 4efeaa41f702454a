// Two-Pass Softmax kernels: a portable scalar path and, on x86-64, AVX2+FMA and
// AVX-512 paths compiled with function target attributes (no -march needed),
// chosen at run time. See softmax.h for the contract.
//
// Every path writes exp(a) as m * 2^n: n = round(a * log2 e) and
// m = p(a - n ln 2) with p a degree-5 minimax polynomial. Special inputs ride
// on n so that m stays finite: a = -inf gives n = -inf (scales to exactly 0),
// a = +inf or NaN give n = +inf or NaN, which make the row's sum unusable and
// the row NaN, as in torch.softmax.
#include "cpu/softmax.h"
#include "cpu/scalar_types.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "cpu/simd.h"

namespace forkdec::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

constexpr float kLog2e = 0x1.715476p+0f;
// The float nearest ln 2: with an FMA, r = a - n * kLn2 is exact for every a
// and integer n near a / ln 2. The usual second Cody-Waite constant (ln 2 -
// kLn2 = -1.9e-9) is left out on purpose: without it every element comes out
// as exp(a (1 - 2.7e-9)), which softmax turns into a relative error of
// 2.7e-9 |a_i - a_j|, 20x below the rounding of a = x / t itself, for one FMA
// less per element and pass.
constexpr float kLn2 = 0x1.62e430p-1f;
// exp(r) on [-ln2/2, ln2/2], relative error 7.5e-8 (Remez, coefficients c0..c5).
constexpr float kExpPoly[6] = {0x1.000002p+0f, 0x1.fffff6p-1f, 0x1.fffd1ap-2f,
                               0x1.555a18p-3f, 0x1.575eeep-5f, 0x1.0fe5c6p-7f};
// |r| stays below 0.36 for |a| < 2^16 and below 1 up to ~5e6; past that r is
// meaningless and is clamped so that m stays a finite positive number.
constexpr float kReducedLimit = 1.0f;
// exp(a) for a < -110 underflows to 0 in float: floor the three-pass argument
// there so that n stays finite for a = -inf.
constexpr float kShiftedMin = -110.0f;
// Rows are summed in pieces of this many elements, then the pieces are added:
// fewer roundings into one accumulator (accuracy on long rows).
constexpr int64_t kSumPiece = 2048;

// m * 2^d for d <= 0, exact down to full underflow; d = -inf gives 0, NaN gives NaN.
float scale_pow2(float m, float d) {
  if (std::isnan(d)) return kNaN;
  return std::ldexp(m, static_cast<int>(std::max(d, -400.0f)));
}

bool usable(ExpSum total) {
  return total.mantissa > 0 && total.mantissa < kInf && total.exponent < kInf;
}

bool usable_three_pass(float max, float sum) {
  return std::abs(max) < kInf && sum > 0 && sum < kInf;
}

void fill_nan(float* y, int64_t n) { std::fill(y, y + n, kNaN); }

// ---- scalar path (also the non-x86 path) ---------------------------------------------

namespace scalar {

struct Parts { float m, n; };

float poly(float r, float scale) {
  float p = kExpPoly[5] * scale;
  for (int k = 4; k >= 0; --k) p = std::fma(p, r, kExpPoly[k] * scale);
  return p;
}

// exp(a) = m * 2^n with m = poly * scale; see the file comment for special inputs.
Parts exp_parts(float a, float scale) {
  if (std::isnan(a)) return {kNaN, kNaN};
  if (std::isinf(a)) return {scale, a};
  float t = a * kLog2e;
  if (std::isinf(t)) t = std::copysign(FLT_MAX, t);  // finite a: saturate, as the SIMD paths do
  const float n = std::nearbyint(t);
  const float r = std::fma(-n, kLn2, a);
  return {poly(std::clamp(r, -kReducedLimit, kReducedLimit), scale), n};
}

// exp(a) for a <= 0 (or NaN), correctly underflowing to 0.
float exp_nonpositive(float a, float scale) {
  if (std::isnan(a)) return kNaN;
  a = std::max(a, kShiftedMin);
  const float n = std::nearbyint(a * kLog2e);
  return std::ldexp(poly(std::fma(-n, kLn2, a), scale), static_cast<int>(n));
}

template <bool kDivide>
float scaled(float v, float temperature) { return kDivide ? v / temperature : v; }

// The scalar path adds in double: plain sequential sums in float would lose
// accuracy on long rows (the SIMD paths have many lanes and partial sums).
template <bool kDivide, class T>
ExpSum exp_sum(const T* x, int64_t n, float temperature) {
  double acc = 0;
  float top = -FLT_MAX;
  for (int64_t i = 0; i < n; ++i) {
    const Parts p = exp_parts(scaled<kDivide>(to_float(x[i]), temperature), 1.0f);
    if (p.n <= top) {
      acc += scale_pow2(p.m, p.n - top);
    } else if (p.n > top) {  // a new largest exponent (or +inf)
      acc = (top - p.n < -400.0f ? 0.0 : std::ldexp(acc, static_cast<int>(top - p.n))) + p.m;
      top = p.n;
    } else {  // NaN
      return {kNaN, kNaN};
    }
  }
  return {static_cast<float>(acc), top};
}

template <bool kDivide, class T>
void scale(const T* x, int64_t n, float temperature, ExpSum total, float* y, bool /*stream*/) {
  const float inverse = 1.0f / total.mantissa;
  for (int64_t i = 0; i < n; ++i) {
    const Parts p = exp_parts(scaled<kDivide>(to_float(x[i]), temperature), inverse);
    y[i] = scale_pow2(p.m, p.n - total.exponent);
  }
}

template <bool kDivide, class T>
float max(const T* x, int64_t n, float temperature) {
  float result = -kInf;
  for (int64_t i = 0; i < n; ++i) result = std::fmax(result, scaled<kDivide>(to_float(x[i]), temperature));
  return result;
}

template <bool kDivide, class T>
float shifted_exp_sum(const T* x, int64_t n, float temperature, float max) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += exp_nonpositive(scaled<kDivide>(to_float(x[i]), temperature) - max, 1.0f);
  return static_cast<float>(total);
}

template <bool kDivide, class T>
void shifted_scale(const T* x, int64_t n, float temperature, float max, float sum, float* y,
                   bool /*stream*/) {
  const float inverse = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) {
    y[i] = exp_nonpositive(scaled<kDivide>(to_float(x[i]), temperature) - max, inverse);
  }
}

}  // namespace scalar

#if defined(__x86_64__)

#define FORKDEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FORKDEC_AVX2 __attribute__((target("avx2,fma,f16c")))

template <class T> T negative_infinity();
template <> float negative_infinity<float>() { return -kInf; }
template <> Half negative_infinity<Half>() { return Half{0xfc00}; }
template <> BFloat negative_infinity<BFloat>() { return BFloat{0xff80}; }

// Elements before y reaches an `alignment`-byte boundary (streaming stores need one).
inline int64_t unaligned_head(const float* y, int64_t n, int64_t alignment) {
  const auto address = reinterpret_cast<uintptr_t>(y);
  const int64_t bytes = static_cast<int64_t>((alignment - address % alignment) % alignment);
  return std::min(n, bytes / static_cast<int64_t>(sizeof(float)));
}

// ---- AVX-512 path -----------------------------------------------------------------

namespace avx512 {

constexpr int kLanes = 16;
constexpr int kUnroll = 4;  // vectors per block of pass 1
constexpr int kRangeAbsMinSignOfFirst = 0b0010;  // vrangeps imm8

FORKDEC_AVX512 inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
FORKDEC_AVX512 inline __m512 load(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FORKDEC_AVX512 inline __m512 bf16_to_float(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
FORKDEC_AVX512 inline __m512 load(const BFloat* p) {
  return bf16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

FORKDEC_AVX512 inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>((1u << count) - 1);
}

// The first `count` elements; the other lanes read -inf, which adds nothing.
FORKDEC_AVX512 inline __m512 load_partial(const float* p, int64_t count) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-kInf), first_lanes(count), p);
}
FORKDEC_AVX512 inline __m512 load_partial(const Half* p, int64_t count) {
  return _mm512_cvtph_ps(
      _mm256_mask_loadu_epi16(_mm256_set1_epi16(static_cast<short>(0xfc00)), first_lanes(count), p));
}
FORKDEC_AVX512 inline __m512 load_partial(const BFloat* p, int64_t count) {
  return bf16_to_float(
      _mm256_mask_loadu_epi16(_mm256_set1_epi16(static_cast<short>(0xff80)), first_lanes(count), p));
}

template <bool kDivide>
FORKDEC_AVX512 inline __m512 scaled(__m512 v, __m512 temperature) {
  return kDivide ? _mm512_div_ps(v, temperature) : v;
}

// The exp polynomial with its coefficients multiplied by `scale` (pass 2
// folds the 1 / sum into them).
struct Poly { __m512 c[6]; };

FORKDEC_AVX512 inline Poly make_poly(float scale) {
  Poly p;
  for (int k = 0; k < 6; ++k) p.c[k] = _mm512_set1_ps(kExpPoly[k] * scale);
  return p;
}

FORKDEC_AVX512 inline __m512 eval(const Poly& p, __m512 r) {
  __m512 v = p.c[5];
  for (int k = 4; k >= 0; --k) v = _mm512_fmadd_ps(v, r, p.c[k]);
  return v;
}

// exp(a) = m * 2^n; returns m, writes n.
FORKDEC_AVX512 inline __m512 exp_parts(__m512 a, const Poly& p, __m512* n_out) {
  // Rounding toward zero saturates a * log2e at FLT_MAX for huge finite a
  // instead of overflowing to inf (which would pass for an infinite input).
  const __m512 t = _mm512_mul_round_ps(a, _mm512_set1_ps(kLog2e), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), a);
  // Clamp to [-limit, limit] in one vrangeps (smaller magnitude, sign of r).
  // r is NaN for infinite or NaN a (n carries those): vrangeps returns the
  // non-NaN operand then, so m stays finite.
  r = _mm512_range_ps(r, _mm512_set1_ps(kReducedLimit), kRangeAbsMinSignOfFirst);
  *n_out = n;
  return eval(p, r);
}

// Per-lane running sum acc * 2^top.
struct LaneSum {
  __m512 acc;
  __m512 top;
};

FORKDEC_AVX512 inline LaneSum empty_sum() { return {_mm512_setzero_ps(), _mm512_set1_ps(-FLT_MAX)}; }

// Adds the terms m * 2^n of U vectors: everything is rescaled to the largest
// exponent, so nothing overflows. A NaN exponent makes its term NaN.
template <int U>
FORKDEC_AVX512 inline void add_terms(LaneSum& s, const __m512 (&m)[U], const __m512 (&n)[U]) {
  __m512 block_top = n[0];
  for (int k = 1; k < U; ++k) block_top = _mm512_max_ps(block_top, n[k]);
  const __m512 top = _mm512_max_ps(block_top, s.top);
  __m512 terms[U];
  for (int k = 0; k < U; ++k) terms[k] = _mm512_scalef_ps(m[k], _mm512_sub_ps(n[k], top));
  for (int width = U / 2; width >= 1; width /= 2) {  // pairwise: short dependency chains
    for (int k = 0; k < width; ++k) terms[k] = _mm512_add_ps(terms[k], terms[k + width]);
  }
  s.acc = _mm512_add_ps(_mm512_scalef_ps(s.acc, _mm512_sub_ps(s.top, top)), terms[0]);
  s.top = top;
}

FORKDEC_AVX512 inline void add_sum(LaneSum& s, const LaneSum& other) {
  const __m512 m[1] = {other.acc};
  const __m512 n[1] = {other.top};
  add_terms<1>(s, m, n);
}

FORKDEC_AVX512 inline ExpSum reduce(const LaneSum& s) {
  const float top = _mm512_reduce_max_ps(s.top);
  const __m512 terms = _mm512_scalef_ps(s.acc, _mm512_sub_ps(s.top, _mm512_set1_ps(top)));
  return {_mm512_reduce_add_ps(terms), top};
}

template <bool kDivide, class T>
FORKDEC_AVX512 ExpSum exp_sum(const T* x, int64_t n, float temperature) {
  const Poly p = make_poly(1.0f);
  const __m512 t = _mm512_set1_ps(temperature);
  constexpr int64_t kBlock = kUnroll * kLanes;
  LaneSum total = empty_sum();
  int64_t i = 0;
  while (i + kBlock <= n) {
    LaneSum piece = empty_sum();
    const int64_t end = std::min(n, i + kSumPiece);
    for (; i + kBlock <= end; i += kBlock) {
      __m512 m[kUnroll], e[kUnroll];
      for (int k = 0; k < kUnroll; ++k) {
        m[k] = exp_parts(scaled<kDivide>(load(x + i + k * kLanes), t), p, &e[k]);
      }
      add_terms<kUnroll>(piece, m, e);
    }
    add_sum(total, piece);
  }
  for (; i < n; i += kLanes) {
    const __m512 v = i + kLanes <= n ? load(x + i) : load_partial(x + i, n - i);
    __m512 m[1], e[1];
    m[0] = exp_parts(scaled<kDivide>(v, t), p, &e[0]);
    add_terms<1>(total, m, e);
  }
  return reduce(total);
}

// y[i] = f(x[i]) for i < n. Streaming stores need y 64-byte aligned: a
// partial first vector gets there.
template <class T, class F>
FORKDEC_AVX512 void map_row(const T* x, int64_t n, float* y, bool stream, const F& f) {
  int64_t i = 0;
  if (stream) {
    const int64_t head = unaligned_head(y, n, 64);
    if (head > 0) {
      _mm512_mask_storeu_ps(y, first_lanes(head), f(load_partial(x, head)));
      i = head;
    }
    for (; i + kLanes <= n; i += kLanes) _mm512_stream_ps(y + i, f(load(x + i)));
  }
  for (; i + kLanes <= n; i += kLanes) _mm512_storeu_ps(y + i, f(load(x + i)));
  if (i < n) _mm512_mask_storeu_ps(y + i, first_lanes(n - i), f(load_partial(x + i, n - i)));
  if (stream) _mm_sfence();
}

// Pass 2 of one vector: exp(x / t) / total, the 1 / mantissa folded into p.
template <bool kDivide>
struct Normalized {
  Poly p;
  __m512 top, t;
  FORKDEC_AVX512 __m512 operator()(__m512 x) const {
    __m512 n;
    const __m512 m = exp_parts(scaled<kDivide>(x, t), p, &n);
    return _mm512_scalef_ps(m, _mm512_sub_ps(n, top));
  }
};

template <bool kDivide, class T>
FORKDEC_AVX512 void scale(const T* x, int64_t n, float temperature, ExpSum total, float* y, bool stream) {
  const Normalized<kDivide> f{make_poly(1.0f / total.mantissa), _mm512_set1_ps(total.exponent),
                              _mm512_set1_ps(temperature)};
  map_row(x, n, y, stream, f);
}

// exp(a) * scale for a <= 0 or NaN (three-pass), underflowing correctly.
FORKDEC_AVX512 inline __m512 exp_nonpositive(__m512 a, const Poly& p) {
  a = _mm512_max_ps(_mm512_set1_ps(kShiftedMin), a);  // NaN a passes (second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(eval(p, _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), a)), n);
}

template <bool kDivide, class T>
FORKDEC_AVX512 float max(const T* x, int64_t n, float temperature) {
  const __m512 t = _mm512_set1_ps(temperature);
  __m512 acc[kUnroll];
  for (int k = 0; k < kUnroll; ++k) acc[k] = _mm512_set1_ps(-kInf);
  int64_t i = 0;
  for (; i + kUnroll * kLanes <= n; i += kUnroll * kLanes) {
    for (int k = 0; k < kUnroll; ++k) {  // max_ps(v, acc) keeps acc when v is NaN
      acc[k] = _mm512_max_ps(scaled<kDivide>(load(x + i + k * kLanes), t), acc[k]);
    }
  }
  for (; i < n; i += kLanes) {
    const __m512 v = i + kLanes <= n ? load(x + i) : load_partial(x + i, n - i);
    acc[0] = _mm512_max_ps(scaled<kDivide>(v, t), acc[0]);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3])));
}

template <bool kDivide, class T>
FORKDEC_AVX512 float shifted_exp_sum(const T* x, int64_t n, float temperature, float max) {
  const Poly p = make_poly(1.0f);
  const __m512 t = _mm512_set1_ps(temperature);
  const __m512 shift = _mm512_set1_ps(max);
  constexpr int64_t kBlock = kUnroll * kLanes;
  __m512 total = _mm512_setzero_ps();
  int64_t i = 0;
  while (i + kBlock <= n) {
    __m512 acc[kUnroll];
    for (int k = 0; k < kUnroll; ++k) acc[k] = _mm512_setzero_ps();
    const int64_t end = std::min(n, i + kSumPiece);
    for (; i + kBlock <= end; i += kBlock) {
      for (int k = 0; k < kUnroll; ++k) {
        const __m512 a = _mm512_sub_ps(scaled<kDivide>(load(x + i + k * kLanes), t), shift);
        acc[k] = _mm512_add_ps(acc[k], exp_nonpositive(a, p));
      }
    }
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
  for (; i < n; i += kLanes) {
    const __m512 v = i + kLanes <= n ? load(x + i) : load_partial(x + i, n - i);
    total = _mm512_add_ps(total, exp_nonpositive(_mm512_sub_ps(scaled<kDivide>(v, t), shift), p));
  }
  return _mm512_reduce_add_ps(total);
}

// Pass 3 of one vector: exp(x / t - max) / sum, the 1 / sum folded into p.
template <bool kDivide>
struct ShiftedNormalized {
  Poly p;
  __m512 max, t;
  FORKDEC_AVX512 __m512 operator()(__m512 x) const {
    return exp_nonpositive(_mm512_sub_ps(scaled<kDivide>(x, t), max), p);
  }
};

template <bool kDivide, class T>
FORKDEC_AVX512 void shifted_scale(const T* x, int64_t n, float temperature, float max, float sum,
                                  float* y, bool stream) {
  const ShiftedNormalized<kDivide> f{make_poly(1.0f / sum), _mm512_set1_ps(max), _mm512_set1_ps(temperature)};
  map_row(x, n, y, stream, f);
}

}  // namespace avx512

// ---- AVX2 path ----------------------------------------------------------------------
//
// Same algorithm; AVX2 has no vscalefps, no rounding override and no 16-bit
// masked loads, so those are emulated below.

namespace avx2 {

constexpr int kLanes = 8;
constexpr int kUnroll = 4;

FORKDEC_AVX2 inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
FORKDEC_AVX2 inline __m256 load(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FORKDEC_AVX2 inline __m256 load(const BFloat* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The first `count` elements, the other lanes -inf (adds nothing).
template <class T>
FORKDEC_AVX2 inline __m256 load_partial(const T* p, int64_t count) {
  T buffer[kLanes];
  for (int k = 0; k < kLanes; ++k) buffer[k] = k < count ? p[k] : negative_infinity<T>();
  return load(buffer);
}

FORKDEC_AVX2 inline __m256i first_lanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <bool kDivide>
FORKDEC_AVX2 inline __m256 scaled(__m256 v, __m256 temperature) {
  return kDivide ? _mm256_div_ps(v, temperature) : v;
}

struct Poly { __m256 c[6]; };

FORKDEC_AVX2 inline Poly make_poly(float scale) {
  Poly p;
  for (int k = 0; k < 6; ++k) p.c[k] = _mm256_set1_ps(kExpPoly[k] * scale);
  return p;
}

FORKDEC_AVX2 inline __m256 eval(const Poly& p, __m256 r) {
  __m256 v = p.c[5];
  for (int k = 4; k >= 0; --k) v = _mm256_fmadd_ps(v, r, p.c[k]);
  return v;
}

// 2^d for integer-valued d <= 0, built in the exponent field; 0 below 2^-126
// (fine for sums whose largest term is at least 2^-2). NaN d gives 0: the NaN
// travels in the mantissa it multiplies.
FORKDEC_AVX2 inline __m256 pow2_or_zero(__m256 d) {
  const __m256 biased = _mm256_add_ps(_mm256_max_ps(_mm256_set1_ps(-127.0f), d), _mm256_set1_ps(0x1.8p23f + 127.0f));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23));
}

// v * 2^d for d <= 0 (or -inf), v in [2^-40, 8): adds d + 96 to v's exponent
// field (v stays normal), then one multiply by 2^-96 rounds once, so results in
// the subnormal range are right too.
FORKDEC_AVX2 inline __m256 ldexp_nonpositive(__m256 v, __m256 d) {
  const __m256 biased = _mm256_add_ps(_mm256_max_ps(d, _mm256_set1_ps(-160.0f)), _mm256_set1_ps(0x1.8p23f + 96.0f));
  const __m256i shift = _mm256_slli_epi32(_mm256_castps_si256(biased), 23);
  const __m256 shifted = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(v), shift));
  return _mm256_mul_ps(shifted, _mm256_set1_ps(0x1p-96f));
}

// exp(a) = m * 2^n; returns m, writes n. Matches the AVX-512 special cases.
FORKDEC_AVX2 inline __m256 exp_parts(__m256 a, const Poly& p, __m256* n_out) {
  __m256 t = _mm256_mul_ps(a, _mm256_set1_ps(kLog2e));
  // Saturate at +-FLT_MAX (NaN passes: min/max return their second operand).
  t = _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_max_ps(_mm256_set1_ps(-FLT_MAX), t));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), a);
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(kReducedLimit), _mm256_max_ps(_mm256_set1_ps(-kReducedLimit), r));
  // r - clamped is 0 for ordinary a and +-inf for a = +-inf (n saturated):
  // that moves the infinity into n, a tiny weight keeps garbage from huge
  // finite a from moving n noticeably.
  *n_out = _mm256_fmadd_ps(_mm256_sub_ps(r, clamped), _mm256_set1_ps(0x1p-100f), n);
  return eval(p, clamped);
}

struct LaneSum {
  __m256 acc;
  __m256 top;
};

FORKDEC_AVX2 inline LaneSum empty_sum() { return {_mm256_setzero_ps(), _mm256_set1_ps(-FLT_MAX)}; }

template <int U>
FORKDEC_AVX2 inline void add_terms(LaneSum& s, const __m256 (&m)[U], const __m256 (&n)[U]) {
  __m256 block_top = n[0];
  for (int k = 1; k < U; ++k) block_top = _mm256_max_ps(block_top, n[k]);
  const __m256 top = _mm256_max_ps(block_top, s.top);
  __m256 terms[U];
  for (int k = 0; k < U; ++k) terms[k] = _mm256_mul_ps(m[k], pow2_or_zero(_mm256_sub_ps(n[k], top)));
  for (int width = U / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) terms[k] = _mm256_add_ps(terms[k], terms[k + width]);
  }
  s.acc = _mm256_fmadd_ps(s.acc, pow2_or_zero(_mm256_sub_ps(s.top, top)), terms[0]);
  s.top = top;
}

FORKDEC_AVX2 inline void add_sum(LaneSum& s, const LaneSum& other) {
  const __m256 m[1] = {other.acc};
  const __m256 n[1] = {other.top};
  add_terms<1>(s, m, n);
}

FORKDEC_AVX2 inline ExpSum reduce(const LaneSum& s) {
  alignas(32) float acc[kLanes], top[kLanes];
  _mm256_store_ps(acc, s.acc);
  _mm256_store_ps(top, s.top);
  ExpSum total;
  for (int k = 0; k < kLanes; ++k) total = merge(total, ExpSum{acc[k], top[k]});
  return total;
}

template <bool kDivide, class T>
FORKDEC_AVX2 ExpSum exp_sum(const T* x, int64_t n, float temperature) {
  const Poly p = make_poly(1.0f);
  const __m256 t = _mm256_set1_ps(temperature);
  constexpr int64_t kBlock = kUnroll * kLanes;
  LaneSum total = empty_sum();
  int64_t i = 0;
  while (i + kBlock <= n) {
    LaneSum piece = empty_sum();
    const int64_t end = std::min(n, i + kSumPiece);
    for (; i + kBlock <= end; i += kBlock) {
      __m256 m[kUnroll], e[kUnroll];
      for (int k = 0; k < kUnroll; ++k) {
        m[k] = exp_parts(scaled<kDivide>(load(x + i + k * kLanes), t), p, &e[k]);
      }
      add_terms<kUnroll>(piece, m, e);
    }
    add_sum(total, piece);
  }
  for (; i < n; i += kLanes) {
    const __m256 v = i + kLanes <= n ? load(x + i) : load_partial(x + i, n - i);
    __m256 m[1], e[1];
    m[0] = exp_parts(scaled<kDivide>(v, t), p, &e[0]);
    add_terms<1>(total, m, e);
  }
  return reduce(total);
}

// y[i] = f(x[i]) for i < n; streaming stores need y 32-byte aligned.
template <class T, class F>
FORKDEC_AVX2 void map_row(const T* x, int64_t n, float* y, bool stream, const F& f) {
  int64_t i = 0;
  if (stream) {
    const int64_t head = unaligned_head(y, n, 32);
    if (head > 0) {
      _mm256_maskstore_ps(y, first_lanes(head), f(load_partial(x, head)));
      i = head;
    }
    for (; i + kLanes <= n; i += kLanes) _mm256_stream_ps(y + i, f(load(x + i)));
  }
  for (; i + kLanes <= n; i += kLanes) _mm256_storeu_ps(y + i, f(load(x + i)));
  if (i < n) _mm256_maskstore_ps(y + i, first_lanes(n - i), f(load_partial(x + i, n - i)));
  if (stream) _mm_sfence();
}

template <bool kDivide>
struct Normalized {
  Poly p;
  __m256 top, t;
  FORKDEC_AVX2 __m256 operator()(__m256 x) const {
    __m256 n;
    const __m256 m = exp_parts(scaled<kDivide>(x, t), p, &n);
    return ldexp_nonpositive(m, _mm256_sub_ps(n, top));
  }
};

template <bool kDivide, class T>
FORKDEC_AVX2 void scale(const T* x, int64_t n, float temperature, ExpSum total, float* y, bool stream) {
  const Normalized<kDivide> f{make_poly(1.0f / total.mantissa), _mm256_set1_ps(total.exponent),
                              _mm256_set1_ps(temperature)};
  map_row(x, n, y, stream, f);
}

// exp(a) * scale for a <= 0; kExact selects full subnormal results (pass 3)
// over the cheaper flush below 2^-126 that keeps NaN (pass 2's sum).
template <bool kExact>
FORKDEC_AVX2 inline __m256 exp_nonpositive(__m256 a, const Poly& p) {
  a = _mm256_max_ps(_mm256_set1_ps(kShiftedMin), a);  // NaN a passes (second operand)
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 m = eval(p, _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), a));
  return kExact ? ldexp_nonpositive(m, n) : _mm256_mul_ps(m, pow2_or_zero(n));
}

template <bool kDivide, class T>
FORKDEC_AVX2 float max(const T* x, int64_t n, float temperature) {
  const __m256 t = _mm256_set1_ps(temperature);
  __m256 acc[kUnroll];
  for (int k = 0; k < kUnroll; ++k) acc[k] = _mm256_set1_ps(-kInf);
  int64_t i = 0;
  for (; i + kUnroll * kLanes <= n; i += kUnroll * kLanes) {
    for (int k = 0; k < kUnroll; ++k) {
      acc[k] = _mm256_max_ps(scaled<kDivide>(load(x + i + k * kLanes), t), acc[k]);
    }
  }
  for (; i < n; i += kLanes) {
    const __m256 v = i + kLanes <= n ? load(x + i) : load_partial(x + i, n - i);
    acc[0] = _mm256_max_ps(scaled<kDivide>(v, t), acc[0]);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3])));
  return *std::max_element(lanes, lanes + kLanes);
}

FORKDEC_AVX2 inline float horizontal_sum(__m256 v) {
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, v);
  float total = 0;
  for (float lane : lanes) total += lane;
  return total;
}

template <bool kDivide, class T>
FORKDEC_AVX2 float shifted_exp_sum(const T* x, int64_t n, float temperature, float max) {
  const Poly p = make_poly(1.0f);
  const __m256 t = _mm256_set1_ps(temperature);
  const __m256 shift = _mm256_set1_ps(max);
  constexpr int64_t kBlock = kUnroll * kLanes;
  __m256 total = _mm256_setzero_ps();
  int64_t i = 0;
  while (i + kBlock <= n) {
    __m256 acc[kUnroll];
    for (int k = 0; k < kUnroll; ++k) acc[k] = _mm256_setzero_ps();
    const int64_t end = std::min(n, i + kSumPiece);
    for (; i + kBlock <= end; i += kBlock) {
      for (int k = 0; k < kUnroll; ++k) {
        const __m256 a = _mm256_sub_ps(scaled<kDivide>(load(x + i + k * kLanes), t), shift);
        acc[k] = _mm256_add_ps(acc[k], exp_nonpositive<false>(a, p));
      }
    }
    total = _mm256_add_ps(total, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
  for (; i < n; i += kLanes) {
    const __m256 v = i + kLanes <= n ? load(x + i) : load_partial(x + i, n - i);
    total = _mm256_add_ps(total, exp_nonpositive<false>(_mm256_sub_ps(scaled<kDivide>(v, t), shift), p));
  }
  return horizontal_sum(total);
}

template <bool kDivide>
struct ShiftedNormalized {
  Poly p;
  __m256 max, t;
  FORKDEC_AVX2 __m256 operator()(__m256 x) const {
    return exp_nonpositive<true>(_mm256_sub_ps(scaled<kDivide>(x, t), max), p);
  }
};

template <bool kDivide, class T>
FORKDEC_AVX2 void shifted_scale(const T* x, int64_t n, float temperature, float max, float sum,
                                float* y, bool stream) {
  const ShiftedNormalized<kDivide> f{make_poly(1.0f / sum), _mm256_set1_ps(max), _mm256_set1_ps(temperature)};
  map_row(x, n, y, stream, f);
}

}  // namespace avx2

#endif  // __x86_64__

// ---- ISA selection --------------------------------------------------------------------

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::scalar:
      return true;
#if defined(__x86_64__)
    case Isa::avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::avx512:
      __builtin_cpu_init();
      return cpu_supports(Isa::avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

Isa initial_isa() {
  const Isa best = available_isas().back();
  const char* requested = std::getenv("FORKDEC_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  Isa isa;
  const bool known = parse_isa(requested, &isa);
  if (known && cpu_supports(isa)) return isa;
  std::fprintf(stderr, "forkdec: FORKDEC_CPU_ISA=%s %s; using %s\n", requested,
               known ? "is not supported by this CPU" : "is not one of scalar, avx2, avx512", isa_name(best));
  return best;
}

std::atomic<Isa>& isa_state() {
  static std::atomic<Isa> state{initial_isa()};
  return state;
}

// Calls f(pointer) with x cast to its element type.
template <class F>
auto with_type(DType dtype, const void* x, F&& f) {
  switch (dtype) {
    case DType::f16:
      return f(static_cast<const Half*>(x));
    case DType::bf16:
      return f(static_cast<const BFloat*>(x));
    default:
      return f(static_cast<const float*>(x));
  }
}

// Calls f(std::bool_constant<divide>): dividing by a temperature of 1 is skipped.
template <class F>
auto with_divide(float temperature, F&& f) {
  return temperature == 1.0f ? f(std::false_type{}) : f(std::true_type{});
}

// Row r of x, which holds rows row_stride elements apart.
const void* row_pointer(const void* x, DType dtype, int64_t r, int64_t row_stride) {
  const int64_t element_size = dtype == DType::f32 ? 4 : 2;
  return static_cast<const char*>(x) + r * row_stride * element_size;
}

}  // namespace

// ---- public API ---------------------------------------------------------------------------

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool parse_isa(const std::string& name, Isa* isa) {
  for (Isa candidate : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (name == isa_name(candidate)) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (cpu_supports(isa)) isas.push_back(isa);
  }
  return isas;
}

Isa current_isa() { return isa_state().load(std::memory_order_relaxed); }

void set_isa(Isa isa) {
  if (!cpu_supports(isa)) {
    throw std::invalid_argument(std::string("instruction set ") + isa_name(isa) + " is not available on this CPU");
  }
  isa_state().store(isa, std::memory_order_relaxed);
}

ExpSum merge(ExpSum a, ExpSum b) {
  if (std::isnan(a.exponent) || std::isnan(b.exponent)) return {kNaN, kNaN};
  const float top = std::max(a.exponent, b.exponent);
  return {scale_pow2(a.mantissa, a.exponent - top) + scale_pow2(b.mantissa, b.exponent - top), top};
}

// Each entry point picks the element type, whether to divide, then the ISA.
#if defined(__x86_64__)
#define FORKDEC_DISPATCH(function, ...)                                      \
  switch (current_isa()) {                                                   \
    case Isa::avx512:                                                        \
      return avx512::function<decltype(divide)::value>(__VA_ARGS__);        \
    case Isa::avx2:                                                          \
      return avx2::function<decltype(divide)::value>(__VA_ARGS__);          \
    default:                                                                 \
      return scalar::function<decltype(divide)::value>(__VA_ARGS__);        \
  }
#else
#define FORKDEC_DISPATCH(function, ...) return scalar::function<decltype(divide)::value>(__VA_ARGS__);
#endif

ExpSum softmax_exp_sum(const void* x, DType dtype, int64_t n, float temperature) {
  if (n <= 0) return {};
  return with_type(dtype, x, [&](auto p) {
    return with_divide(temperature, [&](auto divide) -> ExpSum { FORKDEC_DISPATCH(exp_sum, p, n, temperature) });
  });
}

void softmax_scale(const void* x, DType dtype, int64_t n, float temperature, ExpSum total, float* y,
                   bool stream) {
  if (n <= 0) return;
  if (!usable(total)) return fill_nan(y, n);
  with_type(dtype, x, [&](auto p) {
    with_divide(temperature, [&](auto divide) { FORKDEC_DISPATCH(scale, p, n, temperature, total, y, stream) });
  });
}

float three_pass_max(const void* x, DType dtype, int64_t n, float temperature) {
  if (n <= 0) return -kInf;
  return with_type(dtype, x, [&](auto p) {
    return with_divide(temperature, [&](auto divide) -> float { FORKDEC_DISPATCH(max, p, n, temperature) });
  });
}

float three_pass_exp_sum(const void* x, DType dtype, int64_t n, float temperature, float max) {
  if (n <= 0) return 0;
  return with_type(dtype, x, [&](auto p) {
    return with_divide(temperature,
                       [&](auto divide) -> float { FORKDEC_DISPATCH(shifted_exp_sum, p, n, temperature, max) });
  });
}

void three_pass_scale(const void* x, DType dtype, int64_t n, float temperature, float max, float sum, float* y,
                      bool stream) {
  if (n <= 0) return;
  if (!usable_three_pass(max, sum)) return fill_nan(y, n);
  with_type(dtype, x, [&](auto p) {
    with_divide(temperature,
                [&](auto divide) { FORKDEC_DISPATCH(shifted_scale, p, n, temperature, max, sum, y, stream) });
  });
}

#undef FORKDEC_DISPATCH

void softmax(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride, float temperature,
             const float* row_temperature, float* y, bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    const void* row = row_pointer(x, dtype, r, row_stride);
    const float t = row_temperature ? row_temperature[r] : temperature;
    const ExpSum total = softmax_exp_sum(row, dtype, cols, t);
    softmax_scale(row, dtype, cols, t, total, y + r * cols, stream);
  }
}

void softmax_three_pass(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride,
                        float temperature, const float* row_temperature, float* y, bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    const void* row = row_pointer(x, dtype, r, row_stride);
    const float t = row_temperature ? row_temperature[r] : temperature;
    const float max = three_pass_max(row, dtype, cols, t);
    const float sum = three_pass_exp_sum(row, dtype, cols, t, max);
    three_pass_scale(row, dtype, cols, t, max, sum, y + r * cols, stream);
  }
}

}  // namespace forkdec::cpu
