// optimum_gemma3::screened_linear(x, weight, q8, scales, k): the entries of x @ weight.T
// that can be among a row's k largest, exact, for a few rows of x; and
// optimum_gemma3::quantize_rows, which makes the int8 copy (q8, scales) it screens with.
//
// Why: a greedy decode step needs only the argmax of 262144 logits, and a top-k sampling
// step only the k largest (transformers samples with top_k=50 unless told otherwise), yet
// computing them all reads the whole vocabulary head, 671 MB in fp32 (63% of the 270M's
// weights) or 335 MB in bf16. An int8 copy of the head is 168 MB. Its products bound every
// logit within a known radius; only the tokens whose bound reaches the k-th best exact
// logit are computed from the real weight (on the real 270M, a median of 3 tokens for
// k = 1, 188 for k = 50). The result is exact, not an approximation: every returned value
// is bit-identical to skinny_linear's, and every other token is provably below the row's
// `floor`, which at least k returned values reach.
//
// The bound, for input row x (l1 = sum |x_k|) and weight row w with scale s = max|w| / 127
// and q = round(w / s), |q| <= 127; x's step t = max|x| / L and levels p = round(x / t),
// |p| <= L (screen_products.h: L keeps every int32 sum p.q exact); the screened logit is
// a = fl(fl(p.q) t) s. In real arithmetic unless said:
//   |x.w - s (x.q)| = |sum_k x_k (w_k - s q_k)| <= l1 s (1/2 + 128 u)  (128 u: w/s rounding)
//   |x.q - t (p.q)| = |sum_k (x_k - t p_k) q_k| <= 127 K t (1/2 + 2 u L)  (2 u L: x/t's)
//   a within 3 u of s t (p.q), whose size is <= 127 s (l1 + K t (1/2 + 2 u L)), and the
//   fp32 x.w skinny_linear computes within g l1 128 s
// with g = gamma_(K+2) = (K+2) u / (1 - (K+2) u) >= 3 u, u = 2^-24 (any summation order,
// FMA or not). So |f - a| <= s (l1 (1/2 + 384 g) + 127 K t (1/2 + 2 u L) (1 + 4 g)) for
// the exact-path f and screened a, and the factor (1 + 4 g) on the l1 term covers the
// fp32 rounding of l1 and of a + radius. The x term is small unless x has a huge outlier
// (127 K t ~ 1.5 max|x| for the 270M's K = 640, against l1 / 2 ~ 320 mean|x|). The radius
// is summed in double and rounded up to fp32. The anchors are the row's k tokens
// with the largest a; F is the smallest of their exact logits, rounded to
// the output dtype, so at least k returned values are >= F. A token is a candidate when
// a + radius >= threshold, the threshold a margin below F. Every other token has
// f < threshold, which rounds below F: the margin (2^-5 |F| in bf16, whose spacing is
// <= 2^-7 |F|; 2^-20 |F| in fp32) plus 1e-30 for F = 0 keeps round(f) < F. So F, returned
// as `floor`, is a value every non-candidate's logit is strictly below.
//
// All of this assumes no fp32 sum overflows and that t is 0 or a normal number (so x / t
// rounds within u). Each fp32 value the screen makes is below 256 (l1 + K t) max(1, max s)
// in magnitude: t (p.q) + radius (<= 128 (l1 + K t) s), the exact partial sums
// (<= l1 max|w| = 127 l1 s) and F. When that is not finite (x not finite, or so large
// that a sum could overflow), t is subnormal (every |x| below 2^-126 L), or a
// threshold is not (an anchor's logit is NaN or +inf: only from a weight that q8 and
// scales were not made from), every logit is computed and `floor` is -inf, as a head
// that cannot screen answers (`NextTokenLogits.near_top`); a NaN threshold would
// otherwise make every token a non-candidate.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "row_products.h"
#include "screen_products.h"

