// Unit test of the torch-free softmax kernels (csrc/cpu/softmax.h): every
// available instruction set, both algorithms, fp32/fp16/bf16 inputs, against a
// long double reference of softmax(float(x) / t). Exits non-zero on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/softmax.h"

namespace fc = forkdec::cpu;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

int g_failures = 0;
double g_worst_relative_error[2] = {0, 0};  // per algorithm, over outputs above 1e-30

void fail(const std::string& what) {
  if (++g_failures <= 30) std::printf("FAIL: %s\n", what.c_str());
}

// ---- inputs in three element types ---------------------------------------------

// A row stored as the kernel reads it, plus the float value of every element.
struct Row {
  fc::DType dtype;
  std::vector<uint16_t> half_bits;  // fp16 / bf16 storage
  std::vector<float> f32;           // fp32 storage
  std::vector<float> values;        // what each element means
  const void* data() const { return dtype == fc::DType::f32 ? static_cast<const void*>(f32.data()) : half_bits.data(); }
  int64_t size() const { return static_cast<int64_t>(values.size()); }
};

uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

float half_to_float(uint16_t h) {
  const int exponent = (h >> 10) & 31, mantissa = h & 1023;
  float v = exponent == 31 ? (mantissa ? kNaN : kInf)
            : exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -24)
                            : std::ldexp(static_cast<float>(1024 + mantissa), exponent - 25);
  return (h & 0x8000) ? -v : v;
}

// Nearest fp16 (ties away; fine for test data), saturating to +-inf.
uint16_t float_to_half(float f) {
  const uint16_t sign = (float_bits(f) >> 16) & 0x8000;
  const float a = std::fabs(f);
  if (std::isnan(f)) return 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const int exponent = std::max(e - 1, -14);
  const long units = std::lround(std::ldexp(a, 10 - exponent));  // a in units of the ulp
  if (exponent == -14 && units < 1024) return sign | static_cast<uint16_t>(units);
  return sign | static_cast<uint16_t>(((exponent + 15) << 10) + (units - 1024));
}

uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t b = float_bits(f);
  return static_cast<uint16_t>((b + 0x7fff + ((b >> 16) & 1)) >> 16);  // nearest even
}

Row make_row(fc::DType dtype, const std::vector<float>& wanted) {
  Row row{dtype, {}, {}, {}};
  for (float v : wanted) {
    if (dtype == fc::DType::f32) {
      row.f32.push_back(v);
      row.values.push_back(v);
    } else if (dtype == fc::DType::f16) {
      row.half_bits.push_back(float_to_half(v));
      row.values.push_back(half_to_float(row.half_bits.back()));
    } else {
      row.half_bits.push_back(float_to_bf16(v));
      row.values.push_back(from_bits(uint32_t{row.half_bits.back()} << 16));
    }
  }
  return row;
}

// ---- reference and comparison ------------------------------------------------------

// softmax(float(v) / t) in long double, with torch.softmax's special values.
std::vector<double> reference(const std::vector<float>& values, float t) {
  std::vector<long double> a;
  bool poisoned = false;
  long double top = -INFINITY;
  for (float v : values) {
    const float scaled = v / t;  // rounded to float, like torch and the kernels
    poisoned |= std::isnan(scaled) || scaled == kInf;
    a.push_back(scaled);
    top = std::max(top, a.back());
  }
  std::vector<double> y(values.size(), NAN);
  if (poisoned || top == -INFINITY) return y;
  long double sum = 0;
  for (long double v : a) sum += std::exp(v - top);
  for (size_t i = 0; i < a.size(); ++i) y[i] = static_cast<double>(std::exp(a[i] - top) / sum);
  return y;
}

enum class Algorithm { two_pass, three_pass };

// Relative tolerances. The two-pass error does not grow with the inputs; the
// three-pass one rounds a - max to float first (as torch.softmax does), which
// costs up to |a - max| * 2^-24 relative, |a - max| < 104 for non-zero outputs.
double tolerance(Algorithm a) { return a == Algorithm::two_pass ? 2e-6 : 1e-5; }

// |y - ref| <= rtol |ref| + atol (atol at the subnormal scale), NaN where ref is NaN.
void compare(const float* y, const std::vector<double>& ref, const std::string& what, Algorithm algorithm,
             double atol = 3e-45) {
  const double rtol = tolerance(algorithm);
  for (size_t i = 0; i < ref.size(); ++i) {
    const bool ok = std::isnan(ref[i]) ? std::isnan(y[i]) : std::fabs(y[i] - ref[i]) <= rtol * ref[i] + atol;
    if (!std::isnan(ref[i]) && ref[i] > 1e-30) {
      double& worst = g_worst_relative_error[static_cast<int>(algorithm)];
      worst = std::max(worst, std::fabs(y[i] - ref[i]) / ref[i]);
    }
    if (!ok) {
      char text[200];
      std::snprintf(text, sizeof text, "%s: y[%zu] = %.9g, expected %.9g", what.c_str(), i, y[i], ref[i]);
      fail(text);
      return;
    }
  }
}

