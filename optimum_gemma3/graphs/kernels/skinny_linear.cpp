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

#include "row_products.h"

namespace {

using namespace optimum_gemma3;

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  const auto sizes = few_row_output_sizes("skinny_linear", x, weight);
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
  return at::empty(few_row_output_sizes("skinny_linear", x, weight), x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_gemma3, m) { m.def("skinny_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(optimum_gemma3, CPU, m) { m.impl("skinny_linear", skinny_linear_cpu); }

TORCH_LIBRARY_IMPL(optimum_gemma3, Meta, m) { m.impl("skinny_linear", skinny_linear_meta); }
