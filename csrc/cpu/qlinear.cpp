// Quantized linear layers on the CPU (see qlinear.h).
//
// As in xquant.cpp the file has two parts. The first (this #ifndef branch) is
// ISA-independent: activation quantization, scratch layout, dispatch. The
// second (the #else branch) is the dot-product kernel written once with GCC
// vector types templated on the vector width; the first part includes this
// file into itself once per instruction set. Only the integer dot product of
// unsigned codes with signed activations differs between sets (vpdpbusd with
// VNNI, vpmaddubsw + vpmaddwd without), in one small function per pass.
#ifndef FORKDEC_QLINEAR_KERNEL_PASS

#include "cpu/qlinear.h"
#include "cpu/scalar_types.h"
#include "cpu/simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always-inlined calls

namespace forkdec::cpu {
namespace ql {

// Position (in the packed order) of the 32-element chunk that holds block
// `b % 4` of a superblock: lo-part chunks are blocks 0 and 2, hi-part 1 and 3.
constexpr int64_t kChunkOfBlock[4] = {0, 2, 1, 3};

// The quantized activations of m rows: codes [m, k_padded] int8 in packed
// order; each chunk's fp32 scale repeated for its 8 int32 lanes ([m, k_padded / 4],
// so a kernel loads the scales of a vector's lanes directly); per row and chunk
// scale * sum(codes) ([m, k_padded / 32]).
struct Scratch {
  const int8_t* codes;
  const float* lane_scale;
  const float* scaled_sum;
  int64_t k_padded;
  int64_t blocks;  // k_padded / 32

  Scratch(const void* base, int64_t m, int64_t kp)
      : codes(static_cast<const int8_t*>(base)),
        lane_scale(reinterpret_cast<const float*>(static_cast<const char*>(base) + codes_bytes(m, kp))),
        scaled_sum(lane_scale + m * (kp / 4)),
        k_padded(kp),
        blocks(kp / kQBlock) {}

  static int64_t codes_bytes(int64_t m, int64_t kp) { return (m * kp + 63) / 64 * 64; }
};

// The quantized activations of the lane-tiled kernel (qlinear.h): groups of
// `lanes` rows, codes [group, k_padded / 4, lanes, 4], scales and scaled sums
// [group, k_padded / 32, lanes].
struct LaneScratch {
  const int8_t* codes;
  const float* scale;
  const float* scaled_sum;
  int64_t k_padded, lanes;

  LaneScratch(const void* base, int64_t rows, int64_t kp, int64_t l)
      : codes(static_cast<const int8_t*>(base)),
        scale(reinterpret_cast<const float*>(static_cast<const char*>(base) + Scratch::codes_bytes(rows, kp))),
        scaled_sum(scale + rows * (kp / kQBlock)),
        k_padded(kp),
        lanes(l) {}
};

struct Tile {  // what one call of the per-ISA kernel computes
  const QWeightView* w;
  Scratch x;
  int64_t m, lanes, n_begin, n_end;
  const float* bias;
  void* out;
  DType out_dtype;
  int64_t out_stride;
};

using RowsKernel = void (*)(const Tile&);

}  // namespace ql
}  // namespace forkdec::cpu

// ---- the kernel, once per instruction set ------------------------------------------

#define FORKDEC_QLINEAR_KERNEL_PASS 1
#define QL_NS ql_scalar
#define QL_TARGET
#define QL_WIDE 32
#define QL_DOT 0
#include "qlinear.cpp"
#undef QL_NS
#undef QL_TARGET
#undef QL_WIDE
#undef QL_DOT

#if defined(__x86_64__)
#define QL_NS ql_avx2
#define QL_TARGET __attribute__((target("avx2,fma")))
#define QL_WIDE 32
#define QL_DOT 1
#include "qlinear.cpp"
#undef QL_NS
#undef QL_TARGET
#undef QL_WIDE
#undef QL_DOT

#define QL_NS ql_avx512
#define QL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define QL_WIDE 64
#define QL_DOT 1
#include "qlinear.cpp"
#undef QL_NS
#undef QL_TARGET
#undef QL_WIDE
#undef QL_DOT

#define QL_NS ql_avx512vnni
#define QL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#define QL_WIDE 64
#define QL_DOT 2
#include "qlinear.cpp"
#undef QL_NS
#undef QL_TARGET
#undef QL_WIDE
#undef QL_DOT
#endif
#undef FORKDEC_QLINEAR_KERNEL_PASS