// ---- the kernels under test, one row at a time -----------------------------------

const char* name(Algorithm a) { return a == Algorithm::two_pass ? "two-pass" : "three-pass"; }
const char* name(fc::DType d) { return d == fc::DType::f32 ? "fp32" : d == fc::DType::f16 ? "fp16" : "bf16"; }

std::vector<float> run_rows(Algorithm algorithm, const Row& row, float t, bool stream) {
  std::vector<float> y(row.values.size() + 1, -1.0f);  // +1: y + 1 is misaligned for the streaming head
  float* out = y.data() + 1;
  if (algorithm == Algorithm::two_pass) {
    fc::softmax(row.data(), row.dtype, 1, row.size(), row.size(), t, nullptr, out, stream);
  } else {
    fc::softmax_three_pass(row.data(), row.dtype, 1, row.size(), row.size(), t, nullptr, out, stream);
  }
  return std::vector<float>(out, out + row.size());
}

// The same row cut into `pieces` runs with merged statistics, as a caller
// splitting one row across threads does.
std::vector<float> run_pieces(Algorithm algorithm, const Row& row, float t, int pieces) {
  const int64_t n = row.size(), esize = row.dtype == fc::DType::f32 ? 4 : 2;
  std::vector<int64_t> begin;  // piece p is [begin[p], begin[p + 1])
  for (int p = 0; p <= pieces; ++p) begin.push_back(n * p / pieces);
  auto x = [&](int p) { return static_cast<const char*>(row.data()) + begin[p] * esize; };
  auto size = [&](int p) { return begin[p + 1] - begin[p]; };
  std::vector<float> y(n);
  if (algorithm == Algorithm::two_pass) {
    fc::ExpSum total;
    for (int p = 0; p < pieces; ++p) total = fc::merge(total, fc::softmax_exp_sum(x(p), row.dtype, size(p), t));
    for (int p = 0; p < pieces; ++p) {
      fc::softmax_scale(x(p), row.dtype, size(p), t, total, y.data() + begin[p], false);
    }
  } else {
    float max = -kInf, sum = 0;
    for (int p = 0; p < pieces; ++p) max = std::fmax(max, fc::three_pass_max(x(p), row.dtype, size(p), t));
    for (int p = 0; p < pieces; ++p) sum += fc::three_pass_exp_sum(x(p), row.dtype, size(p), t, max);
    for (int p = 0; p < pieces; ++p) {
      fc::three_pass_scale(x(p), row.dtype, size(p), t, max, sum, y.data() + begin[p], false);
    }
  }
  return y;
}

std::string label(const char* isa, Algorithm a, fc::DType d, const std::string& what) {
  return std::string(isa) + " " + name(a) + " " + name(d) + " " + what;
}

void check_row(const char* isa, Algorithm a, const Row& row, float t, const std::string& what) {
  const auto ref = reference(row.values, t);
  compare(run_rows(a, row, t, false).data(), ref, label(isa, a, row.dtype, what), a);
  compare(run_rows(a, row, t, true).data(), ref, label(isa, a, row.dtype, what + " (streamed)"), a);
  if (row.size() >= 6) compare(run_pieces(a, row, t, 3).data(), ref, label(isa, a, row.dtype, what + " (3 pieces)"), a);
}

// ---- test groups ------------------------------------------------------------------------

const fc::DType kDTypes[] = {fc::DType::f32, fc::DType::f16, fc::DType::bf16};
const Algorithm kAlgorithms[] = {Algorithm::two_pass, Algorithm::three_pass};

void test_random_rows(const char* isa) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 5.0f);
  for (int64_t n : {1, 3, 15, 17, 31, 33, 1000, 4097}) {
    std::vector<float> v(n);
    for (float& e : v) e = normal(rng);
    for (fc::DType d : kDTypes) {
      const Row row = make_row(d, v);
      for (Algorithm a : kAlgorithms) {
        for (float t : {1.0f, 0.7f, 3.0f}) {
          check_row(isa, a, row, t, "n=" + std::to_string(n) + " t=" + std::to_string(t));
        }
      }
    }
  }
}

