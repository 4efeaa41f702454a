// Two-Pass Softmax (Dukhan & Ablavatski, arXiv 2001.04438) on the CPU, plus
// the classic three-pass control. Torch-free: raw pointers, fp32 output.
//
// softmax(x / temperature) of a row is computed as
//   pass 1: sum_i exp(x_i / t) kept as mantissa * 2^exponent (no running max,
//           so no finite input overflows),
//   pass 2: y_i = exp(x_i / t) / sum.
// The passes are exposed per run of contiguous elements so that a caller can
// split one long row across threads: pass 1 per piece, merge() the partial
// sums, pass 2 per piece. softmax() and softmax_three_pass() do whole rows.
//
// Special values follow torch.softmax(x.float() / t): -inf gives 0, a row of
// only -inf gives NaN, NaN or +inf anywhere in a row makes the row NaN.
// No finite input overflows. The two-pass split exp(a) = m * 2^n has limits
// the three-pass control (which subtracts the max first) has not: for
// |x / t| above ~5e6 results are approximate (a single dominant element still
// gets exactly 1), and above ~2.36e38, where a * log2(e) leaves the float
// range, values compare equal.
#pragma once

#include <cfloat>
#include <cstdint>
#include <string>
#include <vector>

namespace forkdec::cpu {

// ---- instruction sets -------------------------------------------------------

enum class Isa { scalar, avx2, avx512 };

const char* isa_name(Isa isa);
// Parses "scalar", "avx2" or "avx512"; false for any other name.
bool parse_isa(const std::string& name, Isa* isa);
// The paths this build and CPU can run, scalar first, best last.
std::vector<Isa> available_isas();
// The path the kernels use. On first use: FORKDEC_CPU_ISA if it names an
// available path, else the best available one.
Isa current_isa();
// Forces a path; throws std::invalid_argument if it is not available.
void set_isa(Isa isa);

// ---- element types ------------------------------------------------------------

enum class DType { f32, f16, bf16 };

// ---- two-pass pieces ------------------------------------------------------------

// A sum of exponentials as mantissa * 2^exponent (exponent an integer-valued float).
struct ExpSum {
  float mantissa = 0.0f;
  float exponent = -FLT_MAX;  // not -inf: -inf - -inf would be NaN when merging
};

// The sum of two ExpSums (NaN stays NaN).
ExpSum merge(ExpSum a, ExpSum b);

// Pass 1 over x[0..n) of one row: the sum of exp(x_i / temperature).
ExpSum softmax_exp_sum(const void* x, DType dtype, int64_t n, float temperature);

// Pass 2 over x[0..n): y_i = exp(x_i / temperature) / total, where total is the
// merged pass-1 sum of the whole row. A total that is NaN, zero or has an
// infinite exponent (NaN or +inf in the row, or only -inf) gives NaN.
// stream: non-temporal stores, for outputs far larger than the caches.
void softmax_scale(const void* x, DType dtype, int64_t n, float temperature, ExpSum total,
                   float* y, bool stream);

// ---- three-pass pieces (the control) ----------------------------------------------

// Pass 1: max of x_i / temperature over x[0..n) (NaN ignored: pass 2 catches it).
float three_pass_max(const void* x, DType dtype, int64_t n, float temperature);
// Pass 2: sum of exp(x_i / temperature - max); max is the whole row's.
float three_pass_exp_sum(const void* x, DType dtype, int64_t n, float temperature, float max);
// Pass 3: y_i = exp(x_i / temperature - max) / sum.
void three_pass_scale(const void* x, DType dtype, int64_t n, float temperature, float max,
                      float sum, float* y, bool stream);

// ---- whole rows ---------------------------------------------------------------------

// rows x cols elements, row r at x + r * row_stride elements with unit stride
// inside a row; y is contiguous [rows, cols]. row_temperature (rows values)
// replaces temperature when not null.
void softmax(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride,
             float temperature, const float* row_temperature, float* y, bool stream = false);
void softmax_three_pass(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride,
                        float temperature, const float* row_temperature, float* y,
                        bool stream = false);

}  // namespace forkdec::cpu