namespace forkdec::cpu {
namespace ql {
namespace {

std::atomic<bool> g_allow_vnni{true};

bool cpu_has_vnni() {
#if defined(__x86_64__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return has && g_allow_vnni.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

RowsKernel rows_kernel() {
  switch (current_isa()) {
#if defined(__x86_64__)
    case Isa::avx512:
      return cpu_has_vnni() ? ql_avx512vnni::rows : ql_avx512::rows;
    case Isa::avx2:
      return ql_avx2::rows;
#endif
    default:
      return ql_scalar::rows;
  }
}

// Quantizes one row per block of 32 and hands each block to put(pos, codes, d, d * sum)
// with pos its chunk index in packed order (blocks past k: zeros).
template <class T, class Put>
void quantize_row(const T* x, int64_t k, int64_t k_padded, Put put) {
  float v[kQBlock];
  int8_t q[kQBlock];
  for (int64_t b = 0; b < k_padded / kQBlock; ++b) {
    const int64_t pos = b / 4 * 4 + kChunkOfBlock[b % 4];  // chunk index in packed order
    if (x == nullptr || b * kQBlock >= k) {
      std::memset(q, 0, kQBlock);
      put(pos, q, 0.0f, 0.0f);
      continue;
    }
    float amax = 0.0f;
    for (int64_t i = 0; i < kQBlock; ++i) {
      v[i] = to_float(x[b * kQBlock + i]);
      amax = std::max(amax, std::fabs(v[i]));
    }
    const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kQBlock; ++i) {
      const int32_t c = static_cast<int32_t>(std::nearbyint(v[i] * inv));
      q[i] = static_cast<int8_t>(std::clamp(c, -127, 127));
      sum += q[i];
    }
    put(pos, q, d, d * static_cast<float>(sum));
  }
}

// Row r of x (null past m) into the scratch layout of `lanes`.
template <class T>
void quantize_into(const T* x, int64_t r, int64_t k, int64_t k_padded, int64_t rows, int64_t lanes, void* base) {
  if (lanes == 0) {
    const Scratch s(base, rows, k_padded);
    int8_t* codes = const_cast<int8_t*>(s.codes) + r * k_padded;
    float* lane_scale = const_cast<float*>(s.lane_scale) + r * (k_padded / 4);
    float* scaled_sum = const_cast<float*>(s.scaled_sum) + r * s.blocks;
    quantize_row(x, k, k_padded, [&](int64_t pos, const int8_t* q, float d, float ds) {
      std::memcpy(codes + pos * kQBlock, q, kQBlock);
      std::fill(lane_scale + pos * 8, lane_scale + pos * 8 + 8, d);
      scaled_sum[pos] = ds;
    });
    return;
  }
  const LaneScratch s(base, rows, k_padded, lanes);
  const int64_t g = r / lanes, lane = r % lanes, blocks = k_padded / kQBlock;
  int8_t* codes = const_cast<int8_t*>(s.codes) + g * k_padded * lanes + lane * 4;
  float* scale = const_cast<float*>(s.scale) + g * blocks * lanes + lane;
  float* scaled_sum = const_cast<float*>(s.scaled_sum) + g * blocks * lanes + lane;
  quantize_row(x, k, k_padded, [&](int64_t pos, const int8_t* q, float d, float ds) {
    int8_t* c = codes + pos * kQBlock * lanes;  // 8 groups of 4 codes, lanes * 4 bytes apart
    for (int i = 0; i < kQBlock / 4; ++i) std::memcpy(c + i * 4 * lanes, q + 4 * i, 4);
    scale[pos * lanes] = d;
    scaled_sum[pos * lanes] = ds;
  });
}

}  // namespace
}  // namespace ql

int64_t qlinear_lanes(int64_t m) {
  if (m <= 2) return 0;
  return current_isa() == Isa::avx512 && m > 8 ? 16 : 8;
}

int64_t qlinear_scratch_bytes(int64_t m, int64_t k_padded, int64_t lanes) {
  const int64_t rows = qlinear_scratch_rows(m, lanes);
  const int64_t floats = lanes ? 2 * (k_padded / kQBlock) : k_padded / 4 + k_padded / kQBlock;
  return ql::Scratch::codes_bytes(rows, k_padded) + rows * floats * int64_t{sizeof(float)};
}

void qlinear_quantize_rows(const void* x, DType dtype, int64_t x_stride, int64_t k, int64_t k_padded,
                           int64_t begin, int64_t end, int64_t m, int64_t lanes, void* scratch) {
  const int64_t rows = qlinear_scratch_rows(m, lanes);
  for (int64_t r = begin; r < end; ++r) {
    const bool real = r < m;
    switch (dtype) {
      case DType::f32:
        ql::quantize_into(real ? static_cast<const float*>(x) + r * x_stride : nullptr, r, k, k_padded, rows, lanes,
                          scratch);
        break;
      case DType::f16:
        ql::quantize_into(real ? static_cast<const Half*>(x) + r * x_stride : nullptr, r, k, k_padded, rows, lanes,
                          scratch);
        break;
      case DType::bf16:
        ql::quantize_into(real ? static_cast<const BFloat*>(x) + r * x_stride : nullptr, r, k, k_padded, rows,
                          lanes, scratch);
        break;
    }
  }
}

void qlinear_rows(const QWeightView& w, const void* scratch, int64_t m, int64_t lanes, int64_t n_begin,
                  int64_t n_end, const float* bias, void* out, DType out_dtype, int64_t out_stride) {
  if (m <= 0 || n_end <= n_begin) return;
  const ql::Tile tile{&w, ql::Scratch(scratch, m, w.k_padded), m, lanes, n_begin, n_end,
                      bias, out, out_dtype, out_stride};
  ql::rows_kernel()(tile);
}

bool qlinear_uses_vnni() { return current_isa() == Isa::avx512 && ql::cpu_has_vnni(); }

void qlinear_allow_vnni(bool allow) { ql::g_allow_vnni.store(allow, std::memory_order_relaxed); }

}  // namespace forkdec::cpu

