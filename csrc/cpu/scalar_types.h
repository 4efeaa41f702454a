// fp16 / bf16 elements as the CPU kernels see them, and their exact scalar
// conversion to fp32 (bit for bit torch's .float()). SIMD paths convert in
// registers; these serve the scalar paths and the tails.
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

}  // namespace forkdec::cpu