namespace {

using namespace optimum_gemma3;

constexpr float kUnitRoundoff = 1.0f / (1 << 24);
constexpr int64_t kChunksPerThread = 4;
// Every value the screen makes is below kHeadroom * (l1 + K t) * max(1, max s) (header).
constexpr float kHeadroom = 256.0f;
static_assert(kMaxRows <= 8, "level_products takes 1 to 8 rows");

// Row n's scale s = max|w| / 127 and levels q = round(w / s) (ties to even), clamped to
// +-127, 8 lanes at a time: AVX2's division and rounding are IEEE's, as the scalar
// tail's are, so every lane gets the scalar formula's value. It runs at every load: for
// the 270M's head, 0.15-0.2 s in fp32 and 0.14 s in bf16, against 0.5 and 0.9 s for a
// scalar loop over an fp32 copy.
template <typename W>
float quantize_row(const W* row, int64_t n, int64_t K, int8_t* levels) {
  const int64_t k_lanes = K / kLanes * kLanes;
  const float top = largest_magnitude(row, K);
  TORCH_CHECK(std::isfinite(top), "quantize_rows: weight row ", n, " is not finite");
  const float s = top / 127.0f;
  if (s == 0.0f) {
    std::fill(levels, levels + K, 0);
    return s;
  }
  const __m256 scale = _mm256_set1_ps(s), low = _mm256_set1_ps(-127.0f),
               high = _mm256_set1_ps(127.0f);
  for (int64_t k = 0; k < k_lanes; k += kLanes) {
    const __m256 level = _mm256_round_ps(_mm256_div_ps(load_fp32(row + k), scale),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i words = _mm256_cvtps_epi32(_mm256_min_ps(high, _mm256_max_ps(low, level)));
    const __m128i halves =
        _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(levels + k), _mm_packs_epi16(halves, halves));
  }
  for (int64_t k = k_lanes; k < K; ++k) {
    const float level = std::nearbyint(static_cast<float>(row[k]) / s);
    levels[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, level)));
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "quantize_rows: weight [N, K] expected, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "quantize_rows: float32 or bfloat16 expected, got ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor q8 = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N}, w.options().dtype(at::kFloat));
  int8_t* dst = q8.data_ptr<int8_t>();
  float* scale = scales.data_ptr<float>();
  const auto quantize = [&](const auto* src) {
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) scale[n] = quantize_row(src + n * K, n, K, dst + n * K);
    });
  };
  if (w.scalar_type() == at::kFloat)
    quantize(w.data_ptr<float>());
  else
    quantize(w.data_ptr<c10::BFloat16>());
  return {q8, scales};
}

// The same product as skinny_linear for weight row n and all M input rows: out[m] (fp32).
template <typename W>
void exact_row(int64_t M, const float* x, const W* w, int64_t n, int64_t K, float* out) {
  multiply(M, x, w + n * K, out, 0, 1, K, 1);
}

// The smallest of n values, or NaN if any is NaN (std::min_element would skip it).
float lowest(const float* v, int64_t n) {
  float low = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) low = std::isnan(v[i]) || v[i] < low ? v[i] : low;
  return low;
}

using Scored = std::pair<float, int64_t>;  // (screened logit, token)

// Best first; as a heap's order, it keeps the worst on top.
bool better(const Scored& l, const Scored& r) { return l.first > r.first; }

// Keeps in `best` (a heap, worst on top) the k tokens of [n0, n1) with the largest
// a[n * stride].
void keep_best(const float* a, int64_t stride, int64_t n0, int64_t n1, int64_t k,
               std::vector<Scored>& best) {
  int64_t n = n0;
  for (; n < n1 && static_cast<int64_t>(best.size()) < k; ++n) {
    best.emplace_back(a[n * stride], n);
    std::push_heap(best.begin(), best.end(), better);
  }
  for (; n < n1; ++n) {
    if (!(a[n * stride] > best.front().first)) continue;
    std::pop_heap(best.begin(), best.end(), better);
    best.back() = {a[n * stride], n};
    std::push_heap(best.begin(), best.end(), better);
  }
}

// Each input row's levels and step for the screen, its radius per unit of weight scale
// (|f - a| <= radius * s: the header's bound), and whether the bound holds for all rows.
struct ScreenRows {
  std::vector<int16_t> levels;  // [M, K]
  std::vector<float> steps, radius;  // [M]
  bool screenable = true;
};

