// optimum_gemma3::skinny_linear(x, weight) = x @ weight.T for a few rows of x (decode).
//
// Decode multiplies 1-8 rows by every weight matrix, so a step is bound by how fast the
// weights stream from memory. BLAS GEMMs are built for many rows: on our AVX2 hosts MKL's
// sgemm streams the fp32 head at ~8 GB/s, oneDNN at ~17 GB/s for one row but ~7 GB/s for
// four, and bf16 has no fast path at all without AVX512-BF16. This kernel reads each
// weight row once, in order, and multiplies it with every input row while it is in
// registers, which keeps one sequential stream per thread at any row count.
//
// Numerics: products and sums in fp32 (bf16 weights widen exactly), the output rounded
// once to the input dtype (round-to-nearest-even for bf16), the same contract as a bf16
// GEMM with fp32 accumulation. Only the summation order differs from BLAS.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "linear_shapes.h"
#include "vector.h"

namespace {

using namespace optimum_gemma3;

constexpr int64_t kMaxRows = 8;  // input rows multiplied per pass over the weight

// out[m, n] = sum_k x[m, k] * w[n, k] for weight rows [n0, n1), M input rows of length K.
// U independent accumulators per input row hide the FMA latency; M * U stays <= 8 registers.
template <int M, int U, typename W>
void multiply_rows(const float* x, const W* w, float* out, int64_t n0, int64_t n1, int64_t K,
                   int64_t N) {
  constexpr int64_t step = kLanes * U;
  const int64_t k_blocks = K / step * step;
  const int64_t k_lanes = K / kLanes * kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    __m256 acc[M][U];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
      _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_blocks; k += step) {
      _Pragma("GCC unroll 8") for (int u = 0; u < U; ++u) {
        const __m256 wv = load_fp32(row + k + kLanes * u);
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m][u] =
            _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + kLanes * u), acc[m][u]);
      }
    }
    for (int64_t k = k_blocks; k < k_lanes; k += kLanes) {
      const __m256 wv = load_fp32(row + k);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m][0] =
          _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
      __m256 sum = acc[m][0];
      _Pragma("GCC unroll 8") for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][u]);
      float total = horizontal_sum(sum);
      for (int64_t k = k_lanes; k < K; ++k) total += x[m * K + k] * static_cast<float>(row[k]);
      out[m * N + n] = total;
    }
  }
}

template <typename W>
void multiply(int64_t M, const float* x, const W* w, float* out, int64_t n0, int64_t n1,
              int64_t K, int64_t N) {
  switch (M) {
    case 1: return multiply_rows<1, 4>(x, w, out, n0, n1, K, N);
    case 2: return multiply_rows<2, 4>(x, w, out, n0, n1, K, N);
    case 3: return multiply_rows<3, 2>(x, w, out, n0, n1, K, N);
    case 4: return multiply_rows<4, 2>(x, w, out, n0, n1, K, N);
    case 5: return multiply_rows<5, 1>(x, w, out, n0, n1, K, N);
    case 6: return multiply_rows<6, 1>(x, w, out, n0, n1, K, N);
    case 7: return multiply_rows<7, 1>(x, w, out, n0, n1, K, N);
    default: return multiply_rows<8, 1>(x, w, out, n0, n1, K, N);
  }
}

std::vector<int64_t> output_sizes(const at::Tensor& x, const at::Tensor& weight) {
  std::vector<int64_t> sizes = linear_output_sizes("skinny_linear", x, weight);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(),
              "skinny_linear: x and weight dtypes differ: ", x.scalar_type(), " vs ",
              weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "skinny_linear: float32 or bfloat16 expected, got ", x.scalar_type());
  return sizes;
}

// The input rows in fp32: the tensor's own data for fp32, a widened copy for bf16. Done
// here rather than with two dispatched `Tensor::to` conversions per call: 3-4 us less per
// bf16 product (90 small products: 3.73 -> 3.45 ms), about 1% of a bf16 decode step.
const float* fp32_rows(const at::Tensor& rows, std::vector<float>& widened) {
  if (rows.scalar_type() == at::kFloat) return rows.data_ptr<float>();
  const c10::BFloat16* src = rows.data_ptr<c10::BFloat16>();
  widened.assign(src, src + rows.numel());
  return widened.data();
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  const auto sizes = output_sizes(x, weight);
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor w = weight.contiguous();
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t total_rows = rows.size(0);
  std::vector<float> widened;
  const float* x_fp32 = fp32_rows(rows, widened);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({total_rows, N}, x.options());
  // bf16 output: fp32 sums here, each rounded once (to nearest even) at the end.
  std::vector<float> sums(bf16 ? total_rows * N : 0);
  float* out_fp32 = bf16 ? sums.data() : out.data_ptr<float>();
  // About 64 KiB of weights per task: enough to amortize scheduling, fine enough to
  // split the smallest projection over every thread.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (K * w.element_size()));
  for (int64_t r0 = 0; r0 < total_rows; r0 += kMaxRows) {
    const int64_t M = std::min(kMaxRows, total_rows - r0);
    const float* xp = x_fp32 + r0 * K;
    float* op = out_fp32 + r0 * N;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (w.scalar_type() == at::kFloat)
        multiply(M, xp, w.data_ptr<float>(), op, n0, n1, K, N);
      else
        multiply(M, xp, w.data_ptr<c10::BFloat16>(), op, n0, n1, K, N);
    });
  }
  if (bf16) std::copy(sums.begin(), sums.end(), out.data_ptr<c10::BFloat16>());
  return out.view(sizes);
}

at::Tensor skinny_linear_meta(const at::Tensor& x, const at::Tensor& weight) {
  return at::empty(output_sizes(x, weight), x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_gemma3, m) { m.def("skinny_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(optimum_gemma3, CPU, m) { m.impl("skinny_linear", skinny_linear_cpu); }

TORCH_LIBRARY_IMPL(optimum_gemma3, Meta, m) { m.impl("skinny_linear", skinny_linear_meta); }
