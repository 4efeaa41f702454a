// torch.ops.forkdec.softmax and softmax_three_pass on CPU tensors: argument
// checks, the [rows, cols] view of x, and the split into threads. The
// arithmetic lives in the torch-free softmax.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/softmax.h"

namespace forkdec::cpu {
namespace {

enum class Algorithm { two_pass, three_pass };

// Outputs at least this large are written with streaming (non-temporal)
// stores: they would not stay in the caches anyway, and streaming saves
// reading every output line before writing it.
constexpr int64_t kStreamBytes = int64_t{16} << 20;
// Elements per task at least, so that small problems stay on one thread.
constexpr int64_t kGrainElements = int64_t{1} << 15;
// Rows are cut into pieces no shorter than this when there are too few rows
// to keep every thread busy.
constexpr int64_t kMinPieceElements = int64_t{1} << 15;

// The softmax of x viewed as [rows, cols]; rows are row_stride elements apart.
struct Problem {
  const void* x;
  DType dtype;
  int64_t rows, cols, row_stride;
  float temperature;
  const float* row_temperature;  // null: temperature for every row
  float* y;
  bool stream;

  const void* row(int64_t r) const {
    const int64_t element_size = dtype == DType::f32 ? 4 : 2;
    return static_cast<const char*>(x) + r * row_stride * element_size;
  }
  float temperature_of(int64_t r) const { return row_temperature ? row_temperature[r] : temperature; }
};

// Each thread takes whole rows.
void run_rows(const Problem& p, Algorithm algorithm) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / p.cols);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    const float* row_temperature = p.row_temperature ? p.row_temperature + begin : nullptr;
    auto kernel = algorithm == Algorithm::two_pass ? softmax : softmax_three_pass;
    kernel(p.row(begin), p.dtype, end - begin, p.cols, p.row_stride, p.temperature, row_temperature,
           p.y + begin * p.cols, p.stream);
  });
}

// Every row cut into `pieces` pieces, one task each: the passes run per piece
// and the per-row statistics are merged between them.
class Pieces {
 public:
  Pieces(const Problem& p, int64_t pieces) : p_(p), pieces_(pieces) {}

  int64_t tasks() const { return p_.rows * pieces_; }
  int64_t row(int64_t task) const { return task / pieces_; }
  float temperature(int64_t task) const { return p_.temperature_of(row(task)); }
  int64_t begin(int64_t task) const { return p_.cols * (task % pieces_) / pieces_; }
  int64_t size(int64_t task) const { return p_.cols * (task % pieces_ + 1) / pieces_ - begin(task); }
  const void* x(int64_t task) const {
    const int64_t element_size = p_.dtype == DType::f32 ? 4 : 2;
    return static_cast<const char*>(p_.row(row(task))) + begin(task) * element_size;
  }
  float* y(int64_t task) const { return p_.y + row(task) * p_.cols + begin(task); }

  // f(task) for every task, spread over the threads.
  template <class F>
  void for_each(const F& f) const {
    at::parallel_for(0, tasks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) f(task);
    });
  }

 private:
  const Problem& p_;
  int64_t pieces_;
};

void run_pieces_two_pass(const Problem& p, const Pieces& pieces) {
  std::vector<ExpSum> partial(pieces.tasks());
  pieces.for_each([&](int64_t task) {
    partial[task] = softmax_exp_sum(pieces.x(task), p.dtype, pieces.size(task), pieces.temperature(task));
  });
  std::vector<ExpSum> total(p.rows);
  for (int64_t task = 0; task < pieces.tasks(); ++task) {
    total[pieces.row(task)] = merge(total[pieces.row(task)], partial[task]);
  }
  pieces.for_each([&](int64_t task) {
    softmax_scale(pieces.x(task), p.dtype, pieces.size(task), pieces.temperature(task), total[pieces.row(task)],
                  pieces.y(task), p.stream);
  });
}

