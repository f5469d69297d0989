// AVX2 helpers shared by this package's kernels: fp32 lanes from fp32 or bf16 memory.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace optimum_gemma3 {

constexpr int64_t kLanes = 8;  // fp32 lanes of an AVX2 register

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Requests the `bytes` of the row ~4 KiB past this one's start. Rows that take more than
// a load per cache line to use (bf16 widened to fp32, int8 widened to int16) leave the
// hardware prefetcher too few lines in flight on AVX2 hosts, so one stream per thread
// reads well below the bandwidth. fp32 rows gain nothing from it, and AVX-512 hosts lose
// 5-20% (the VNNI screen does without).
inline void prefetch_ahead(const void* row, int64_t bytes) {
  constexpr int64_t kDistance = 4096, kLine = 64;
  const char* ahead = static_cast<const char*>(row) + kDistance;
  for (int64_t b = 0; b < bytes; b += kLine) _mm_prefetch(ahead + b, _MM_HINT_T0);
}

inline __m256 load_fp32(const float* p) { return _mm256_loadu_ps(p); }

// bf16 is the top half of an fp32: widen by shifting into the high 16 bits (exact).
inline __m256 load_fp32(const c10::BFloat16* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

}  // namespace optimum_gemma3
