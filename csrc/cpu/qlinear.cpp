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
#include "cpu/simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always-inlined calls

namespace forkdec::cpu {
namespace ql {

// The quantized activations of m rows (qlinear.h): codes [m, k] int8, per row and
// block an fp32 scale and scale * sum(codes).
struct Scratch {
  const int8_t* codes;
  const float* scale;
  const float* scaled_sum;
  int64_t k, blocks;

  Scratch(const void* base, int64_t m, int64_t k_)
      : codes(static_cast<const int8_t*>(base)),
        scale(reinterpret_cast<const float*>(static_cast<const char*>(base) + codes_bytes(m, k_))),
        scaled_sum(scale + m * (k_ / kQBlock)),
        k(k_),
        blocks(k_ / kQBlock) {}

  static int64_t codes_bytes(int64_t m, int64_t k) { return (m * k + 63) / 64 * 64; }
};

struct Tile {  // what one call of the per-ISA kernel computes
  const QWeightView* w;
  Scratch x;
  int64_t m, tile_begin, tile_end;
  const float* bias;
  void* out;
  DType out_dtype;
  int64_t out_stride;
};

using TilesKernel = void (*)(const Tile&);
// Quantizes rows [begin, end) of x (rows x_stride elements apart) into the scratch.
using QuantizeKernel = void (*)(const void* x, DType dtype, int64_t x_stride, int64_t begin, int64_t end,
                                const Scratch& s);

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
#define QL_TARGET __attribute__((target("avx2,fma,f16c")))
#define QL_WIDE 32
#define QL_DOT 1
#include "qlinear.cpp"
#undef QL_NS
#undef QL_TARGET
#undef QL_WIDE
#undef QL_DOT

#define QL_NS ql_avx512
#define QL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define QL_WIDE 64
#define QL_DOT 1
#include "qlinear.cpp"
#undef QL_NS
#undef QL_TARGET
#undef QL_WIDE
#undef QL_DOT

#define QL_NS ql_avx512vnni
#define QL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
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

TilesKernel tiles_kernel() {
  switch (current_isa()) {
#if defined(__x86_64__)
    case Isa::avx512:
      return cpu_has_vnni() ? ql_avx512vnni::tiles : ql_avx512::tiles;
    case Isa::avx2:
      return ql_avx2::tiles;
#endif
    default:
      return ql_scalar::tiles;
  }
}

QuantizeKernel quantize_kernel() {
  switch (current_isa()) {
#if defined(__x86_64__)
    case Isa::avx512:
      return ql_avx512::quantize;
    case Isa::avx2:
      return ql_avx2::quantize;
#endif
    default:
      return ql_scalar::quantize;
  }
}

}  // namespace
}  // namespace ql

int64_t qlinear_scratch_bytes(int64_t m, int64_t k) {
  return ql::Scratch::codes_bytes(m, k) + 2 * m * (k / kQBlock) * int64_t{sizeof(float)};
}

void qlinear_quantize_rows(const void* x, DType dtype, int64_t x_stride, int64_t k, int64_t begin, int64_t end,
                           int64_t m, void* scratch) {
  if (begin < end) ql::quantize_kernel()(x, dtype, x_stride, begin, end, ql::Scratch(scratch, m, k));
}

void qlinear_tile_range(const QWeightView& w, const void* scratch, int64_t m, int64_t tile_begin, int64_t tile_end,
                        const float* bias, void* out, DType out_dtype, int64_t out_stride) {
  tile_end = std::min(tile_end, qlinear_tiles(w.n));
  if (m <= 0 || tile_end <= tile_begin) return;
  const ql::Tile tile{&w, ql::Scratch(scratch, m, w.k), m, tile_begin, tile_end, bias, out, out_dtype, out_stride};
  ql::tiles_kernel()(tile);
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
  typedef uint16_t U16 __attribute__((vector_size(W / 2)));  // one 16-bit value per int32 lane
  typedef int8_t S8Lanes __attribute__((vector_size(W / 4)));  // one byte per int32 lane
  static constexpr int kLanes = W / 4;
};