void run_pieces_three_pass(const Problem& p, const Pieces& pieces) {
  std::vector<float> partial(pieces.tasks());
  pieces.for_each([&](int64_t task) {
    partial[task] = three_pass_max(pieces.x(task), p.dtype, pieces.size(task), pieces.temperature(task));
  });
  std::vector<float> max(p.rows, -INFINITY);
  for (int64_t task = 0; task < pieces.tasks(); ++task) {
    max[pieces.row(task)] = std::fmax(max[pieces.row(task)], partial[task]);
  }
  pieces.for_each([&](int64_t task) {
    partial[task] = three_pass_exp_sum(pieces.x(task), p.dtype, pieces.size(task), pieces.temperature(task),
                                       max[pieces.row(task)]);
  });
  std::vector<float> sum(p.rows, 0.0f);
  for (int64_t task = 0; task < pieces.tasks(); ++task) sum[pieces.row(task)] += partial[task];
  pieces.for_each([&](int64_t task) {
    const int64_t r = pieces.row(task);
    three_pass_scale(pieces.x(task), p.dtype, pieces.size(task), pieces.temperature(task), max[r], sum[r],
                     pieces.y(task), p.stream);
  });
}

void run(const Problem& p, Algorithm algorithm) {
  // With fewer rows than a few per thread, long rows are cut so that every
  // thread gets a similar share.
  const int64_t threads = at::get_num_threads();
  int64_t pieces = 1;
  if (threads > 1 && p.rows < 4 * threads) {
    pieces = std::min((4 * threads + p.rows - 1) / p.rows, p.cols / kMinPieceElements);
  }
  if (pieces <= 1) return run_rows(p, algorithm);
  const Pieces split(p, pieces);
  if (algorithm == Algorithm::two_pass) return run_pieces_two_pass(p, split);
  run_pieces_three_pass(p, split);
}

DType dtype_of(const at::Tensor& x, const char* op) {
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", type);
  return type == at::kHalf ? DType::f16 : type == at::kBFloat16 ? DType::bf16 : DType::f32;
}

at::Tensor softmax_op(const at::Tensor& x, int64_t dim, double temperature,
                      const std::optional<at::Tensor>& row_temperature, Algorithm algorithm) {
  const char* op = algorithm == Algorithm::two_pass ? "forkdec::softmax" : "forkdec::softmax_three_pass";
  const DType dtype = dtype_of(x, op);
  const int64_t ndim = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK(dim >= -ndim && dim < ndim, op, ": dim ", dim, " is out of range for a tensor with ", x.dim(),
              " dimensions");
  if (dim < 0) dim += ndim;

  // Softmax rows are the last dimension of this view.
  const at::Tensor moved = x.dim() == 0 ? x.reshape({1}) : x.movedim(dim, -1);
  const int64_t cols = moved.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < moved.dim(); ++d) rows *= moved.size(d);

  at::Tensor temperatures;
  if (row_temperature.has_value()) {
    const at::Tensor& t = *row_temperature;
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": row_temperature must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": row_temperature must be on the CPU like x, got ", t.device());
    TORCH_CHECK(t.numel() == rows, op, ": row_temperature needs one value per row (", rows, "), got ", t.numel());
    temperatures = t.contiguous();
  } else {
    TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
  }

  at::Tensor out = at::empty(moved.sizes(), x.options().dtype(at::kFloat));
  if (rows > 0 && cols > 0) {
    at::Tensor x2d = moved.reshape({rows, cols});  // a view whenever the rows have one stride
    if (cols > 1 && x2d.stride(1) != 1) x2d = x2d.contiguous();
    const bool last_dim = dim == ndim - 1;  // else the output is transposed after, streaming gains nothing
    const Problem problem{x2d.const_data_ptr(), dtype, rows, cols, x2d.stride(0),
                          static_cast<float>(temperature),
                          temperatures.defined() ? temperatures.const_data_ptr<float>() : nullptr,
                          out.mutable_data_ptr<float>(), last_dim && rows * cols * 4 >= kStreamBytes};
    run(problem, algorithm);
  }
  if (x.dim() == 0) return out.reshape({});
  return dim == ndim - 1 ? out : out.movedim(-1, dim).contiguous();
}

at::Tensor softmax_cpu(const at::Tensor& x, int64_t dim, double temperature,
                       const std::optional<at::Tensor>& row_temperature) {
  return softmax_op(x, dim, temperature, row_temperature, Algorithm::two_pass);
}

at::Tensor softmax_three_pass_cpu(const at::Tensor& x, int64_t dim, double temperature,
                                  const std::optional<at::Tensor>& row_temperature) {
  return softmax_op(x, dim, temperature, row_temperature, Algorithm::three_pass);
}

}  // namespace
}  // namespace forkdec::cpu

TORCH_LIBRARY_IMPL(forkdec, CPU, m) {
  m.impl("softmax", &forkdec::cpu::softmax_cpu);
  m.impl("softmax_three_pass", &forkdec::cpu::softmax_three_pass_cpu);
}
