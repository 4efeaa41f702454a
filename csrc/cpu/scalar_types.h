// fp16 / bf16 elements as the CPU kernels see them, their exact scalar
// conversion to fp32 (bit for bit torch's .float()) and the rounding back
// (torch's .to(dtype)). SIMD paths convert in registers; these serve the
// scalar paths and the tails.
#pragma once

#include <cstdint>
#include <cstring>

namespace forkdec::cpu {

struct Half { uint16_t bits; };
struct BFloat { uint16_t bits; };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float to_float(float v) { return v; }
inline float to_float(BFloat v) { return bits_to_float(uint32_t{v.bits} << 16); }
inline float to_float(Half v) {
  const uint32_t sign = uint32_t{v.bits & 0x8000u} << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1f;
  const uint32_t mantissa = v.bits & 0x3ff;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // subnormal (or zero): exact
  return sign ? -magnitude : magnitude;
}

// Round to nearest even, as torch's .to(torch.bfloat16).
inline BFloat to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat{static_cast<uint16_t>((x >> 16) | 0x40)};
  return BFloat{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1)) >> 16)};
}

// Round to nearest even, overflow to inf, subnormals kept, as torch's .to(torch.float16).
inline Half to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00)};
  const int e = static_cast<int>(a >> 23) - 127;
  if (e > 15) return Half{static_cast<uint16_t>(sign | 0x7c00)};
  uint32_t mantissa = a & 0x7fffffu;
  uint32_t h;
  int shift;
  if (e >= -14) {  // a normal half: drop 13 mantissa bits
    h = (static_cast<uint32_t>(e + 15) << 10) | (mantissa >> 13);
    shift = 13;
  } else {  // a subnormal half (units of 2^-24) or zero
    if (e < -25) return Half{sign};
    mantissa |= 0x800000u;
    shift = -e - 1;
    h = mantissa >> shift;
  }
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (h & 1))) ++h;  // a carry may reach the next exponent or inf: right
  return Half{static_cast<uint16_t>(sign | h)};
}

inline void from_float(float v, float* dst) { *dst = v; }
inline void from_float(float v, Half* dst) { *dst = to_half(v); }
inline void from_float(float v, BFloat* dst) { *dst = to_bf16(v); }

}  // namespace forkdec::cpu
