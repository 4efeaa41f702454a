// Linear layers on GGUF block-quantized weights (Q4_0, Q4_1, Q8_0), computed
// as llama.cpp does: the activations are quantized per block of 32 to int8
// inside the op and each block's dot product is an integer one (AVX-512 VNNI
// vpdpbusd, or AVX2 / AVX-512BW vpmaddubsw), scaled in fp32. Torch-free.
//
// Packed weight layout (made once at load by forkdec.ops.qlinear.pack_gguf):
// every row of K weights is padded to a multiple of 128 ("superblock" of 4
// GGUF blocks) with zero blocks. Inside a superblock the 128 weights are
// ordered lo-part = elements 0..31, 64..95 then hi-part = 32..63, 96..127, so
// that one 64-byte vector of 4-bit codes holds the lo-part in its low nibbles
// and the hi-part in its high nibbles. Codes are unsigned: 4-bit q in 0..15,
// 8-bit stored as q + 128. Each block b has a scale d and an offset c with
//   weight = code * d + c        (Q4_0: c = -8 d, Q4_1: c = m, Q8_0: c = -128 d),
// listed per superblock in the order of its parts: blocks 0, 2, 1, 3.
#pragma once

#include <cstdint>

#include "cpu/softmax.h"  // DType, Isa

namespace forkdec::cpu {

constexpr int64_t kQBlock = 32;        // elements per GGUF block
constexpr int64_t kQSuperblock = 128;  // elements per packed superblock

struct QWeightView {
  const uint8_t* codes;  // [n, row_bytes]: k_padded / 2 (4-bit) or k_padded (8-bit) bytes per row
  const float* scale;    // [n, k_padded / 32]
  const float* offset;   // [n, k_padded / 32]
  int bits;              // 4 or 8
  int64_t n;             // output features (rows)
  int64_t k;             // input features (K <= k_padded, K % 32 == 0)
  int64_t k_padded;      // K rounded up to a multiple of 128
};

// Two kernels share the packed weights. The per-row kernel (products of 1..2 rows)
// dots each weight row against each activation row, one superblock per vector. The
// lane-tiled kernel (more rows) puts L activation rows side by side, one per int32
// lane (4 consecutive codes of a row per lane), and broadcasts 4 weight codes of an
// output feature to every lane: each integer dot then accumulates a whole block per
// lane, so the fp32 scaling runs once per block and L rows, not once per 4 codes and
// row. The scratch layout follows the kernel:
//   lanes == 0: codes [m, k_padded] in packed order, per-lane scales, per-chunk sums;
//   lanes == L: groups of L rows; codes [group, k_padded / 4, L, 4], scales and
//               scale * sum(codes) [group, k_padded / 32, L] (rows >= m are zeros).
// Rows per lane group for a product of m rows on the current instruction set: 0 for
// the per-row kernel, else 8 or 16.
int64_t qlinear_lanes(int64_t m);

// Rows the scratch holds: m, rounded up to a multiple of lanes.
inline int64_t qlinear_scratch_rows(int64_t m, int64_t lanes) {
  return lanes ? (m + lanes - 1) / lanes * lanes : m;
}

// Bytes of scratch holding m quantized activation rows of k_padded elements.
int64_t qlinear_scratch_bytes(int64_t m, int64_t k_padded, int64_t lanes);

// Quantizes rows [begin, end) of x [m, k] (rows x_stride elements apart, unit
// stride inside; dtype f32/f16/bf16) per block of 32 into scratch: int8 codes in
// the packed order, one fp32 scale and one fp32 scale * sum(codes) per block.
// Elements k .. k_padded are zeros; so are rows m .. end (end <= qlinear_scratch_rows).
void qlinear_quantize_rows(const void* x, DType dtype, int64_t x_stride, int64_t k, int64_t k_padded,
                           int64_t begin, int64_t end, int64_t m, int64_t lanes, void* scratch);

// out[r, j] = sum_e x[r, e] * w[j, e] (+ bias[j]) for output features j in
// [n_begin, n_end) and every row r < m, from the quantized activations in
// scratch (made with the same lanes). out is [m, out_stride] of out_dtype; bias
// (fp32, n values) may be null.
void qlinear_rows(const QWeightView& w, const void* scratch, int64_t m, int64_t lanes, int64_t n_begin,
                  int64_t n_end, const float* bias, void* out, DType out_dtype, int64_t out_stride);

// Whether the current instruction set uses VNNI integer dot products.
bool qlinear_uses_vnni();
// Lets the avx512 path use VNNI where the CPU has it (the default), or forces
// its vpmaddubsw path (for tests on VNNI machines).
void qlinear_allow_vnni(bool allow);

}  // namespace forkdec::cpu