ScreenRows screen_rows(int64_t M, const float* x, int64_t K, float top_scale) {
  const double g = (K + 2) * static_cast<double>(kUnitRoundoff);
  const double gamma = g / (1.0 - g);
  const float coefficient = static_cast<float>((0.5 + 384.0 * gamma) * (1.0 + 4.0 * gamma));
  const int64_t L = x_levels(K);
  const double level_error = 0.5 + 2.0 * kUnitRoundoff * L;
  ScreenRows rows{std::vector<int16_t>(M * K, 0), std::vector<float>(M, 0.0f),
                  std::vector<float>(M)};
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float l1 = 0.0f;
    for (int64_t i = 0; i < K; ++i) l1 += std::abs(row[i]);
    if (std::isfinite(l1))
      rows.steps[m] = quantize_input_row(row, K, L, largest_magnitude(row, K), &rows.levels[m * K]);
    const float step = rows.steps[m], extent = l1 + K * step;
    rows.screenable = rows.screenable && std::isfinite(kHeadroom * extent) &&
                      std::isfinite(kHeadroom * extent * std::max(1.0f, top_scale)) &&
                      (step == 0.0f || step >= std::numeric_limits<float>::min());
    const double radius = static_cast<double>(l1) * coefficient +
                          127.0 * K * step * level_error * (1.0 + 4.0 * gamma);
    float rounded = static_cast<float>(radius);  // rounded up: the bound must hold
    if (rounded < radius) rounded = std::nextafter(rounded, std::numeric_limits<float>::infinity());
    rows.radius[m] = rounded;
  }
  return rows;
}