void test_special_values(const char* isa) {
  struct Case { const char* what; std::vector<float> values; bool wide_range; };
  const std::vector<Case> cases = {
      {"[1e30,-1e30,0]", {1e30f, -1e30f, 0.0f}, true},
      {"[3.4e38,-3.4e38,3.4e38]", {3.4e38f, -3.4e38f, 3.4e38f}, true},
      {"[-1e30,-1e30,88]", {-1e30f, -1e30f, 88.0f}, true},
      {"[6e4,-6e4,0]", {60000.0f, -60000.0f, 0.0f}, false},
      {"-inf entries", {-kInf, 0.0f, 1.0f, -kInf, 2.0f, -kInf, -kInf, 0.5f, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf,
                        -kInf, -kInf, -kInf, 3.0f}, false},
      {"all -inf", std::vector<float>(37, -kInf), false},
      {"NaN", {0.0f, 1.0f, kNaN, 2.0f}, false},
      {"NaN late", [] { std::vector<float> v(100, 1.0f); v[99] = kNaN; return v; }(), false},
      {"+inf", {kInf, 0.0f, 1.0f}, false},
      {"+inf twice", {kInf, 0.0f, kInf, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f, 9.0f, 1.0f, 1.0f, 1.0f, 1.0f,
                      1.0f, 1.0f}, false},
      {"subnormal results", {0.0f, -90.0f, -100.0f, -103.0f, -103.9f, -104.0f, -120.0f, -1000.0f, 1e-40f}, false},
  };
  for (const Case& c : cases) {
    for (fc::DType d : kDTypes) {
      if (c.wide_range && d == fc::DType::f16) continue;  // beyond fp16's range
      const Row row = make_row(d, c.values);
      for (Algorithm a : kAlgorithms) check_row(isa, a, row, 1.0f, c.what);
    }
  }
}

void test_long_equal_row(const char* isa) {
  for (fc::DType d : {fc::DType::f32, fc::DType::bf16}) {
    const Row row = make_row(d, std::vector<float>(200000, 1e30f));
    for (Algorithm a : kAlgorithms) {
      const auto y = run_rows(a, row, 1.0f, false);
      double sum = 0;
      for (float v : y) sum += v;
      compare(y.data(), std::vector<double>(y.size(), 1.0 / 200000), label(isa, a, d, "200000 x 1e30"), a);
      if (std::fabs(sum - 1) > 1e-5) fail(label(isa, a, d, "200000 x 1e30 sums to " + std::to_string(sum)));
    }
  }
}

// Rows of a matrix with padding between them and a temperature per row.
void test_strided_rows_and_row_temperature(const char* isa) {
  const int64_t rows = 5, cols = 77, stride = 90;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> matrix(rows * stride);
  for (float& v : matrix) v = normal(rng);
  const std::vector<float> row_temperature = {0.1f, 0.5f, 1.0f, 2.0f, 7.5f};
  for (fc::DType d : kDTypes) {
    const Row all = make_row(d, matrix);
    for (Algorithm a : kAlgorithms) {
      std::vector<float> y(rows * cols);
      auto run = a == Algorithm::two_pass ? fc::softmax : fc::softmax_three_pass;
      run(all.data(), d, rows, cols, stride, 9.0f, row_temperature.data(), y.data(), false);
      for (int64_t r = 0; r < rows; ++r) {
        const std::vector<float> values(all.values.begin() + r * stride, all.values.begin() + r * stride + cols);
        compare(y.data() + r * cols, reference(values, row_temperature[r]),
                label(isa, a, d, "row_temperature row " + std::to_string(r)), a);
      }
    }
  }
}

void test_long_row_in_pieces(const char* isa) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 30.0f);
  std::vector<float> v(1000003);
  for (float& e : v) e = normal(rng);
  const Row row = make_row(fc::DType::f32, v);
  const auto ref = reference(row.values, 1.0f);
  for (Algorithm a : kAlgorithms) {
    compare(run_pieces(a, row, 1.0f, 7).data(), ref, label(isa, a, row.dtype, "1000003 in 7 pieces"), a);
  }
}

void test_merge() {
  const fc::ExpSum empty;
  const fc::ExpSum a{1.5f, 10.0f}, b{1.0f, 12.0f};
  const fc::ExpSum ab = fc::merge(a, b);
  if (ab.exponent != 12.0f || ab.mantissa != 1.375f) fail("merge of 1.5*2^10 and 1*2^12");
  const fc::ExpSum ea = fc::merge(empty, a);
  if (ea.exponent != a.exponent || ea.mantissa != a.mantissa) fail("merge with the empty sum");
  if (!std::isnan(fc::merge(a, fc::ExpSum{kNaN, kNaN}).mantissa)) fail("merge keeps NaN");
}

void test_isa_names() {
  fc::Isa isa;
  if (!fc::parse_isa("avx2", &isa) || isa != fc::Isa::avx2) fail("parse_isa(avx2)");
  if (fc::parse_isa("sse9", &isa)) fail("parse_isa accepts sse9");
  if (fc::available_isas().front() != fc::Isa::scalar) fail("scalar is not available first");
}

}  // namespace

int main() {
  test_merge();
  test_isa_names();
  for (fc::Isa isa : fc::available_isas()) {
    fc::set_isa(isa);
    const char* name = fc::isa_name(isa);
    test_random_rows(name);
    test_special_values(name);
    test_long_equal_row(name);
    test_strided_rows_and_row_temperature(name);
    test_long_row_in_pieces(name);
    std::printf("%s: done\n", name);
  }
  std::printf("worst relative error: two-pass %.3g, three-pass %.3g\n", g_worst_relative_error[0],
              g_worst_relative_error[1]);
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all softmax checks passed\n");
  return 0;
}
