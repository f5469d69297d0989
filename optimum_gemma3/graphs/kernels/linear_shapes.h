// The shape contract shared by this package's product kernels (skinny_linear, screened_linear,
// dense).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace optimum_gemma3 {

// Sizes of `op(x [..., K], weight [N, K])`: x's sizes with the last one N. Checks the shapes.
inline std::vector<int64_t> linear_output_sizes(const char* op, const at::Tensor& x,
                                                const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), op,
              ": x [..., K] and weight [N, K] expected, got ", x.sizes(), " and ",
              weight.sizes());
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return sizes;
}

}  // namespace optimum_gemma3
