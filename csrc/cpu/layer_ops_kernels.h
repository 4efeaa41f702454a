// The kernels of layer_ops.h, written once against a small vector shim and
// included by layer_ops.cpp once per instruction set: FD_NS names the
// namespace, FD_TARGET the function attribute, FD_ISA_* the shim. No include
// guard on purpose.
namespace FD_NS {

// ---- vector shim: V holds W floats ---------------------------------------------------

#if defined(FD_ISA_AVX512)

using V = __m512;
constexpr int64_t W = 16;
FD_TARGET inline V vset(float x) { return _mm512_set1_ps(x); }
FD_TARGET inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
FD_TARGET inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
FD_TARGET inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
FD_TARGET inline V vfms(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }  // a b - c
FD_TARGET inline V vdiv(V a, V b) { return _mm512_div_ps(a, b); }
FD_TARGET inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
FD_TARGET inline V vload(const float* p) { return _mm512_loadu_ps(p); }
FD_TARGET inline V vload(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FD_TARGET inline V vload(const BFloat* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
FD_TARGET inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
FD_TARGET inline void vstore(Half* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
FD_TARGET inline void vstore(BFloat* p, V v) {
  // Round to nearest even in integers (no AVX512-BF16 needed); NaN stays a quiet NaN.
  const __m512i x = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
// 2^x; scalef handles the exponent, so no clamping is needed.
FD_TARGET inline V vexp2(V x) {
  const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V r = _mm512_sub_ps(x, n);
  V p = vset(kExp2Poly[5]);
  for (int k = 4; k >= 0; --k) p = vfma(p, r, vset(kExp2Poly[k]));
  return _mm512_scalef_ps(p, n);
}

#elif defined(FD_ISA_AVX2)

using V = __m256;
constexpr int64_t W = 8;
FD_TARGET inline V vset(float x) { return _mm256_set1_ps(x); }
FD_TARGET inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
FD_TARGET inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
FD_TARGET inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
FD_TARGET inline V vfms(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
FD_TARGET inline V vdiv(V a, V b) { return _mm256_div_ps(a, b); }
FD_TARGET inline float vsum(V v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
FD_TARGET inline V vload(const float* p) { return _mm256_loadu_ps(p); }
FD_TARGET inline V vload(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FD_TARGET inline V vload(const BFloat* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
FD_TARGET inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
FD_TARGET inline void vstore(Half* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
FD_TARGET inline void vstore(BFloat* p, V v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40)), nan);
  // Pack the 8 low halves: packus works per 128-bit lane, then the lanes are joined.
  const __m256i packed = _mm256_packus_epi32(r, r);
  const __m128i lo = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), lo);
}
// 2^x; the clamp keeps n + 127 a valid exponent, then x >= 128 becomes +inf as in
// float arithmetic (silu(a) of a very negative a must come out 0, not a/2^127).
FD_TARGET inline V vexp2(V x) {
  const V overflow = _mm256_cmp_ps(x, vset(128.0f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, vset(-126.0f)), vset(127.0f));
  const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V r = _mm256_sub_ps(x, n);
  V p = vset(kExp2Poly[5]);
  for (int k = 4; k >= 0; --k) p = vfma(p, r, vset(kExp2Poly[k]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(vmul(p, _mm256_castsi256_ps(e)), vset(INFINITY), overflow);
}

#else  // scalar: one float per "vector"

using V = float;
constexpr int64_t W = 1;
inline V vset(float x) { return x; }
inline V vadd(V a, V b) { return a + b; }
inline V vmul(V a, V b) { return a * b; }
inline V vfma(V a, V b, V c) { return std::fma(a, b, c); }
inline V vfms(V a, V b, V c) { return std::fma(a, b, -c); }
inline V vdiv(V a, V b) { return a / b; }
inline float vsum(V v) { return v; }
template <class T> inline V vload(const T* p) { return to_float(*p); }
template <class T> inline void vstore(T* p, V v) { from_float(v, p); }
inline V vexp2(V x) { return std::exp2(x); }

#endif

// Scalar forms for the tails of the vector loops.
inline float sload(const float* p) { return *p; }
inline float sload(const Half* p) { return to_float(*p); }
inline float sload(const BFloat* p) { return to_float(*p); }
template <class T> inline void sstore(T* p, float v) { from_float(v, p); }

// ---- kernels -------------------------------------------------------------------------

template <class T, class Wt>
FD_TARGET void rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, const Wt* weight,
                        int64_t begin, int64_t end, int64_t h, float eps, T* out, T* sum) {
  const int64_t hv = h - h % W;
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * x_stride;
    T* o = out + r * h;
    const T* s = xr;  // the values normalized: x, or the rounded x + residual
    if (residual != nullptr) {
      const T* res = residual + r * residual_stride;
      T* sr = sum + r * h;
      int64_t i = 0;
      for (; i < hv; i += W) vstore(sr + i, vadd(vload(xr + i), vload(res + i)));
      for (; i < h; ++i) sstore(sr + i, sload(xr + i) + sload(res + i));
      s = sr;
    }
    V acc0 = vset(0.0f), acc1 = vset(0.0f);  // two chains: the adds overlap
    int64_t i = 0;
    for (; i + 2 * W <= hv; i += 2 * W) {
      const V a = vload(s + i), b = vload(s + i + W);
      acc0 = vfma(a, a, acc0);
      acc1 = vfma(b, b, acc1);
    }
    for (; i < hv; i += W) {
      const V a = vload(s + i);
      acc0 = vfma(a, a, acc0);
    }
    float squares = vsum(vadd(acc0, acc1));
    for (; i < h; ++i) squares += sload(s + i) * sload(s + i);
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(h) + eps);
    const V vinv = vset(inv);
    for (i = 0; i < hv; i += W) vstore(o + i, vmul(vmul(vload(s + i), vinv), vload(weight + i)));
    for (; i < h; ++i) sstore(o + i, sload(s + i) * inv * sload(weight + i));
  }
}

template <class T>
FD_TARGET void rope_qkv(const T* qkv, int64_t stride, const float* cos, const float* sin, int64_t begin,
                        int64_t end, int64_t hq, int64_t hkv, int64_t d, T* q, T* k, T* v) {
  const int64_t half = d / 2, hv = half - half % W;
  for (int64_t t = begin; t < end; ++t) {
    const T* row = qkv + t * stride;
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t head = 0; head < hq + hkv; ++head) {
      const T* x1 = row + head * d;
      const T* x2 = x1 + half;
      T* o1 = head < hq ? q + (t * hq + head) * d : k + (t * hkv + head - hq) * d;
      T* o2 = o1 + half;
      int64_t i = 0;
      for (; i < hv; i += W) {
        const V a = vload(x1 + i), b = vload(x2 + i), vc = vload(c + i), vs = vload(s + i);
        vstore(o1 + i, vfms(a, vc, vmul(b, vs)));
        vstore(o2 + i, vfma(a, vs, vmul(b, vc)));
      }
      for (; i < half; ++i) {
        const float a = sload(x1 + i), b = sload(x2 + i);
        sstore(o1 + i, a * c[i] - b * s[i]);
        sstore(o2 + i, a * s[i] + b * c[i]);
      }
    }
    std::memcpy(v + t * hkv * d, row + (hq + hkv) * d, sizeof(T) * hkv * d);
  }
}

template <class T>
FD_TARGET void silu_and_mul(const T* x, int64_t stride, int64_t begin, int64_t end, int64_t inter, T* out) {
  const int64_t iv = inter - inter % W;
  const V one = vset(1.0f), minus_log2e = vset(-kLog2e);
  for (int64_t r = begin; r < end; ++r) {
    const T* a = x + r * stride;
    const T* b = a + inter;
    T* o = out + r * inter;
    int64_t i = 0;
    for (; i < iv; i += W) {
      const V va = vload(a + i);
      vstore(o + i, vmul(vdiv(va, vadd(one, vexp2(vmul(va, minus_log2e)))), vload(b + i)));
    }
    for (; i < inter; ++i) {
      const float va = sload(a + i);
      sstore(o + i, va / (1.0f + std::exp(-va)) * sload(b + i));
    }
  }
}

}  // namespace FD_NS
