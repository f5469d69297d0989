// The shape contract shared by this package's product kernels (skinny_linear, screened_linear,
// dense).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <vector>

namespace optimum_gemma3 {

// Sizes of `op(x [..., K], weight [N, K])`: x's sizes with the last one N. Checks the shapes.
// Symbolic, for meta kernels: a graph traced with a dynamic prompt length keeps the rows
// dynamic (concrete sizes would specialize them to the example's). K is never dynamic.
inline std::vector<c10::SymInt> linear_output_sym_sizes(const char* op, const at::Tensor& x,
                                                        const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.sym_size(-1) == weight.sym_size(1), op,
              ": x [..., K] and weight [N, K] expected, got ", x.sym_sizes(), " and ",
              weight.sym_sizes());
  std::vector<c10::SymInt> sizes = x.sym_sizes().vec();
  sizes.back() = weight.sym_size(0);
  return sizes;
}

// The same sizes as integers, for kernels running on real tensors.
inline std::vector<int64_t> linear_output_sizes(const char* op, const at::Tensor& x,
                                                const at::Tensor& weight) {
  std::vector<int64_t> sizes;
  for (const c10::SymInt& size : linear_output_sym_sizes(op, x, weight)) {
    sizes.push_back(size.expect_int());
  }
  return sizes;
}

}  // namespace optimum_gemma3
