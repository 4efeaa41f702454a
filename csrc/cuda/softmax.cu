// Two-Pass Softmax on CUDA (Dukhan & Ablavatski, arXiv 2001.04438).
//
// exp(t) is kept as m * 2^n: n = round(t log2e) as a float, m = exp(t - n ln2).
// Pass 1 sums a row as such a pair (no running max of x, no overflow for any
// finite input); pass 2 recomputes (m, n) and writes (m / M) * 2^(n - N) for the
// row sum M * 2^N. One thread block per row.
#include "cuda/softmax.cuh"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>

namespace forkdec::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
// ln 2 = kLn2Hi + kLn2Lo (Cody-Waite); kLn2Hi is 0x3F317200, 15 significant bits.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.4286068202862268e-06f;
// |t - n ln2| <= ln2/2 + 45 for |t| < 2^30 (n carries the rounding of t log2e);
// beyond that fp32 n is too coarse and r is clamped so that m stays finite and
// positive (e^64 times any row length fits in fp32).
constexpr float kMaxReduced = 64.0f;
constexpr int kMaxThreads = 1024;

// A sum of exponentials, m * 2^n. The empty sum is {0, -FLT_MAX}: -FLT_MAX rather
// than -inf, so that exponent differences are never -inf - -inf = NaN.
struct Pair {
  float m;
  float n;
};

// exp(t) as a Pair: m finite and positive for every t but NaN (then NaN); n finite
// except for t = +-inf (n = +-inf: -inf weighs 2^-inf = 0, +inf makes the row NaN).
__device__ __forceinline__ Pair exp_split(float t) {
  float n = rintf(t * kLog2e);
  // |t| > FLT_MAX / log2e overflows t * log2e: keep such finite t finite.
  n = n > FLT_MAX ? FLT_MAX : (n < -FLT_MAX ? -FLT_MAX : n);
  float r = fmaf(-n, kLn2Hi, t);
  r = fmaf(-n, kLn2Lo, r);
  // Clamp by comparisons, which keep NaN (fminf/fmaxf would drop it).
  r = r > kMaxReduced ? kMaxReduced : (r < -kMaxReduced ? -kMaxReduced : r);
  return {expf(r), isfinite(t) ? n : t};
}

// a + b. fmaxf drops a NaN exponent, but a NaN exponent comes with a NaN mantissa,
// which the sum keeps. Exponent differences are <= 0 and may be as low as -inf:
// exp2f underflows them to 0 (where an ldexpf would need them as int).
__device__ __forceinline__ Pair add(Pair a, Pair b) {
  const float n = fmaxf(a.n, b.n);
  return {a.m * exp2f(a.n - n) + b.m * exp2f(b.n - n), n};
}

// The sum of exp(t[k]) over a chunk: one shared exponent, so the terms are
// independent (no serial chain through the accumulator).
template <int N>
__device__ __forceinline__ Pair chunk_sum(const float (&t)[N]) {
  Pair p[N];
  float n = -FLT_MAX;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    p[k] = exp_split(t[k]);
    n = fmaxf(n, p[k].n);
  }
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < N; ++k) m += p[k].m * exp2f(p[k].n - n);
  return {m, n};
}

// The sum of every thread's Pair, returned to all threads. blockDim.x is a multiple of 32.
__device__ Pair block_sum(Pair p, Pair* warp_sums, Pair* total) {
  constexpr unsigned kAll = 0xffffffffu;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    p = add(p, {__shfl_xor_sync(kAll, p.m, offset), __shfl_xor_sync(kAll, p.n, offset)});
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < int(blockDim.x / 32) ? warp_sums[lane] : Pair{0.0f, -FLT_MAX};
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      p = add(p, {__shfl_xor_sync(kAll, p.m, offset), __shfl_xor_sync(kAll, p.n, offset)});
    if (lane == 0) *total = p;
  }
  __syncthreads();
  const Pair sum = *total;
  __syncthreads();  // the shared slots are reused by the block's next row
  return sum;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// One 16-byte load of T, and the fp32 values it becomes.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));
template <typename T>
struct alignas(16) InVec {
  T v[kVec<T>];
};
template <typename T>
struct alignas(16) OutVec {
  float v[kVec<T>];
};