#else  // FORKDEC_QLINEAR_KERNEL_PASS: the kernel of one instruction set

namespace forkdec::cpu {
namespace QL_NS {

using namespace ql;

#define QL_INLINE QL_TARGET inline __attribute__((always_inline))

// Vectors of W bytes: codes (u8), activations (s8), int32 and fp32 lanes.
template <int W>
struct Vec {
  typedef uint8_t U8 __attribute__((vector_size(W)));
  typedef int8_t S8 __attribute__((vector_size(W)));
  typedef int32_t I32 __attribute__((vector_size(W)));
  typedef float F32 __attribute__((vector_size(W)));
  static constexpr int kLanes = W / 4;
};

// out[r, j] = value in the tile's output dtype.
QL_INLINE void store(const Tile& t, int64_t r, int64_t j, float value) {
  const int64_t at = r * t.out_stride + j;
  switch (t.out_dtype) {
    case DType::f32:
      static_cast<float*>(t.out)[at] = value;
      break;
    case DType::f16:
      static_cast<Half*>(t.out)[at] = to_half(value);
      break;
    case DType::bf16:
      static_cast<BFloat*>(t.out)[at] = to_bf16(value);
      break;
  }
}

template <class T>
QL_INLINE T vload(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if QL_DOT == 1
// vpmaddubsw then vpmaddwd: int32 lanes of 4 products; pairs saturate at 16 bits.
template <int W>
QL_INLINE typename Vec<W>::I32 maddubs(typename Vec<W>::U8 u, typename Vec<W>::S8 s) {
  using I32 = typename Vec<W>::I32;
  if constexpr (W == 64) {
    return (I32)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)u, (__m512i)s), _mm512_set1_epi16(1));
  } else {
    return (I32)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)u, (__m256i)s), _mm256_set1_epi16(1));
  }
}
#endif

// sum over each group of 4 bytes of a[i] * b[i] (a unsigned codes < 2^bits, b signed), as int32 lanes.
template <int W, int Bits>
QL_INLINE typename Vec<W>::I32 dot(typename Vec<W>::U8 a, typename Vec<W>::S8 b) {
#if QL_DOT == 2
  using I32 = typename Vec<W>::I32;
  if constexpr (W == 64) {
    return (I32)_mm512_dpbusd_epi32(_mm512_setzero_si512(), (__m512i)a, (__m512i)b);
  } else {
    return (I32)_mm256_dpbusd_epi32(_mm256_setzero_si256(), (__m256i)a, (__m256i)b);
  }
#elif QL_DOT == 1
  // 4-bit codes cannot saturate (2 * 15 * 127); 8-bit codes are split into nibbles.
  if constexpr (Bits == 4) {
    return maddubs<W>(a, b);
  } else {
    return (maddubs<W>(a >> 4, b) << 4) + maddubs<W>(a & 15, b);
  }
#else
  typename Vec<W>::I32 r = {};
  for (int l = 0; l < W / 4; ++l) {
    int32_t s = 0;
    for (int e = 0; e < 4; ++e) s += int32_t{a[4 * l + e]} * int32_t{b[4 * l + e]};
    r[l] = s;
  }
  return r;
#endif
}

