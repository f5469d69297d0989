// optimum_gemma3::decode_attention(q, k, v, lengths, scale): one query token per row
// attending over the filled slots of its KV cache (decode).
//
// Why: in the graph, decode attention is a batched product over every cache slot, a
// mask, a softmax and a second product. That reads the whole cache even when few slots
// are filled (a full layer's cache is sequence_length long), and in bf16 on CPUs without
// bf16 matmul instructions it first copies both caches to fp32 every step (at batch 4
// on the 270M, more time than the attention itself). This kernel reads only the slots
// `[0, lengths[b])`, straight from the cache in its own dtype.
//
// Exactness: a decode query may see exactly the cache slots `s <= position` (see
// graphs/cache.py), i.e. the first `min(position + 1, length)` slots; the graph's
// masked slots weigh exactly 0 after its softmax, so leaving them out changes nothing.
// Scores, softmax and the weighted sum are fp32 (bf16 values widen exactly) and the
// output is rounded once to the input dtype: the graph's math up to summation order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vector.h"

namespace {

using namespace optimum_gemma3;

template <typename T>
float dot(const float* q, const T* k, int64_t D) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes)
    _Pragma("GCC unroll 4") for (int u = 0; u < 4; ++u) acc[u] =
        _mm256_fmadd_ps(_mm256_loadu_ps(q + d + kLanes * u), load_fp32(k + d + kLanes * u),
                        acc[u]);
  for (; d + kLanes <= D; d += kLanes)
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_fp32(k + d), acc[0]);
  float total = horizontal_sum(
      _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; d < D; ++d) total += q[d] * static_cast<float>(k[d]);
  return total;
}

// acc[0:D] += p * v[0:D]
template <typename T>
void add_scaled(float* acc, float p, const T* v, int64_t D) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load_fp32(v + d), _mm256_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
}

// One query head of one row over the first n cached keys and values ([n, D] each).
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t n, int64_t D, float scale,
            float* out) {
  std::vector<float> weights(n);
  float max_score = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    weights[j] = dot(q, k + j * D, D) * scale;
    max_score = std::max(max_score, weights[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    weights[j] = std::exp(weights[j] - max_score);
    sum += weights[j];
  }
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < n; ++j) add_scaled(out, weights[j] / sum, v + j * D, D);
}

// `attend` for a query and output in the cache's dtype: the query widens exactly, the
// output is rounded once (to nearest even for bf16), in the task rather than by two
// tensor conversions per call (36 per bf16 step of the 270M, ~0.4 ms).
template <typename T>
void attend_head(const T* q, const T* k, const T* v, int64_t n, int64_t D, float scale,
                 T* out) {
  std::vector<float> query(q, q + D), sums(D);
  attend(query.data(), k, v, n, D, scale, sums.data());
  std::copy(sums.begin(), sums.end(), out);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.sizes() == v.sizes() &&
                  k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "decode_attention: q [B, H, 1, D] and k, v [B, Hkv, L, D] with H a multiple of "
              "Hkv expected, got ",
              q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k and v dtypes differ: ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: float32 or bfloat16 expected, got ", q.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0) &&
                  at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false),
              "decode_attention: lengths [B] of integers expected, got ", lengths.sizes(), " ",
              lengths.scalar_type());
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& lengths, double scale) {
  check_inputs(q, k, v, lengths);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t kv_heads = k.size(1), L = k.size(2), group = H / kv_heads;
  const at::Tensor n_keys = lengths.to(at::kLong).contiguous();
  const int64_t* n = n_keys.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(n[b] >= 1 && n[b] <= L, "decode_attention: lengths[", b, "] = ", n[b],
                " is outside [1, ", L, "], the cache length");
  const at::Tensor queries = q.contiguous(), keys = k.contiguous(), values = v.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  // One task per (row, query head): heads of a group re-read their K/V from cache.
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, kv = (t % H) / group;
      const int64_t offset = (b * kv_heads + kv) * L * D;
      if (q.scalar_type() == at::kFloat)
        attend_head(queries.data_ptr<float>() + t * D, keys.data_ptr<float>() + offset,
                    values.data_ptr<float>() + offset, n[b], D, static_cast<float>(scale),
                    out.data_ptr<float>() + t * D);
      else
        attend_head(queries.data_ptr<c10::BFloat16>() + t * D,
                    keys.data_ptr<c10::BFloat16>() + offset,
                    values.data_ptr<c10::BFloat16>() + offset, n[b], D,
                    static_cast<float>(scale), out.data_ptr<c10::BFloat16>() + t * D);
    }
  });
  return out;
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lengths, double scale) {
  check_inputs(q, k, v, lengths);
  return at::empty(q.sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_gemma3, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_gemma3, CPU, m) { m.impl("decode_attention", decode_attention_cpu); }

TORCH_LIBRARY_IMPL(optimum_gemma3, Meta, m) {
  m.impl("decode_attention", decode_attention_meta);
}