template <class T>
QL_INLINE T vload(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// W / 4 fp16 values at p as fp32 lanes.
template <int W>
QL_INLINE typename Vec<W>::F32 load_halves(const Half* p) {
  using F = typename Vec<W>::F32;
#if QL_DOT == 0
  F v;
  for (int i = 0; i < W / 4; ++i) v[i] = to_float(p[i]);
  return v;
#else
  if constexpr (W == 64) {
    return (F)_mm512_cvtph_ps(vload<__m256i>(p));
  } else {
    return (F)_mm256_cvtph_ps(vload<__m128i>(p));
  }
#endif
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

// acc + the sum over each group of 4 bytes of a[i] * b[i] (a unsigned codes < 2^bits,
// b signed), as int32 lanes: one accumulating vpdpbusd where there is one.
template <int W, int Bits>
QL_INLINE typename Vec<W>::I32 dot_acc(typename Vec<W>::I32 acc, typename Vec<W>::U8 a, typename Vec<W>::S8 b) {
#if QL_DOT == 2
  using I32 = typename Vec<W>::I32;
  if constexpr (W == 64) {
    return (I32)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
  } else {
    return (I32)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)a, (__m256i)b);
  }
#elif QL_DOT == 1
  // 4-bit codes cannot saturate (2 * 15 * 127); 8-bit codes are split into nibbles.
  if constexpr (Bits == 4) {
    return acc + maddubs<W>(a, b);
  } else {
    return acc + (maddubs<W>(a >> 4, b) << 4) + maddubs<W>(a & 15, b);
  }
#else
  for (int l = 0; l < W / 4; ++l) {
    for (int e = 0; e < 4; ++e) acc[l] += int32_t{a[4 * l + e]} * int32_t{b[4 * l + e]};
  }
  return acc;
#endif
}

// The 4 activation codes at p in every int32 lane.
template <int W>
QL_INLINE typename Vec<W>::S8 splat4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return (typename Vec<W>::S8)(v + typename Vec<W>::I32{});
}

// W / 4 activations at p as fp32 lanes.
template <int W>
QL_INLINE typename Vec<W>::F32 load_floats(const float* p) {
  return vload<typename Vec<W>::F32>(p);
}
template <int W>
QL_INLINE typename Vec<W>::F32 load_floats(const Half* p) {
  return load_halves<W>(p);
}
template <int W>
QL_INLINE typename Vec<W>::F32 load_floats(const BFloat* p) {
  const typename Vec<W>::I32 bits = __builtin_convertvector(vload<typename Vec<W>::U16>(p), typename Vec<W>::I32) << 16;
  return (typename Vec<W>::F32)bits;
}

// Row r of x into the scratch: per block of 32, codes round(x / d) (to nearest even, as
// std::nearbyint) with d = max|x| / 127; the same numbers as a scalar loop would make.
template <class T>
QL_TARGET void quantize_row(const T* x, int64_t r, const Scratch& s) {
  constexpr int W = QL_WIDE, kVecs = 4 * kQBlock / W;  // vectors of fp32 lanes per block
  using F = typename Vec<W>::F32;
  using I = typename Vec<W>::I32;
  int8_t* codes = const_cast<int8_t*>(s.codes) + r * s.k;
  float* scale = const_cast<float*>(s.scale) + r * s.blocks;
  float* scaled_sum = const_cast<float*>(s.scaled_sum) + r * s.blocks;
  for (int64_t b = 0; b < s.blocks; ++b) {
    F v[kVecs], amax = F{};
    for (int i = 0; i < kVecs; ++i) {
      v[i] = load_floats<W>(x + b * kQBlock + i * (W / 4));
      const F a = (F)((I)v[i] & 0x7fffffff);  // |v|
      amax = a > amax ? a : amax;  // NaN lanes leave amax as it was, as std::max(amax, NaN) does
    }
    float m = 0.0f;
    for (int l = 0; l < W / 4; ++l) m = std::max(m, amax[l]);
    const float d = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
    I sum = I{};
    for (int i = 0; i < kVecs; ++i) {
      I q;
#if QL_DOT == 0
      for (int l = 0; l < W / 4; ++l) {  // NaN to -127, as the vector conversion's INT_MIN clamps
        const float p = v[i][l] * inv;
        q[l] = p == p ? static_cast<int32_t>(std::nearbyint(std::clamp(p, -127.0f, 127.0f))) : -127;
      }
#elif QL_WIDE == 64
      q = (I)_mm512_cvtps_epi32((__m512)(v[i] * inv));  // rounds to nearest even, as nearbyint
#else
      q = (I)_mm256_cvtps_epi32((__m256)(v[i] * inv));
#endif
      q = q < -127 ? -127 : q;  // NaN and inf products convert to INT_MIN
      q = q > 127 ? 127 : q;
      sum += q;
      const typename Vec<W>::S8Lanes packed = __builtin_convertvector(q, typename Vec<W>::S8Lanes);
      std::memcpy(codes + b * kQBlock + i * (W / 4), &packed, W / 4);
    }
    int32_t total = 0;
    for (int l = 0; l < W / 4; ++l) total += sum[l];
    scale[b] = d;
    scaled_sum[b] = d * static_cast<float>(total);
  }
}