// acc + dot<W, Bits>(a, b), as one accumulating vpdpbusd where there is one.
template <int W, int Bits>
QL_INLINE typename Vec<W>::I32 dot_acc(typename Vec<W>::I32 acc, typename Vec<W>::U8 a, typename Vec<W>::S8 b) {
#if QL_DOT == 2
  using I32 = typename Vec<W>::I32;
  if constexpr (W == 64) {
    return (I32)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
  } else {
    return (I32)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)a, (__m256i)b);
  }
#else
  return acc + dot<W, Bits>(a, b);
#endif
}

// The 4 bytes at p in every int32 lane.
template <int W>
QL_INLINE typename Vec<W>::U8 splat4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return (typename Vec<W>::U8)(v + typename Vec<W>::I32{});
}

// Lanes 8g .. 8g + 7 (the int32 lanes of one 32-byte chunk) take p[g].
template <int W>
QL_INLINE typename Vec<W>::F32 expand(const float* p) {
  using F = typename Vec<W>::F32;
  const F a = p[0] + F{};
  if constexpr (W == 64) {
    const F b = p[1] + F{};
    return __builtin_shuffle(a, b, (typename Vec<W>::I32){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23});
  } else {
    return a;
  }
}

// Sum of the lanes, halving the vector each time (a serial sum would be a chain of
// W / 4 dependent adds per output, as long as a row's whole dot product at 1 row).
template <int W>
QL_INLINE float hsum(typename Vec<W>::F32 v) {
  if constexpr (W == 16) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typename Vec<W / 2>::F32 lo, hi;
    std::memcpy(&lo, &v, W / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + W / 2, W / 2);
    return hsum<W / 2>(lo + hi);
  }
}

// acc[r] += the W-byte step at byte offset s of superblock sb of weight row
// `row`, for MT activation rows x0 .. x0 + MT - 1.
template <int W, int Bits, int MT>
QL_INLINE void step(const QWeightView& w, int64_t row, const Scratch& x, int64_t x0, int64_t sb, int s,
                    typename Vec<W>::F32* acc) {
  using V = Vec<W>;
  typename V::U8 lo, hi;
  if constexpr (Bits == 4) {
    const typename V::U8 v = vload<typename V::U8>(w.codes + row * (w.k_padded / 2) + sb * 64 + s);
    lo = v & 15;
    hi = v >> 4;
  } else {
    const uint8_t* c = w.codes + row * w.k_padded + sb * kQSuperblock + s;
    lo = vload<typename V::U8>(c);
    hi = vload<typename V::U8>(c + 64);
  }
  const int64_t chunk = sb * 4 + s / 32;  // chunk of the first lo lane group
  const float* ws = w.scale + row * x.blocks + chunk;
  const typename V::F32 w_lo = expand<W>(ws), w_hi = expand<W>(ws + 2);
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r) {
    const int64_t at = (x0 + r) * x.k_padded + sb * kQSuperblock + s;
    const typename V::I32 d_lo = dot<W, Bits>(lo, vload<typename V::S8>(x.codes + at));
    const typename V::I32 d_hi = dot<W, Bits>(hi, vload<typename V::S8>(x.codes + at + 64));
    const float* xs = x.lane_scale + at / 4;
    acc[r] += __builtin_convertvector(d_lo, typename V::F32) * (w_lo * vload<typename V::F32>(xs));
    acc[r] += __builtin_convertvector(d_hi, typename V::F32) * (w_hi * vload<typename V::F32>(xs + 16));
  }
}

