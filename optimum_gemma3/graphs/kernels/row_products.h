// Few-row products x @ w.T with fp32 sums, shared by skinny_linear and screened_linear.
//
// Both kernels must give a weight row the same sum for the same input row, bit for bit:
// screened_linear recomputes some of skinny_linear's outputs and promises equality. So
// the summation order lives here once: it depends on nothing but K, never on which weight
// rows a call covers or how many input rows it multiplies.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "linear_shapes.h"
#include "vector.h"

namespace optimum_gemma3 {

// Input rows multiplied per call of `multiply` (set from Python: kernels.MAX_ROWS).
constexpr int64_t kMaxRows = OPTIMUM_GEMMA3_MAX_ROWS;

// out[m, n] = sum_k x[m, k] * w[n, k] for weight rows [n0, n1), M input rows of length K.
// U independent accumulators per input row hide the FMA latency; M * U stays <= 12 registers.
template <int M, int U, typename W>
void multiply_rows(const float* x, const W* w, float* out, int64_t n0, int64_t n1, int64_t K,
                   int64_t N) {
  constexpr int64_t step = kLanes * U;
  const int64_t k_blocks = K / step * step;
  const int64_t k_lanes = K / kLanes * kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    if constexpr (!std::is_same_v<W, float>) prefetch_ahead(row, K * sizeof(W));
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

// Weight rows per block: a block stays in L1/L2 while each pair of input rows reads it, so
// the weights still stream from memory once per call.
constexpr int64_t kWeightBlock = 16;

// Every input row's sums have one order (U = 4 accumulators, combined in order), whatever
// M is: a row's outputs are bit for bit the same alone or among up to kMaxRows others
// (batch invariance: a request's tokens do not depend on who shares its batch). Rows go
// in threes, which share each weight load and widening (12 accumulators, the most the 16
// AVX2 registers hold beside the weights and inputs); the last one or two go together,
// with the same order. Past two rows the products are compute-bound: a verify call's 5
// rows of a bf16 weight took 1.41 ms in pairs (2 + 2 + 1), 3.5x one row's 0.40 ms.
template <typename W>
inline void multiply(int64_t M, const float* x, const W* w, float* out, int64_t n0,
                     int64_t n1, int64_t K, int64_t N) {
  for (int64_t nb = n0; nb < n1; nb += kWeightBlock) {
    const int64_t ne = std::min(nb + kWeightBlock, n1);
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) multiply_rows<3, 4>(x + m * K, w, out + m * N, nb, ne, K, N);
    if (M - m == 2) multiply_rows<2, 4>(x + m * K, w, out + m * N, nb, ne, K, N);
    if (M - m == 1) multiply_rows<1, 4>(x + m * K, w, out + m * N, nb, ne, K, N);
  }
}

// The input rows in fp32: the tensor's own data for fp32, a widened copy for bf16. Done
// here rather than with two dispatched `Tensor::to` conversions per call: 3-4 us less per
// bf16 product (90 small products: 3.73 -> 3.45 ms), about 1% of a bf16 decode step.
inline const float* fp32_rows(const at::Tensor& rows, std::vector<float>& widened) {
  if (rows.scalar_type() == at::kFloat) return rows.data_ptr<float>();
  const c10::BFloat16* src = rows.data_ptr<c10::BFloat16>();
  widened.assign(src, src + rows.numel());
  return widened.data();
}

// Sizes of `op(x [..., K], weight [N, K])` for fp32 or bf16 x and weight of one dtype.
inline std::vector<int64_t> few_row_output_sizes(const char* op, const at::Tensor& x,
                                                 const at::Tensor& weight) {
  std::vector<int64_t> sizes = linear_output_sizes(op, x, weight);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight dtypes differ: ",
              x.scalar_type(), " vs ", weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16 expected, got ", x.scalar_type());
  return sizes;
}

}  // namespace optimum_gemma3
