// Fused decoder-layer elementwise kernels (see layer_ops.h): the kernels are
// compiled once per instruction set from layer_ops_kernels.h and chosen at run
// time by current_isa(), like the other CPU kernels.
#include "cpu/layer_ops.h"
#include "cpu/scalar_types.h"

#include <cmath>
#include <cstring>

#include "cpu/simd.h"

namespace forkdec::cpu {
namespace layer_ops {

constexpr float kLog2e = 1.44269504088896340736f;
// 2^r on [-1/2, 1/2], relative error 2.4e-7: far inside fp32 test tolerances.
constexpr float kExp2Poly[6] = {0x1.000002p+0f, 0x1.62e428p-1f, 0x1.ebf918p-3f,
                                0x1.c6b6e6p-5f, 0x1.3d0c54p-7f, 0x1.5c08d6p-10f};

}  // namespace layer_ops

#define FD_NS layer_ops_scalar
#define FD_TARGET
#define FD_ISA_SCALAR 1
namespace layer_ops_scalar { using namespace layer_ops; }
#include "cpu/layer_ops_kernels.h"
#undef FD_NS
#undef FD_TARGET
#undef FD_ISA_SCALAR

#if defined(__x86_64__)
#define FD_NS layer_ops_avx2
#define FD_TARGET __attribute__((target("avx2,fma,f16c")))
#define FD_ISA_AVX2 1
namespace layer_ops_avx2 { using namespace layer_ops; }
#include "cpu/layer_ops_kernels.h"
#undef FD_NS
#undef FD_TARGET
#undef FD_ISA_AVX2

#define FD_NS layer_ops_avx512
#define FD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FD_ISA_AVX512 1
namespace layer_ops_avx512 { using namespace layer_ops; }
#include "cpu/layer_ops_kernels.h"
#undef FD_NS
#undef FD_TARGET
#undef FD_ISA_AVX512
#endif

namespace {

// Calls f(T{}) with T the element type of dtype.
template <class F>
void with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f16:
      return f(Half{});
    case DType::bf16:
      return f(BFloat{});
    default:
      return f(float{});
  }
}

// Runs KERNEL from the namespace of the current instruction set.
#if defined(__x86_64__)
#define FD_DISPATCH(KERNEL, ...)                              \
  switch (current_isa()) {                                    \
    case Isa::avx512:                                         \
      return layer_ops_avx512::KERNEL(__VA_ARGS__);           \
    case Isa::avx2:                                           \
      return layer_ops_avx2::KERNEL(__VA_ARGS__);             \
    default:                                                  \
      return layer_ops_scalar::KERNEL(__VA_ARGS__);           \
  }
#else
#define FD_DISPATCH(KERNEL, ...) return layer_ops_scalar::KERNEL(__VA_ARGS__);
#endif

}  // namespace

void rms_norm_rows(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                   const void* weight, DType wdtype, DType dtype, int64_t begin, int64_t end, int64_t h,
                   float eps, void* out, void* sum) {
  with_type(dtype, [&](auto t) {
    using T = decltype(t);
    with_type(wdtype, [&](auto w) {
      using Wt = decltype(w);
      FD_DISPATCH(rms_norm, static_cast<const T*>(x), x_stride, static_cast<const T*>(residual), residual_stride,
                  static_cast<const Wt*>(weight), begin, end, h, eps, static_cast<T*>(out), static_cast<T*>(sum));
    });
  });
}

void rope_qkv_rows(const void* qkv, int64_t stride, const float* cos, const float* sin, DType dtype,
                   int64_t begin, int64_t end, int64_t hq, int64_t hkv, int64_t d, void* q, void* k, void* v) {
  with_type(dtype, [&](auto t) {
    using T = decltype(t);
    FD_DISPATCH(rope_qkv, static_cast<const T*>(qkv), stride, cos, sin, begin, end, hq, hkv, d, static_cast<T*>(q),
                static_cast<T*>(k), static_cast<T*>(v));
  });
}

void silu_and_mul_rows(const void* x, int64_t stride, DType dtype, int64_t begin, int64_t end, int64_t inter,
                       void* out) {
  with_type(dtype, [&](auto t) {
    using T = decltype(t);
    FD_DISPATCH(silu_and_mul, static_cast<const T*>(x), stride, begin, end, inter, static_cast<T*>(out));
  });
}

}  // namespace forkdec::cpu
