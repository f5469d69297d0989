// The screen's logits a[n, m] = s_n step_m (x_m . q_n): int16 levels of a few input rows
// times the int8 head, summed in int32, exactly, then scaled in fp32.
//
// Why integers: a verify call screens up to 8 rows at once, and in fp32 each row costs an
// FMA and a load per 8 weights (after the int8 -> fp32 widening), so past two rows the
// screen was compute-bound (8 rows: 3.5x one row's time). In int16 one instruction
// multiplies and pairs 16 weights (`vpmaddwd`, AVX2) or multiplies, pairs and accumulates
// 32 (`vpdpwssd`, AVX-512 VNNI), and the x loads are half as wide. The sums are exact,
// so they do not depend on the order, the ISA or the number of rows: the AVX2 and VNNI
// paths agree bit for bit, and the bound (screened_linear.cpp) needs no summation term.
// The 270M's head (262144 x 640), bf16, AVX-512 host, alternating processes: 8 rows
// 26.7-34.1 -> 11.4-15.3 ms, 5 rows 17.8-21.9 -> 8.0-9.4 ms, one row 5.9-7.2 -> 4.9-6.2 ms
// (the whole `screened_linear`). Asking for rows 4 KiB ahead (`prefetch_ahead`) made it
// 5-20% slower there, so the VNNI path does not. The AVX2 path does for one or two rows,
// where one stream per thread is what bounds it: in alternating processes on an AVX2 host,
// the self-draft's 126 layer products 10.5 -> 8.1 ms, the head's one-row screen 11.7 ->
// 9.6 ms (5 rows, compute-bound, unchanged).
//
// Exact because they cannot overflow: |level| <= L with 127 * L * K < 2^31 (`x_levels`),
// so every partial sum of K products of |q| <= 127 fits in int32.
#pragma once

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vector.h"

namespace optimum_gemma3 {

// The most levels (each side of 0) x may use with K features: int32 sums stay exact.
inline int64_t x_levels(int64_t K) {
  return std::min<int64_t>(32767, ((int64_t{1} << 31) - 1) / (127 * K));
}

// The largest |v| of n values, or NaN if any is NaN (a vector max would drop it), 8 lanes
// at a time.
template <typename T>
inline float largest_magnitude(const T* v, int64_t n) {
  const int64_t n_lanes = n / kLanes * kLanes;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 largest = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
  for (int64_t i = 0; i < n_lanes; i += kLanes) {
    const __m256 lanes = load_fp32(v + i);
    largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, lanes));
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(lanes, lanes, _CMP_UNORD_Q));
  }
  float top = horizontal_max(largest);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t i = n_lanes; i < n; ++i) {
    const float value = static_cast<float>(v[i]);
    nan = nan || std::isnan(value);
    top = std::max(top, std::abs(value));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : top;
}

// x's step (largest |x| / levels, in fp32) and levels round(x / step) (ties to even),
// clamped to +-levels (the bound in screened_linear.cpp shows the clamp never acts).
inline float quantize_input_row(const float* x, int64_t K, int64_t levels, float top,
                                int16_t* out) {
  const float step = top / static_cast<float>(levels);
  const float limit = static_cast<float>(levels);
  for (int64_t k = 0; k < K; ++k) {
    const float level = step == 0.0f ? 0.0f : std::nearbyint(x[k] / step);
    out[k] = static_cast<int16_t>(std::min(limit, std::max(-limit, level)));
  }
  return step;
}

// Checks the int8 copy (q8, scales) has the shape of a [N, K] weight.
inline void check_int8_copy(const char* op, const at::Tensor& q8, const at::Tensor& scales,
                            int64_t N, int64_t K) {
  TORCH_CHECK(q8.scalar_type() == at::kChar && q8.dim() == 2 && q8.size(0) == N &&
                  q8.size(1) == K,
              op, ": q8 must be int8 of the weight's shape [", N, ", ", K, "], got ",
              q8.scalar_type(), " ", q8.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == N,
              op, ": float32 scales [", N, "] expected, got ", scales.scalar_type(), " ",
              scales.sizes());
}

// Lane m: the sum of v[m]'s 8 lanes, for M <= 8 vectors (lanes past M: 0). A tree of
// pairwise adds: integer sums, so exact in any order.
template <int M>
inline __m256i lane_sums(const __m256i* v) {
  __m256i a[8];
  for (int m = 0; m < 8; ++m) a[m] = m < M ? v[m] : _mm256_setzero_si256();
  const __m256i low =
      _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  const __m256i high =
      _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                          _mm256_permute2x128_si256(low, high, 0x31));
}