// kVectorized: every row of x and y starts 16-byte aligned (checked by the
// launcher), so the row is read in 16-byte chunks and the last cols % kVec<T>
// elements one by one; otherwise all elements one by one.
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_kernel(const T* __restrict__ x, int64_t row_stride, float* __restrict__ y, int64_t rows,
                   int64_t cols, float inv_temperature, const float* __restrict__ row_inv_temperature) {
  __shared__ Pair warp_sums[32];
  __shared__ Pair total;
  constexpr int V = kVec<T>;
  const int64_t vecs = kVectorized ? cols / V : 0;
  const int64_t tail = vecs * V;  // elements [tail, cols) are read one by one

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * row_stride;
    float* yr = y + row * cols;
    const float inv_t = row_inv_temperature != nullptr ? row_inv_temperature[row] : inv_temperature;
    const InVec<T>* xv = reinterpret_cast<const InVec<T>*>(xr);

    // Pass 1: each thread sums its elements as a Pair, then the block combines them.
    Pair acc{0.0f, -FLT_MAX};
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
      const InVec<T> in = xv[i];
      float t[V];
#pragma unroll
      for (int k = 0; k < V; ++k) t[k] = to_float(in.v[k]) * inv_t;
      acc = add(acc, chunk_sum(t));
    }
    for (int64_t i = tail + threadIdx.x; i < cols; i += blockDim.x) {
      const float t[1] = {to_float(xr[i]) * inv_t};
      acc = add(acc, chunk_sum(t));
    }
    const Pair sum = block_sum(acc, warp_sums, &total);
    // A row of only -inf has M = 0: inf * 2^-inf = NaN, as torch.
    const float inv_m = 1.0f / sum.m;

    // Pass 2, backwards: the end of the row was read last and is likeliest in L2.
    for (int64_t i = tail + threadIdx.x; i < cols; i += blockDim.x) {
      const Pair p = exp_split(to_float(xr[i]) * inv_t);
      yr[i] = p.m * inv_m * exp2f(p.n - sum.n);
    }
    for (int64_t i = vecs - 1 - threadIdx.x; i >= 0; i -= blockDim.x) {
      const InVec<T> in = xv[i];
      OutVec<T> out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const Pair p = exp_split(to_float(in.v[k]) * inv_t);
        out.v[k] = p.m * inv_m * exp2f(p.n - sum.n);
      }
      reinterpret_cast<OutVec<T>*>(yr)[i] = out;
    }
  }
}

}  // namespace

template <typename T>
void softmax(const T* x, int64_t row_stride, float* y, int64_t rows, int64_t cols, float inv_temperature,
             const float* row_inv_temperature, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  constexpr int V = kVec<T>;
  // About two 16-byte chunks per thread, whole warps, at most kMaxThreads.
  const int64_t wanted = (cols + 2 * V - 1) / (2 * V);
  const int threads = int(std::min<int64_t>(kMaxThreads, (std::max<int64_t>(wanted, 32) + 31) / 32 * 32));
  const unsigned blocks = unsigned(std::min<int64_t>(rows, INT_MAX));  // the kernel loops over the rest
  const auto misalign = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  const bool vectorized = misalign(x) == 0 && misalign(y) == 0 && cols % 4 == 0 &&
                          (rows == 1 || (row_stride * int64_t(sizeof(T))) % 16 == 0);
  if (vectorized)
    softmax_kernel<T, true><<<blocks, threads, 0, stream>>>(x, row_stride, y, rows, cols, inv_temperature,
                                                            row_inv_temperature);
  else
    softmax_kernel<T, false><<<blocks, threads, 0, stream>>>(x, row_stride, y, rows, cols, inv_temperature,
                                                             row_inv_temperature);
}

template void softmax<float>(const float*, int64_t, float*, int64_t, int64_t, float, const float*, cudaStream_t);
template void softmax<__half>(const __half*, int64_t, float*, int64_t, int64_t, float, const float*,
                              cudaStream_t);
template void softmax<__nv_bfloat16>(const __nv_bfloat16*, int64_t, float*, int64_t, int64_t, float,
                                     const float*, cudaStream_t);

}  // namespace forkdec::cuda
