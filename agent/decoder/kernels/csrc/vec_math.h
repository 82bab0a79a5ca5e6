// Eight-wide float helpers for AVX2 (exp, silu, horizontal sum, float16 loads) with scalar
// twins.
//
// exp8: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (the
// truncation error r^7 / 7! is below 1.3e-7 of the result), 2^n built in the exponent
// bits. Inputs are clamped to [-87, 88], where float32 exp is finite and normal; softmax
// and SiLU need nothing outside it. std::exp costs ~40x more per value when called once
// per element, which is what the SwiGLU epilogue and the attention softmax did.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <c10/util/Half.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define NF4_VEC_MATH 1
#else
#define NF4_VEC_MATH 0
#endif

namespace nf4 {

// float32 or float16 values as float: float16 through F16C, eight at a time.
inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

#if NF4_VEC_MATH
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 in two parts so n * ln2 is exact enough for |n| up to 127.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// silu(g) * u = g / (1 + e^-g) * u
inline __m256 silu_mul8(__m256 g, __m256 u) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
  const __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
  return _mm256_mul_ps(_mm256_div_ps(g, denom), u);
}

inline float hsum8(__m256 v8) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}
#endif

inline float silu_mul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

// out[i] = silu(g[i]) * u[i] for n values (out may alias g). Every value goes through the
// same eight-wide code, the last few padded: which values form the tail depends on how the
// caller chunked its columns (and that on the batch size), and a stream's output must not.
inline void silu_mul_n(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#if NF4_VEC_MATH
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  }
  if (i < n) {  // masked loads give zeros past n, masked stores leave them alone
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(out + i, mask, silu_mul8(_mm256_maskload_ps(g + i, mask),
                                                 _mm256_maskload_ps(u + i, mask)));
  }
#else
  for (; i < n; ++i) out[i] = silu_mul(g[i], u[i]);
#endif
}

// x[i] = exp(x[i] - shift) for n values; returns their sum.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.0f;
#if NF4_VEC_MATH
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum8(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    total += x[i];
  }
  return total;
}

}  // namespace nf4
