// Schemas of every forkdec op. Kernels register their implementations per
// dispatch key next to the kernel (csrc/cpu/*_op.cpp, csrc/cuda/*_op.cpp);
// fake (meta) implementations for torch.compile live in python/forkdec/ops.
#include <torch/library.h>

TORCH_LIBRARY(forkdec, m) {
  // softmax(x / temperature) along `dim`, fp32 output, two passes over x.
  // row_temperature (fp32, one value per row of x.movedim(dim, -1)) replaces
  // the scalar temperature when given.
  m.def("softmax(Tensor x, int dim, float temperature, Tensor? row_temperature) -> Tensor");
  // Same semantics, the classic three passes (max, sum of exp, scale):
  // the control the two-pass kernel is benchmarked against.
  m.def("softmax_three_pass(Tensor x, int dim, float temperature, Tensor? row_temperature) -> Tensor");
}
