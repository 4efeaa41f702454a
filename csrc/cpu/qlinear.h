// Linear layers on GGUF block-quantized weights (Q4_0, Q4_1, Q8_0), computed
// as llama.cpp does: the activations are quantized per block of 32 to int8
// inside the op and each block's dot product is an integer one (AVX-512 VNNI
// vpdpbusd, or AVX2 / AVX-512BW vpmaddubsw), scaled in fp32. Torch-free.
//
// Packed weight layout (made once at load by forkdec.qweight.pack_gguf): tiles
// of 16 output features (features past n are zeros). Per tile and block of 32
// inputs, the codes are 64-byte vectors whose int32 lane f holds 4 consecutive
// codes of feature f: 4-bit formats 4 vectors v, byte 4f + e holding code
// [f, 4v + e] in its low nibble and code [f, 16 + 4v + e] in its high nibble;
// 8-bit 8 vectors g, byte 4f + e = code [f, 4g + e]. Codes are unsigned: 4-bit q
// in 0..15, 8-bit stored as q + 128. Then per tile and block 16 fp16 scales d
// and 16 fp16 offsets c (feature order) with
//   weight = code * d + c        (Q4_0: c = -8 d, Q4_1: c = m, Q8_0: c = -128 d).
// A vpdpbusd of one codes vector with 4 activation codes broadcast to every lane
// thus advances 16 (8 per AVX2 vector) outputs, and each block is scaled once
// per 16 outputs: no horizontal sums.
#pragma once

#include <cstdint>

#include "cpu/scalar_types.h"  // Half
#include "cpu/softmax.h"       // DType, Isa

namespace forkdec::cpu {

constexpr int64_t kQBlock = 32;  // inputs per GGUF block
constexpr int64_t kQTile = 16;   // output features per packed tile

struct QWeightView {
  const uint8_t* codes;  // [tiles, k / 32 * 16 * 32 * bits / 8]
  const Half* scale;     // [tiles, k / 32 * 16]
  const Half* offset;    // [tiles, k / 32 * 16]
  int bits;              // 4 or 8
  int64_t n;             // output features; tiles = ceil(n / 16)
  int64_t k;             // inputs (a multiple of 32)
};

inline int64_t qlinear_tiles(int64_t n) { return (n + kQTile - 1) / kQTile; }

// Bytes of scratch holding m quantized activation rows of k elements: int8 codes
// [m, k], then fp32 scales and fp32 scale * sum(codes) [m, k / 32] each.
int64_t qlinear_scratch_bytes(int64_t m, int64_t k);

// Quantizes rows [begin, end) of x [m, k] (rows x_stride elements apart, unit
// stride inside; dtype f32/f16/bf16) per block of 32 into scratch.
void qlinear_quantize_rows(const void* x, DType dtype, int64_t x_stride, int64_t k, int64_t begin, int64_t end,
                           int64_t m, void* scratch);

// out[r, j] = sum_e x[r, e] * w[j, e] (+ bias[j]) for the output features of
// tiles [tile_begin, tile_end) (j < n) and every row r < m, from the quantized
// activations in scratch. out is [m, out_stride] of out_dtype; bias (fp32, n
// values) may be null.
void qlinear_tile_range(const QWeightView& w, const void* scratch, int64_t m, int64_t tile_begin, int64_t tile_end,
                        const float* bias, void* out, DType out_dtype, int64_t out_stride);

// Whether the current instruction set uses VNNI integer dot products.
bool qlinear_uses_vnni();
// Lets the avx512 path use VNNI where the CPU has it (the default), or forces
// its vpmaddubsw path (for tests on VNNI machines).
void qlinear_allow_vnni(bool allow);

}  // namespace forkdec::cpu
