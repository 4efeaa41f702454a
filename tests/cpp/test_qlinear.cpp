// Unit test of the torch-free quantized linear kernels (csrc/cpu/qlinear.h) on
// every instruction set this CPU has. Weights are random codes, scales and
// offsets in the packed layout; the expected product is computed in double
// from the layout's definition. Activations that int8 represents exactly
// (integers with a block maximum of 127) must give the exact product to fp32
// accumulation error; random activations must stay within the bound of their
// rounding, sum_b d_b / 2 * sum |w_b|. Widths of 1 to 20 blocks, output
// features filling a tile of 16, part of one, and several; the tiles are split
// into ranges as threads would. Exits non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu/qlinear.h"

namespace fc = forkdec::cpu;

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok && ++g_failures <= 30) std::printf("FAIL: %s\n", what.c_str());
}

struct Packed {
  std::vector<uint8_t> codes;
  std::vector<fc::Half> scale, offset;
  fc::QWeightView view;
};

// Value of weight (j, e) from the tiled layout (qlinear.h).
double weight_at(const Packed& p, int64_t j, int64_t e) {
  const fc::QWeightView& w = p.view;
  const int64_t nb = w.k / 32, tile = j / 16, f = j % 16, b = e / 32, i = e % 32;
  const int64_t block = tile * nb + b;
  int code;
  if (w.bits == 4) {
    const uint8_t byte = p.codes[block * 256 + (i % 16) / 4 * 64 + f * 4 + i % 4];
    code = i < 16 ? (byte & 15) : (byte >> 4);
  } else {
    code = p.codes[block * 512 + i / 4 * 64 + f * 4 + i % 4];
  }
  return double(code) * fc::to_float(p.scale[block * 16 + f]) + fc::to_float(p.offset[block * 16 + f]);
}

Packed make_weight(std::mt19937& rng, int bits, int64_t n, int64_t k) {
  Packed p;
  const int64_t tiles = fc::qlinear_tiles(n), nb = k / 32;
  p.codes.resize(tiles * nb * 16 * 32 * bits / 8);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& c : p.codes) c = static_cast<uint8_t>(byte(rng));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  p.scale.resize(tiles * nb * 16);
  p.offset.resize(tiles * nb * 16);
  for (size_t i = 0; i < p.scale.size(); ++i) {
    const float d = 0.01f * (1.5f + u(rng));
    p.scale[i] = fc::to_half(d);
    p.offset[i] = fc::to_half(bits == 8 ? -128.0f * fc::to_float(p.scale[i]) : 0.1f * u(rng));
  }
  p.view = {p.codes.data(), p.scale.data(), p.offset.data(), bits, n, k};
  return p;
}

void run_case(std::mt19937& rng, const std::string& isa, int bits, int64_t m, int64_t n, int64_t k, bool exact) {
  Packed w = make_weight(rng, bits, n, k);
  std::vector<float> x(m * k);
  if (exact) {
    std::uniform_int_distribution<int> q(-127, 127);
    for (auto& v : x) v = static_cast<float>(q(rng));
    for (int64_t b = 0; b < m * k / 32; ++b) x[b * 32 + b % 32] = (b % 2) ? 127.0f : -127.0f;
  } else {
    std::normal_distribution<float> g(0.0f, 2.0f);
    for (auto& v : x) v = g(rng);
  }
  std::vector<float> bias(n);
  for (int64_t j = 0; j < n; ++j) bias[j] = 0.25f * static_cast<float>(j % 3);
  std::vector<uint8_t> scratch(fc::qlinear_scratch_bytes(m, k));
  fc::qlinear_quantize_rows(x.data(), fc::DType::f32, k, k, 0, m, m, scratch.data());
  std::vector<float> out(m * n, -1e30f);
  for (int64_t t0 = 0; t0 < fc::qlinear_tiles(n); t0 += 2) {  // ranges of tiles, as threads take them
    fc::qlinear_tile_range(w.view, scratch.data(), m, t0, t0 + 2, bias.data(), out.data(), fc::DType::f32, n);
  }
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      double want = bias[j], bound = 0, mag = 0;
      for (int64_t b = 0; b < k / 32; ++b) {
        double amax = 0, wsum = 0;
        for (int64_t e = b * 32; e < b * 32 + 32; ++e) {
          const double wv = weight_at(w, j, e);
          want += wv * x[r * k + e];
          mag += std::abs(wv * x[r * k + e]);
          amax = std::max(amax, double(std::abs(x[r * k + e])));
          wsum += std::abs(wv);
        }
        bound += amax / 127.0 / 2.0 * wsum;
      }
      const double got = out[r * n + j];
      const double tol = (exact ? 0.0 : bound) + 1e-5 * mag + 1e-6;
      char what[160];
      std::snprintf(what, sizeof what, "%s bits=%d m=%lld n=%lld k=%lld %s: out[%lld,%lld]=%g want %g (tol %g)",
                    isa.c_str(), bits, (long long)m, (long long)n, (long long)k, exact ? "exact" : "random",
                    (long long)r, (long long)j, got, want, tol);
      check(std::abs(got - want) <= tol, what);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(18);
  std::vector<std::pair<fc::Isa, bool>> paths;  // (instruction set, VNNI allowed)
  for (fc::Isa isa : fc::available_isas()) {
    paths.push_back({isa, true});
    if (isa == fc::Isa::avx512) paths.push_back({isa, false});
  }
  for (auto [isa, vnni] : paths) {
    fc::set_isa(isa);
    fc::qlinear_allow_vnni(vnni);
    const std::string name = std::string(fc::isa_name(isa)) + (vnni ? "" : "-novnni");
    for (int bits : {4, 8}) {
      for (int64_t k : {32, 64, 96, 160, 576, 640}) {
        for (int64_t m : {1, 2, 3, 4, 7, 8, 9, 17}) {
          run_case(rng, name, bits, m, 7, k, true);
          run_case(rng, name, bits, m, 16, k, true);
          run_case(rng, name, bits, m, 37, k, false);
        }
      }
    }
    std::printf("%s: vnni=%d\n", name.c_str(), int(fc::qlinear_uses_vnni()));
  }
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("test_qlinear: all passed\n");
  return 0;
}
