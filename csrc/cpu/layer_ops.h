// The elementwise parts of a Llama decoder layer, fused so that each is one
// pass over memory instead of several small tensor ops (at decode batch sizes
// the per-op dispatch cost, not arithmetic, dominated them). Torch-free: raw
// pointers; math in fp32, one rounding to the output type. Rows are processed
// [begin, end) so that callers can split them across threads.
#pragma once

#include <cstdint>

#include "cpu/softmax.h"  // DType, current_isa()

namespace forkdec::cpu {

// out[r] = s / sqrt(mean(s^2) + eps) * weight with s = x[r] (+ residual[r]).
// With a residual, sum[r] = s rounded to the row type, and the norm is taken
// of that rounded sum (the value the caller's residual stream carries).
// x / residual rows are x_stride / residual_stride elements apart, unit stride
// inside; out and sum are contiguous [rows, h]. weight: h values of wdtype.
void rms_norm_rows(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                   const void* weight, DType wdtype, DType dtype, int64_t begin, int64_t end, int64_t h,
                   float eps, void* out, void* sum);

// Rotate-half RoPE of the q and k heads of a fused qkv projection, split into
// contiguous q [rows, hq, d], k [rows, hkv, d] and v [rows, hkv, d].
// qkv rows are `stride` elements apart: hq + 2 hkv heads of d elements. cos and
// sin are fp32 [rows, d / 2]; element i pairs with i + d / 2:
//   out_i = x_i cos_i - x_{i+d/2} sin_i,  out_{i+d/2} = x_{i+d/2} cos_i + x_i sin_i.
void rope_qkv_rows(const void* qkv, int64_t stride, const float* cos, const float* sin, DType dtype,
                   int64_t begin, int64_t end, int64_t hq, int64_t hkv, int64_t d, void* q, void* k, void* v);

// out[r, i] = silu(x[r, i]) * x[r, inter + i]; x rows `stride` elements apart,
// out contiguous [rows, inter].
void silu_and_mul_rows(const void* x, int64_t stride, DType dtype, int64_t begin, int64_t end, int64_t inter,
                       void* out);

}  // namespace forkdec::cpu
