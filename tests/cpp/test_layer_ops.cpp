// Unit test of the torch-free fused layer kernels (csrc/cpu/layer_ops.h) on every
// instruction set this CPU has: fp32 results against double-precision formulas,
// row strides and tails (sizes that are not multiples of the vector width),
// bf16 outputs against the correctly rounded double result. Exits non-zero on
// failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/layer_ops.h"
#include "cpu/scalar_types.h"

namespace fc = forkdec::cpu;

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok && ++g_failures <= 30) std::printf("FAIL: %s\n", what.c_str());
}

bool close(double a, double b, double tol) { return std::abs(a - b) <= tol * (1 + std::abs(b)); }

std::vector<float> randn(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

void test_rms_norm(std::mt19937& rng, const std::string& isa) {
  for (int64_t h : {1, 7, 16, 33, 576}) {
    const int64_t rows = 5, stride = h + 3;
    auto x = randn(rng, rows * stride), r = randn(rng, rows * stride), w = randn(rng, h);
    std::vector<float> out(rows * h), sum(rows * h);
    fc::rms_norm_rows(x.data(), stride, r.data(), stride, w.data(), fc::DType::f32, fc::DType::f32, 0, rows, h,
                      1e-5f, out.data(), sum.data());
    for (int64_t i = 0; i < rows; ++i) {
      double squares = 0;
      for (int64_t j = 0; j < h; ++j) {
        const float s = x[i * stride + j] + r[i * stride + j];
        check(sum[i * h + j] == s, isa + " rms_norm sum h=" + std::to_string(h));
        squares += double(s) * s;
      }
      const double inv = 1 / std::sqrt(squares / h + 1e-5);
      for (int64_t j = 0; j < h; ++j) {
        const double want = double(x[i * stride + j] + r[i * stride + j]) * inv * w[j];
        check(close(out[i * h + j], want, 2e-6), isa + " rms_norm h=" + std::to_string(h));
      }
    }
  }
}

void test_rope(std::mt19937& rng, const std::string& isa) {
  for (int64_t d : {2, 38, 64, 128}) {
    const int64_t t = 3, hq = 3, hkv = 2, width = (hq + 2 * hkv) * d, half = d / 2;
    auto qkv = randn(rng, t * (width + 5));
    std::vector<float> cos(t * half), sin(t * half);
    for (int64_t i = 0; i < t * half; ++i) {
      cos[i] = std::cos(0.37f * i);
      sin[i] = std::sin(0.37f * i);
    }
    std::vector<float> q(t * hq * d), k(t * hkv * d), v(t * hkv * d);
    fc::rope_qkv_rows(qkv.data(), width + 5, cos.data(), sin.data(), fc::DType::f32, 0, t, hq, hkv, d, q.data(),
                      k.data(), v.data());
    for (int64_t row = 0; row < t; ++row) {
      for (int64_t head = 0; head < hq + hkv; ++head) {
        const float* x = qkv.data() + row * (width + 5) + head * d;
        const float* o = head < hq ? q.data() + (row * hq + head) * d : k.data() + (row * hkv + head - hq) * d;
        for (int64_t i = 0; i < half; ++i) {
          const double c = cos[row * half + i], s = sin[row * half + i];
          check(close(o[i], x[i] * c - x[i + half] * s, 1e-6), isa + " rope first half d=" + std::to_string(d));
          check(close(o[i + half], x[i + half] * c + x[i] * s, 1e-6), isa + " rope second half");
        }
      }
      check(std::memcmp(v.data() + row * hkv * d, qkv.data() + row * (width + 5) + (hq + hkv) * d,
                        sizeof(float) * hkv * d) == 0, isa + " rope v copy");
    }
  }
}

void test_silu_and_mul(std::mt19937& rng, const std::string& isa) {
  for (int64_t inter : {1, 15, 16, 1536}) {
    const int64_t rows = 3;
    auto x = randn(rng, rows * 2 * inter, 6.0f);
    x[0] = -200.0f;  // e^200 overflows: silu must come out (minus) zero, not NaN
    std::vector<float> out(rows * inter);
    fc::silu_and_mul_rows(x.data(), 2 * inter, fc::DType::f32, 0, rows, inter, out.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < inter; ++i) {
        const double a = x[r * 2 * inter + i], b = x[r * 2 * inter + inter + i];
        const double want = a / (1 + std::exp(-a)) * b;
        check(close(out[r * inter + i], want, 2e-6), isa + " silu_and_mul inter=" + std::to_string(inter));
      }
    }
  }
}

void test_bf16_rounding(std::mt19937& rng, const std::string& isa) {
  // Output rounded once from fp32 math: equal to rounding the double result except
  // where the two straddle a rounding boundary (rare), and never more than 1 ulp off.
  const int64_t inter = 1000;
  auto xf = randn(rng, 2 * inter, 3.0f);
  std::vector<fc::BFloat> x(2 * inter), out(inter);
  for (size_t i = 0; i < xf.size(); ++i) x[i] = fc::to_bf16(xf[i]);
  fc::silu_and_mul_rows(x.data(), 2 * inter, fc::DType::bf16, 0, 1, inter, out.data());
  int equal = 0;
  for (int64_t i = 0; i < inter; ++i) {
    const double a = fc::to_float(x[i]), b = fc::to_float(x[inter + i]);
    const fc::BFloat want = fc::to_bf16(static_cast<float>(a / (1 + std::exp(-a)) * b));
    equal += out[i].bits == want.bits;
    check(std::abs(int(out[i].bits) - int(want.bits)) <= 1, isa + " bf16 silu_and_mul within one ulp");
  }
  check(equal >= inter * 98 / 100, isa + " bf16 silu_and_mul mostly exact: " + std::to_string(equal));
}

}  // namespace

int main() {
  for (fc::Isa isa : fc::available_isas()) {
    fc::set_isa(isa);
    const std::string name = fc::isa_name(isa);
    std::mt19937 rng(7);
    test_rms_norm(rng, name);
    test_rope(rng, name);
    test_silu_and_mul(rng, name);
    test_bf16_rounding(rng, name);
  }
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("layer_ops: all passed\n");
  return 0;
}
