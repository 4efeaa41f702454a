// Two-Pass Softmax on CUDA (Dukhan & Ablavatski, arXiv 2001.04438), torch-free.
//
// Declarations only, so that host C++ (the torch glue) can include this header;
// the kernels and the explicit instantiations live in softmax.cu.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace forkdec::cuda {

// y[r, :] = softmax(x[r, :] * inv_t[r]) in fp32, for r < rows, two passes over x.
//
// x: rows x cols of T (float, __half, __nv_bfloat16), unit column stride, row r at
//    x + r * row_stride (elements). y: contiguous fp32 rows x cols.
// inv_t[r] = row_inv_temperature[r] (fp32 [rows], device memory) when that is not
//    null, else inv_temperature (1 / temperature).
// Semantics of torch.softmax(x.float() / temperature, -1): -inf entries give 0, a row
// of only -inf gives NaN, NaN or +inf make their row NaN; no finite input overflows.
// One thread block per row; launched on `stream`, no synchronisation, launch errors
// are left for the caller to query (cudaGetLastError). rows or cols == 0: no launch.
template <typename T>
void softmax(const T* x, int64_t row_stride, float* y, int64_t rows, int64_t cols,
             float inv_temperature, const float* row_inv_temperature, cudaStream_t stream);

extern template void softmax<float>(const float*, int64_t, float*, int64_t, int64_t, float,
                                    const float*, cudaStream_t);
extern template void softmax<__half>(const __half*, int64_t, float*, int64_t, int64_t, float,
                                     const float*, cudaStream_t);
extern template void softmax<__nv_bfloat16>(const __nv_bfloat16*, int64_t, float*, int64_t, int64_t,
                                            float, const float*, cudaStream_t);

}  // namespace forkdec::cuda
