// The torch-level parts of a qlinear product, shared by torch.ops.forkdec.qlinear
// (qlinear_op.cpp) and the C++ layer loop (llama_layers_op.cpp): the checks of a
// packed weight, and a product into a caller's buffer, split over threads.
#pragma once

#include <ATen/ATen.h>

#include "cpu/qlinear.h"

namespace forkdec::cpu {

// The packed [n, k] matrix (codes, scale, offset) of `bits`, checked as the op checks
// it (TORCH_CHECK naming the argument, prefixed with `op`).
QWeightView qweight_view(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t bits,
                         int64_t k, int64_t n, const char* op);

// out [m, n] (rows n apart, out_dtype) = x [m, k] (rows x_stride apart, unit stride
// inside, xdtype) times w transposed, plus bias (fp32 [n]) when not null. The
// activations are quantized into a per-thread scratch; threads split the tiles.
void qlinear_run(const QWeightView& w, const void* x, DType xdtype, int64_t x_stride, int64_t m, const float* bias,
                 void* out, DType out_dtype);

}  // namespace forkdec::cpu
