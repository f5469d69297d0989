// optimum_gemma3::dense(x, weight) = x @ weight.T in fp32 for many rows (prefill), by oneDNN.
//
// Prefill products are compute-bound, and oneDNN's inner product is the fastest GEMM this
// package found for them on AVX2 hosts (MKL's sgemm, what F.linear and Inductor's extern
// mm call, is 10-30% slower on the MLP shapes; a hand-written 6x16 AVX2 GEMM tied it).
// Inductor lowers oneDNN linears only for constant (frozen) weights, and the programs'
// weights are inputs, so programs call this op instead. It is C++ so that a compiled
// program runs without re-entering Python: a Python custom op cost ~70 us and the GIL
// per product.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "linear_shapes.h"

namespace {

void check_dtypes(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "dense: float32 x and weight expected, got ", x.scalar_type(), " and ",
              weight.scalar_type());
}

at::Tensor dense_cpu(const at::Tensor& x, const at::Tensor& weight) {
  static const auto onednn_linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  check_dtypes(x, weight);
  const auto sizes = optimum_gemma3::linear_output_sizes("dense", x, weight);
  const at::Tensor rows = x.reshape({-1, x.size(-1)}).contiguous();
  return onednn_linear
      .call(rows, weight.contiguous(), std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
            "")
      .view(sizes);
}

at::Tensor dense_meta(const at::Tensor& x, const at::Tensor& weight) {
  check_dtypes(x, weight);
  return at::empty_symint(optimum_gemma3::linear_output_sym_sizes("dense", x, weight), x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_gemma3, m) { m.def("dense(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(optimum_gemma3, CPU, m) { m.impl("dense", dense_cpu); }

TORCH_LIBRARY_IMPL(optimum_gemma3, Meta, m) { m.impl("dense", dense_meta); }