QL_TARGET void quantize(const void* x, DType dtype, int64_t x_stride, int64_t begin, int64_t end, const Scratch& s) {
  for (int64_t r = begin; r < end; ++r) {
    switch (dtype) {
      case DType::f32:
        quantize_row(static_cast<const float*>(x) + r * x_stride, r, s);
        break;
      case DType::f16:
        quantize_row(static_cast<const Half*>(x) + r * x_stride, r, s);
        break;
      case DType::bf16:
        quantize_row(static_cast<const BFloat*>(x) + r * x_stride, r, s);
        break;
    }
  }
}

// out[r, j0 .. j0 + count) = v (+ bias), in the tile's output dtype.
QL_INLINE void store_lanes(const Tile& t, int64_t r, int64_t j0, int count, const float* v) {
  for (int i = 0; i < count; ++i) {
    const float value = v[i] + (t.bias ? t.bias[j0 + i] : 0.0f);
    const int64_t at = r * t.out_stride + j0 + i;
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
}

// Activation rows r0 .. r0 + R - 1 times the W / 4 features of vector part h of
// tiles tile0 .. tile0 + TB - 1. Per block: 8 integer dots per row and tile of a
// codes vector with 4 activation codes splat over the lanes (two accumulators, so
// the chain of dependent dots halves; each splat serves TB tiles), then one fp32
// multiply-add for the scale and one for the offset, per row and tile.
// Blocks prefetched ahead of the one computed: a matrix of a decode step is read once,
// from memory, in rows too short (0.3-1.5 KB per tile) for the hardware prefetchers to
// ramp up on their own; measured best at 8 (docs/models.md).
constexpr int64_t kAhead = 8;

// A prefetch of the line `bytes` past p, computed on integers: the address may lie past
// the end of p's array, where pointer arithmetic would be undefined.
QL_INLINE void prefetch(const void* p, int64_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)));
}