// Stores a[n, m] = (sum_m * step_m) * s_n in fp32 for the M rows (the bound counts these
// three roundings), adding the products from k0 on one at a time first (the tails the
// vector loops leave when K is not a multiple of their width). out is [N, M].
template <int M>
inline void store_screened(__m256i sums, const int16_t* x, const int8_t* row, int64_t k0,
                           int64_t K, __m256 steps, float scale, float* out) {
  if (k0 < K) {
    alignas(32) int32_t tails[8] = {};
    for (int m = 0; m < M; ++m)
      for (int64_t k = k0; k < K; ++k) tails[m] += int32_t{x[m * K + k]} * int32_t{row[k]};
    sums = _mm256_add_epi32(sums, _mm256_load_si256(reinterpret_cast<const __m256i*>(tails)));
  }
  const __m256 a = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), steps),
                                 _mm256_set1_ps(scale));
  if constexpr (M == 8) {
    _mm256_storeu_ps(out, a);
  } else {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, a);
    for (int m = 0; m < M; ++m) out[m] = lanes[m];
  }
}

// Lanes 0..M-1: steps[m]; the rest 0.
template <int M>
inline __m256 load_steps(const float* steps) {
  alignas(32) float lanes[8] = {};
  for (int m = 0; m < M; ++m) lanes[m] = steps[m];
  return _mm256_load_ps(lanes);
}

// a[n, m] for weight rows [n0, n1), M input rows of K levels (steps[m]): AVX2.
template <int M>
void level_products_avx2(const int16_t* x, const int8_t* q, int64_t K, int64_t n0,
                         int64_t n1, const float* steps, const float* scales, float* out) {
  const int64_t k16 = K / 16 * 16;
  const __m256 step = load_steps<M>(steps);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = q + n * K;
    if constexpr (M <= 2) prefetch_ahead(row, K);  // more rows: compute-bound, no gain
    __m256i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t k = 0; k < k16; k += 16) {
      const __m256i w =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m] = _mm256_add_epi32(
          acc[m], _mm256_madd_epi16(
                      w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k))));
    }
    store_screened<M>(lane_sums<M>(acc), x, row, k16, K, step, scales[n], out + n * M);
  }
}

// The same a with AVX-512 VNNI: `vpdpwssd` multiplies, pairs and accumulates 32 levels.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void level_products_vnni(
    const int16_t* x, const int8_t* q, int64_t K, int64_t n0, int64_t n1, const float* steps,
    const float* scales, float* out) {
  const int64_t k32 = K / 32 * 32;
  const __m256 step = load_steps<M>(steps);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = q + n * K;
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < k32; k += 32) {
      const __m512i w =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m] =
          _mm512_dpwssd_epi32(acc[m], w, _mm512_loadu_si512(x + m * K + k));
    }
    __m256i halves[M];
    for (int m = 0; m < M; ++m)
      halves[m] = _mm256_add_epi32(_mm512_castsi512_si256(acc[m]),
                                   _mm512_extracti64x4_epi64(acc[m], 1));
    store_screened<M>(lane_sums<M>(halves), x, row, k32, K, step, scales[n], out + n * M);
  }
}

// Whether the CPU has AVX-512 VNNI (and F, BW) for `level_products_vnni`; else AVX2.
// Decided at run time: the library is built once for every host.
inline bool has_vnni() {
  static const bool vnni = __builtin_cpu_supports("avx512vnni") &&
                           __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512f");
  return vnni;
}

// The arguments of `level_products` besides the rows.
struct LevelProducts {
  bool vnni;  // the instructions: the caller checks the CPU has them (`has_vnni`)
  const int16_t* x;  // [M, K] levels
  const int8_t* q;  // [N, K]
  int64_t K;
  const float* steps;  // [M]
  const float* scales;  // [N]
  float* out;  // [N, M]: a token's rows side by side
};

template <int M>
void level_products_for(const LevelProducts& p, int64_t n0, int64_t n1) {
  if (p.vnni)
    level_products_vnni<M>(p.x, p.q, p.K, n0, n1, p.steps, p.scales, p.out);
  else
    level_products_avx2<M>(p.x, p.q, p.K, n0, n1, p.steps, p.scales, p.out);
}

// The screened logits a[n, m] of weight rows [n0, n1) for 1 to 8 input rows.
inline void level_products(int64_t M, const LevelProducts& p, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return level_products_for<1>(p, n0, n1);
    case 2: return level_products_for<2>(p, n0, n1);
    case 3: return level_products_for<3>(p, n0, n1);
    case 4: return level_products_for<4>(p, n0, n1);
    case 5: return level_products_for<5>(p, n0, n1);
    case 6: return level_products_for<6>(p, n0, n1);
    case 7: return level_products_for<7>(p, n0, n1);
    default: return level_products_for<8>(p, n0, n1);
  }
}

}  // namespace optimum_gemma3