// out (fp32 or bf16) holds the exact values of the candidates, -inf elsewhere.
template <typename W, typename O>
void screen(int64_t M, const float* x, const W* w, const int8_t* q8, const float* scales,
            int64_t N, int64_t K, int64_t k, O* out, float* floor) {
  // The bound needs sums that cannot overflow (see the header); else every logit.
  ScreenRows rows = screen_rows(M, x, K, largest_magnitude(scales, N));
  bool screenable = rows.screenable;
  const std::vector<float>& radius = rows.radius;

  // Pass 1: screened logits a[n, m] = s_n t_m (p_m . q_n), and each chunk's k best a per
  // row. Kept per calling thread across calls: a fresh megabyte per row costs its page
  // faults. (Used through a pointer: inside the workers the name would mean their own.)
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(M * N)) scratch.resize(M * N);
  float* approx = scratch.data();
  const LevelProducts products{has_vnni(), rows.levels.data(),
                               q8, K, rows.steps.data(), scales, approx};
  const int64_t chunks = std::max<int64_t>(1, at::get_num_threads() * kChunksPerThread);
  const int64_t chunk_size = (N + chunks - 1) / chunks;
  std::vector<std::vector<Scored>> chunk_best(chunks * M);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = std::min(N, c * chunk_size), n1 = std::min(N, n0 + chunk_size);
      if (n0 == n1) continue;
      level_products(M, products, n0, n1);
      if (screenable)
        for (int64_t m = 0; m < M; ++m) keep_best(approx + m, M, n0, n1, k, chunk_best[c * M + m]);
    }
  });

  // The anchors, each row's k best a, and their exact logits set each row's threshold.
  std::vector<std::pair<int64_t, int64_t>> anchors;  // (row, token)
  for (int64_t m = 0; m < M && screenable; ++m) {
    std::vector<Scored> best;
    for (int64_t c = 0; c < chunks; ++c)
      best.insert(best.end(), chunk_best[c * M + m].begin(), chunk_best[c * M + m].end());
    std::nth_element(best.begin(), best.begin() + (k - 1), best.end(), better);
    for (int64_t j = 0; j < k; ++j) anchors.emplace_back(m, best[j].second);
  }
  std::vector<float> anchor_logit(anchors.size());
  at::parallel_for(0, static_cast<int64_t>(anchors.size()), 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> values(M);
    for (int64_t j = j0; j < j1; ++j) {
      exact_row(M, x, w, anchors[j].second, K, values.data());
      anchor_logit[j] = values[anchors[j].first];
    }
  });
  std::vector<float> threshold(M);
  for (int64_t m = 0; m < M && screenable; ++m) {
    // F, rounded as out is; NaN (so no threshold) if an anchor's logit is.
    floor[m] = static_cast<float>(static_cast<O>(lowest(anchor_logit.data() + m * k, k)));
    const float margin = std::is_same_v<O, float> ? 0x1p-20f : 0x1p-5f;
    threshold[m] = floor[m] - std::abs(floor[m]) * margin - 1e-30f;
    screenable = std::isfinite(threshold[m]);
  }
  if (!screenable) std::fill(floor, floor + M, -std::numeric_limits<float>::infinity());

  // Pass 2: every token some row may need, computed exactly (all of them if unscreenable).
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> values(M);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = std::min(N, c * chunk_size), n1 = std::min(N, n0 + chunk_size);
      for (int64_t m = 0; m < M; ++m)
        std::fill(out + m * N + n0, out + m * N + n1, -std::numeric_limits<float>::infinity());
      for (int64_t n = n0; n < n1; ++n) {
        bool candidate = !screenable;
        for (int64_t m = 0; m < M && !candidate; ++m)
          candidate = approx[n * M + m] + radius[m] * scales[n] >= threshold[m];
        if (!candidate) continue;
        exact_row(M, x, w, n, K, values.data());
        for (int64_t m = 0; m < M; ++m) out[m * N + n] = static_cast<O>(values[m]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> screened_linear_cpu(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& q8,
                                                       const at::Tensor& scales, int64_t k) {
  const auto sizes = few_row_output_sizes("screened_linear", x, weight);
  const int64_t K = weight.size(1), N = weight.size(0);
  check_int8_copy("screened_linear", q8, scales, N, K);
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "screened_linear: 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(k >= 1 && k <= N, "screened_linear: k must be 1 to ", N, " (the weight's rows), got ",
              k);
  std::vector<float> widened;
  const float* xf = fp32_rows(rows, widened);
  // Non-candidates read as -inf; candidates as skinny_linear computes them (x's dtype).
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor floor = at::empty({M}, x.options().dtype(at::kFloat));
  const at::Tensor w = weight.contiguous(), q = q8.contiguous(), s = scales.contiguous();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* fp = floor.data_ptr<float>();
  if (w.scalar_type() == at::kFloat)
    screen(M, xf, w.data_ptr<float>(), qp, sp, N, K, k, out.data_ptr<float>(), fp);
  else
    screen(M, xf, w.data_ptr<c10::BFloat16>(), qp, sp, N, K, k, out.data_ptr<c10::BFloat16>(), fp);
  std::vector<int64_t> floor_sizes(sizes.begin(), sizes.end() - 1);
  return {out.view(sizes), floor.view(floor_sizes)};
}

// The screen's logits a [M, N] (fp32) and each row's radius [M] (|exact - a| <= radius *
// scales[n] wherever the bound holds) with the instructions `isa` names ("avx2", "vnni"
// or "best"): the pieces tests check the bound and the two paths' agreement with.
std::tuple<at::Tensor, at::Tensor> screen_logits_cpu(const at::Tensor& x, const at::Tensor& q8,
                                                     const at::Tensor& scales,
                                                     c10::string_view isa) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "screen_logits: float32 or bfloat16 x [M, K] expected, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = scales.numel();
  check_int8_copy("screen_logits", q8, scales, N, K);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "screen_logits: 1 to ", kMaxRows, " rows, got ", M);
  const std::string wanted(isa), best = has_vnni() ? "vnni" : "avx2";
  TORCH_CHECK(wanted == "best" || wanted == "avx2" || wanted == best, "screen_logits: isa ",
              wanted, " is not available here (best: ", best, ")");
  const at::Tensor rows = x.contiguous(), q = q8.contiguous(), s = scales.contiguous();
  std::vector<float> widened;
  const float* xf = fp32_rows(rows, widened);
  const ScreenRows screen = screen_rows(M, xf, K, largest_magnitude(s.data_ptr<float>(), N));
  at::Tensor logits = at::empty({N, M}, x.options().dtype(at::kFloat));
  at::Tensor radius = at::empty({M}, x.options().dtype(at::kFloat));
  std::copy(screen.radius.begin(), screen.radius.end(), radius.data_ptr<float>());
  const LevelProducts products{(wanted == "best" ? best : wanted) == "vnni",
                               screen.levels.data(), q.data_ptr<int8_t>(), K,
                               screen.steps.data(), s.data_ptr<float>(),
                               logits.data_ptr<float>()};
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) { level_products(M, products, n0, n1); });
  return {logits.t().contiguous(), radius};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_gemma3, m) {
  m.def("quantize_rows(Tensor weight) -> (Tensor, Tensor)");
  m.def(
      "screened_linear(Tensor x, Tensor weight, Tensor q8, Tensor scales, int k=1) -> "
      "(Tensor, Tensor)");
  m.def("screen_logits(Tensor x, Tensor q8, Tensor scales, str isa='best') -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(optimum_gemma3, CPU, m) {
  m.impl("quantize_rows", quantize_rows_cpu);
  m.impl("screened_linear", screened_linear_cpu);
  m.impl("screen_logits", screen_logits_cpu);
}
