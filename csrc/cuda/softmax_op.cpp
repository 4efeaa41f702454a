// torch glue: forkdec::softmax for CUDA tensors, on csrc/cuda/softmax.cu.
// Built by setup.py only when a CUDA toolkit and a CUDA build of torch are present.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cuda/softmax.cuh"

namespace {

// softmax(x / temperature) along dim in fp32; row_temperature (fp32, one value per
// row of x.movedim(dim, -1), any shape with that many elements) replaces temperature.
at::Tensor softmax_cuda(const at::Tensor& x, int64_t dim, double temperature,
                        const std::optional<at::Tensor>& row_temperature) {
  TORCH_CHECK(x.is_cuda(), "forkdec::softmax (CUDA): x must be a CUDA tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "forkdec::softmax: x dtype ", dtype, " is not supported; expected float32, float16 or bfloat16");
  const int64_t ndim = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK(dim >= -ndim && dim < ndim, "forkdec::softmax: dim ", dim, " is out of range for a tensor with ",
              x.dim(), " dimensions");
  if (dim < 0) dim += ndim;
  TORCH_CHECK(temperature > 0, "forkdec::softmax: temperature must be positive, got ", temperature);
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor moved = x.dim() == 0 ? x.reshape({1}) : x.movedim(dim, -1);
  const int64_t cols = moved.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < moved.dim(); ++d) rows *= moved.size(d);

  at::Tensor inv_row_temperature;  // 1 / row_temperature, fp32 [rows]
  if (row_temperature.has_value()) {
    const at::Tensor& t = *row_temperature;
    TORCH_CHECK(t.device() == x.device(), "forkdec::softmax: row_temperature is on ", t.device(), ", x on ",
                x.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "forkdec::softmax: row_temperature must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.numel() == rows, "forkdec::softmax: row_temperature needs one value per row (", rows,
                "), got ", t.numel());
    inv_row_temperature = t.reshape({-1}).reciprocal().contiguous();
  }

  at::Tensor out = at::empty(moved.sizes(), x.options().dtype(at::kFloat));
  if (rows > 0 && cols > 0) {
    at::Tensor x2d = moved.reshape({rows, cols});  // a view when the rows share one stride
    if (cols > 1 && x2d.stride(1) != 1) x2d = x2d.contiguous();
    const float inv_temperature = static_cast<float>(1.0 / temperature);
    const float* row_inv = inv_row_temperature.defined() ? inv_row_temperature.data_ptr<float>() : nullptr;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    float* y = out.data_ptr<float>();
    const int64_t stride = x2d.stride(0);
    switch (dtype) {
      case at::kFloat:
        forkdec::cuda::softmax(x2d.data_ptr<float>(), stride, y, rows, cols, inv_temperature, row_inv, stream);
        break;
      case at::kHalf:
        forkdec::cuda::softmax(reinterpret_cast<const __half*>(x2d.data_ptr<at::Half>()), stride, y, rows, cols,
                               inv_temperature, row_inv, stream);
        break;
      default:  // at::kBFloat16, checked above
        forkdec::cuda::softmax(reinterpret_cast<const __nv_bfloat16*>(x2d.data_ptr<at::BFloat16>()), stride, y,
                               rows, cols, inv_temperature, row_inv, stream);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return x.dim() == 0 ? out.reshape({}) : out.movedim(-1, dim).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(forkdec, CUDA, m) {
  m.impl("softmax", &softmax_cuda);
}