template <int Bits, int MT>
QL_TARGET void row_tile(const Tile& t, int64_t row, int64_t x0) {
  const QWeightView& w = *t.w;
  const Scratch& x = t.x;
  constexpr int W = QL_WIDE;
  typename Vec<W>::F32 acc[MT];
  typename Vec<32>::F32 acc32[MT];
  for (int r = 0; r < MT; ++r) {
    acc[r] = typename Vec<W>::F32{};
    acc32[r] = typename Vec<32>::F32{};
  }
  // Whole superblocks in W-byte steps; a last superblock whose real elements
  // all lie in its first half (blocks 0 and 1: chunks 0 and 2) needs only the
  // 32-byte step at offset 0.
  const int64_t full = w.k / kQSuperblock, rest = w.k % kQSuperblock;
  for (int64_t sb = 0; sb < full; ++sb) {
    for (int s = 0; s < 64; s += W) step<W, Bits, MT>(w, row, x, x0, sb, s, acc);
  }
  if (rest > 0 && rest <= 64) {
    step<32, Bits, MT>(w, row, x, x0, full, 0, acc32);
  } else if (rest > 64) {
    for (int s = 0; s < 64; s += W) step<W, Bits, MT>(w, row, x, x0, full, s, acc);
  }
  // Offsets: sum_b c[row, b] * scale_x[b] * sum(codes_x[b]), in fp32, 4 blocks
  // (a superblock) per step; padding blocks have c = 0.
  const float* c = w.offset + row * x.blocks;
  const int64_t superblocks = (w.k + kQSuperblock - 1) / kQSuperblock;
  const float b = t.bias ? t.bias[row] : 0.0f;
  for (int r = 0; r < MT; ++r) {
    const float* xs = x.scaled_sum + (x0 + r) * x.blocks;
    typename Vec<16>::F32 off = {};
    for (int64_t sb = 0; sb < superblocks; ++sb) {
      off += vload<typename Vec<16>::F32>(c + sb * 4) * vload<typename Vec<16>::F32>(xs + sb * 4);
    }
    store(t, x0 + r, row, hsum<W>(acc[r]) + hsum<32>(acc32[r]) + hsum<16>(off) + b);
  }
}

// ---- the lane-tiled kernel (qlinear.h): L activation rows, one per int32 lane ----

// The codes of output features j0 .. j0 + NT - 1 as bytes in packed order: 8-bit
// rows as stored; 4-bit rows unpacked into buf ([NT, k_padded]; byte i of each
// 64-byte superblock holds codes i (low nibble) and 64 + i (high)).
template <int Bits, int NT>
QL_INLINE void feature_codes(const QWeightView& w, int64_t j0, uint8_t* buf, const uint8_t** codes) {
  const int64_t kp = w.k_padded;
  for (int c = 0; c < NT; ++c) {
    if constexpr (Bits == 4) {
      const uint8_t* src = w.codes + (j0 + c) * (kp / 2);
      uint8_t* dst = buf + c * kp;
      for (int64_t sb = 0; sb * kQSuperblock < w.k; ++sb) {
        for (int s = 0; s < 64; s += 32) {
          const typename Vec<32>::U8 v = vload<typename Vec<32>::U8>(src + sb * 64 + s);
          const typename Vec<32>::U8 lo = v & 15, hi = v >> 4;
          std::memcpy(dst + sb * kQSuperblock + s, &lo, 32);
          std::memcpy(dst + sb * kQSuperblock + 64 + s, &hi, 32);
        }
      }
      codes[c] = dst;
    } else {
      codes[c] = w.codes + (j0 + c) * kp;
    }
  }
}

