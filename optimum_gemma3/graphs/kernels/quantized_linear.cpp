// optimum_gemma3::quantized_linear(x, q8, scales) ~ x @ (scales * q8).T for a few rows: the
// product of a weight-only int8 copy that `quantize_rows` makes (one scale per weight row).
//
// Why: the self-draft (a low-bit copy of the model proposing tokens for speculative
// decoding) only has to guess the next tokens, and on these CPUs a decode step's time is
// the bytes of weights it reads: an int8 copy is half of bf16's bytes. The product is the
// head screen's (screen_products.h): each row of x as int16 levels times the int8 rows,
// summed exactly in int32 (`vpdpwssd` with AVX-512 VNNI where the CPU has it, `vpmaddwd`
// on AVX2 otherwise, chosen at run time), scaled in fp32, then rounded to x's dtype. The
// sums are exact, so both paths give the same numbers. Nothing checks the result against
// the real weights: the target model verifies every drafted token.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "linear_shapes.h"
#include "row_products.h"
#include "screen_products.h"

namespace {

using namespace optimum_gemma3;

static_assert(kMaxRows <= 8, "level_products takes 1 to 8 rows");

// x's dtype and the int8 copy's, once the caller has checked x's shape against q8 [N, K]
// (computing the output's sizes does).
void check_inputs(const at::Tensor& x, const at::Tensor& q8, const at::Tensor& scales) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantized_linear: float32 or bfloat16 x expected, got ", x.scalar_type());
  check_int8_copy("quantized_linear", q8, scales, q8.size(0), q8.size(1));
}

// Rows [m0, m0 + M) of the output (dtype O, [rows, N]) from their fp32 inputs xf.
template <typename O>
void multiply_block(const float* xf, int64_t M, const int8_t* q8, const float* scales, int64_t N,
                    int64_t K, O* out) {
  const int64_t levels_per_row = x_levels(K);
  std::vector<int16_t> levels(M * K);
  std::vector<float> steps(M);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xf + m * K;
    const float top = largest_magnitude(row, K);
    // A row that is not finite drafts from zeros: its tokens are guesses the target checks.
    steps[m] = quantize_input_row(row, K, levels_per_row, std::isfinite(top) ? top : 0.0f,
                                  &levels[m * K]);
  }
  // level_products writes [N, M] (a weight row's outputs side by side); out is [M, N].
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(M * N)) scratch.resize(M * N);
  float* products_out = scratch.data();
  const LevelProducts products{has_vnni(), levels.data(), q8, K, steps.data(), scales, products_out};
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    level_products(M, products, n0, n1);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) out[m * N + n] = static_cast<O>(products_out[n * M + m]);
  });
}

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& q8,
                                const at::Tensor& scales) {
  const auto sizes = linear_output_sizes("quantized_linear", x, q8);
  check_inputs(x, q8, scales);
  const int64_t N = q8.size(0), K = q8.size(1);
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const at::Tensor q = q8.contiguous(), s = scales.contiguous();
  const int64_t total = rows.size(0);
  std::vector<float> widened;
  const float* xf = fp32_rows(rows, widened);
  at::Tensor out = at::empty({total, N}, x.options());
  for (int64_t m0 = 0; m0 < total; m0 += kMaxRows) {
    const int64_t M = std::min(kMaxRows, total - m0);
    if (x.scalar_type() == at::kFloat)
      multiply_block(xf + m0 * K, M, q.data_ptr<int8_t>(), s.data_ptr<float>(), N, K,
                     out.data_ptr<float>() + m0 * N);
    else
      multiply_block(xf + m0 * K, M, q.data_ptr<int8_t>(), s.data_ptr<float>(), N, K,
                     out.data_ptr<c10::BFloat16>() + m0 * N);
  }
  return out.view(sizes);
}

at::Tensor quantized_linear_meta(const at::Tensor& x, const at::Tensor& q8,
                                 const at::Tensor& scales) {
  const auto sizes = linear_output_sym_sizes("quantized_linear", x, q8);
  check_inputs(x, q8, scales);
  return at::empty_symint(sizes, x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_gemma3, m) {
  m.def("quantized_linear(Tensor x, Tensor q8, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_gemma3, CPU, m) { m.impl("quantized_linear", quantized_linear_cpu); }

TORCH_LIBRARY_IMPL(optimum_gemma3, Meta, m) { m.impl("quantized_linear", quantized_linear_meta); }