// Activation rows r0 .. r0 + R - 1 times the W / 4 features of vector part h of a
// tile. Per block: 8 integer dots per row of a codes vector with 4 activation codes
// splat over the lanes (two accumulators, so the chain of dependent dots halves),
// then one fp32 multiply-add for the scale and one for the offset, per row.
template <int Bits, int R>
QL_TARGET void tile_part(const Tile& t, int64_t tile, int h, int64_t r0) {
  constexpr int W = QL_WIDE, kLanes = W / 4;
  constexpr int64_t kBlockBytes = kQTile * kQBlock * Bits / 8;
  using V = Vec<W>;
  const QWeightView& w = *t.w;
  const Scratch& x = t.x;
  const int64_t nb = x.blocks;
  const uint8_t* codes = w.codes + tile * nb * kBlockBytes + h * W;
  const Half* scale = w.scale + tile * nb * kQTile + h * kLanes;
  const Half* offset = w.offset + tile * nb * kQTile + h * kLanes;
  typename V::F32 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = typename V::F32{};
  for (int64_t b = 0; b < nb; ++b) {
    // Past the tile's last block this runs into the next tile's, the next one read (and past
    // the matrix's end at its last tile: a prefetch never faults).
    for (int l = 0; l < kBlockBytes / 64; ++l) prefetch(codes, (b + kAhead) * kBlockBytes + l * 64);
    prefetch(scale, (b + kAhead) * kQTile * 2);
    prefetch(offset, (b + kAhead) * kQTile * 2);
    typename V::I32 isum[2][R];
    for (int r = 0; r < R; ++r) isum[0][r] = isum[1][r] = typename V::I32{};
    const uint8_t* bc = codes + b * kBlockBytes;
    const int8_t* xb = x.codes + r0 * x.k + b * kQBlock;
    if constexpr (Bits == 4) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const typename V::U8 raw = vload<typename V::U8>(bc + v * 64);
        const typename V::U8 lo = raw & 15, hi = raw >> 4;
        for (int r = 0; r < R; ++r) {
          isum[0][r] = dot_acc<W, 4>(isum[0][r], lo, splat4<W>(xb + r * x.k + 4 * v));
          isum[1][r] = dot_acc<W, 4>(isum[1][r], hi, splat4<W>(xb + r * x.k + 16 + 4 * v));
        }
      }
    } else {
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const typename V::U8 c = vload<typename V::U8>(bc + g * 64);
        for (int r = 0; r < R; ++r) isum[g & 1][r] = dot_acc<W, 8>(isum[g & 1][r], c, splat4<W>(xb + r * x.k + 4 * g));
      }
    }
    const typename V::F32 d = load_halves<W>(scale + b * kQTile), c = load_halves<W>(offset + b * kQTile);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      acc[r] += __builtin_convertvector(isum[0][r] + isum[1][r], typename V::F32) * (d * x.scale[at]) +
                c * x.scaled_sum[at];
    }
  }
  const int64_t j0 = tile * kQTile + h * kLanes;
  const int count = static_cast<int>(std::min<int64_t>(kLanes, w.n - j0));
  if (count <= 0) return;
  for (int r = 0; r < R; ++r) {
    float v[kLanes];
    std::memcpy(v, &acc[r], sizeof v);
    store_lanes(t, r0 + r, j0, count, v);
  }
}

// Rows per call of tile_part: as many as keep 2 integer and 1 fp32 accumulator per
// row in registers (32 vector registers with AVX-512, 16 with AVX2).
constexpr int kRows = QL_WIDE == 64 ? 8 : 4;

template <int Bits>
QL_TARGET void tiles_bits(const Tile& t) {
  constexpr int kParts = 64 / QL_WIDE;
  for (int64_t tile = t.tile_begin; tile < t.tile_end; ++tile) {
    for (int h = 0; h < kParts; ++h) {
      int64_t r0 = 0;
      for (; r0 + kRows <= t.m; r0 += kRows) tile_part<Bits, kRows>(t, tile, h, r0);
      switch (t.m - r0) {
        case 7: if constexpr (kRows > 7) tile_part<Bits, 7>(t, tile, h, r0); break;
        case 6: if constexpr (kRows > 6) tile_part<Bits, 6>(t, tile, h, r0); break;
        case 5: if constexpr (kRows > 5) tile_part<Bits, 5>(t, tile, h, r0); break;
        case 4: if constexpr (kRows > 4) tile_part<Bits, 4>(t, tile, h, r0); break;
        case 3: tile_part<Bits, 3>(t, tile, h, r0); break;
        case 2: tile_part<Bits, 2>(t, tile, h, r0); break;
        case 1: tile_part<Bits, 1>(t, tile, h, r0); break;
        default: break;
      }
    }
  }
}

QL_TARGET void tiles(const Tile& t) {
  if (t.w->bits == 4) {
    tiles_bits<4>(t);
  } else {
    tiles_bits<8>(t);
  }
}

#undef QL_INLINE

}  // namespace QL_NS
}  // namespace forkdec::cpu

#endif  // FORKDEC_QLINEAR_KERNEL_PASS