// Output features j0 .. j0 + NT - 1 (codes wc, packed order) for the L activation
// rows of lane group g. Per chunk of 32 codes and feature: 8 integer dots of a
// splat of 4 weight codes with 4 codes of each of L rows (one int32 lane per row),
// then one fp32 scale-and-add per lane.
template <int L, int Bits, int NT>
QL_TARGET void lane_tile(const Tile& t, const LaneScratch& x, int64_t j0, const uint8_t* const* wc, int64_t g) {
  constexpr int W = 4 * L;
  using V = Vec<W>;
  const QWeightView& w = *t.w;
  const int64_t kp = w.k_padded, blocks = kp / kQBlock;
  const int8_t* xc = x.codes + g * kp * L;
  const float* xs = x.scale + g * blocks * L;
  const float* xss = x.scaled_sum + g * blocks * L;
  typename V::F32 acc[NT];
  for (int c = 0; c < NT; ++c) acc[c] = typename V::F32{};
  const int64_t used_blocks = w.k / kQBlock;
  for (int64_t chunk = 0; chunk < blocks; ++chunk) {
    if (chunk / 4 * 4 + kChunkOfBlock[chunk % 4] >= used_blocks) continue;  // padding: zero codes
    typename V::I32 isum[NT];
    for (int c = 0; c < NT; ++c) isum[c] = typename V::I32{};
#pragma GCC unroll 8
    for (int q = 0; q < kQBlock / 4; ++q) {
      const typename V::S8 xv = vload<typename V::S8>(xc + (chunk * kQBlock + 4 * q) * L);
      for (int c = 0; c < NT; ++c) isum[c] = dot_acc<W, Bits>(isum[c], splat4<W>(wc[c] + chunk * kQBlock + 4 * q), xv);
    }
    const typename V::F32 d = vload<typename V::F32>(xs + chunk * L);
    const typename V::F32 ds = vload<typename V::F32>(xss + chunk * L);
    for (int c = 0; c < NT; ++c) {
      const int64_t at = (j0 + c) * blocks + chunk;
      acc[c] += __builtin_convertvector(isum[c], typename V::F32) * (d * w.scale[at]) + ds * w.offset[at];
    }
  }
  const int64_t rows = std::min<int64_t>(L, t.m - g * L);
  for (int c = 0; c < NT; ++c) {
    const float b = t.bias ? t.bias[j0 + c] : 0.0f;
    for (int64_t r = 0; r < rows; ++r) store(t, g * L + r, j0 + c, acc[c][r] + b);
  }
}

// Features in tiles of NT (8 with 32 vector registers, 4 with 16: accumulators
// stay in registers); each tile's codes are unpacked once for every lane group.
template <int L, int Bits>
QL_TARGET void lane_rows(const Tile& t) {
  constexpr int kCols = QL_WIDE == 64 ? 8 : 4;
  const QWeightView& w = *t.w;
  const LaneScratch x(t.x.codes, qlinear_scratch_rows(t.m, L), w.k_padded, L);
  const int64_t groups = (t.m + L - 1) / L;
  thread_local std::vector<uint8_t> buf;
  if (Bits == 4 && buf.size() < static_cast<size_t>(kCols * w.k_padded)) buf.resize(kCols * w.k_padded);
  const uint8_t* wc[kCols];
  int64_t j = t.n_begin;
  for (; j + kCols <= t.n_end; j += kCols) {
    feature_codes<Bits, kCols>(w, j, buf.data(), wc);
    for (int64_t g = 0; g < groups; ++g) lane_tile<L, Bits, kCols>(t, x, j, wc, g);
  }
  for (; j < t.n_end; ++j) {
    feature_codes<Bits, 1>(w, j, buf.data(), wc);
    for (int64_t g = 0; g < groups; ++g) lane_tile<L, Bits, 1>(t, x, j, wc, g);
  }
}

// Activation rows in tiles of 4: each weight vector, once unpacked, serves 4 rows.
template <int Bits>
QL_TARGET void rows_bits(const Tile& t) {
  constexpr int64_t kTile = 4;
  for (int64_t row = t.n_begin; row < t.n_end; ++row) {
    int64_t x0 = 0;
    for (; x0 + kTile <= t.m; x0 += kTile) row_tile<Bits, kTile>(t, row, x0);
    switch (t.m - x0) {
      case 3:
        row_tile<Bits, 3>(t, row, x0);
        break;
      case 2:
        row_tile<Bits, 2>(t, row, x0);
        break;
      case 1:
        row_tile<Bits, 1>(t, row, x0);
        break;
      default:
        break;
    }
  }
}

QL_TARGET void rows(const Tile& t) {
  const bool four = t.w->bits == 4;
#if QL_WIDE == 64
  if (t.lanes == 16) return four ? lane_rows<16, 4>(t) : lane_rows<16, 8>(t);
#endif
  if (t.lanes == 8) return four ? lane_rows<8, 4>(t) : lane_rows<8, 8>(t);
  if (four) {
    rows_bits<4>(t);
  } else {
    rows_bits<8>(t);
  }
}

#undef QL_INLINE

}  // namespace QL_NS
}  // namespace forkdec::cpu

#endif  // FORKDEC_QLINEAR_KERNEL_PASS
