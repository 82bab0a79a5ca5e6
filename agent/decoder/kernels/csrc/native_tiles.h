// Tile kernels for the GGUF file's own quantised weights (agent/decoder/native.py), so
// that nothing is rounded a second time on the way from the file to the dot product.
//
// Two layouts cover every GGUF block type Parley reads:
//   U4   4-bit unsigned values q in [0, 15] (Q4_0, Q4_1, Q4_K), packed as NF4 packs its
//        codes (64-weight blocks, byte j = weight j low nibble, weight j + 32 high);
//   I8   int8 values (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0), one byte per weight.
// A weight is w = scale[g] * q + offset[h], with one scale per group of G weights (32, or
// 16 for Q6_K's sub-blocks) and an optional offset per 32 weights (the "min" of Q4_1,
// Q4_K, ...; Q4_0's -8 d). Scales and offsets are float16 where the file's values fit it
// exactly and float32 otherwise (a K-quant's d * sc is a 17-bit product); each row's
// scales are zero-padded to a multiple of eight so they load eight at a time.
//
// Activations are quantised per 32 values to int8 (llama.cpp's Q8_0/Q8_1 granularity),
// with sum[h] = scale * (sum of the 32 values) kept for the offsets:
//   x . w = sum_g s_w[g] s_x[g] (q . xq)_g + sum_h o[h] sum[h]
// The second sum depends on no weight value, so it is the accumulator's starting value.
//
// Integer dot products of 32 bytes use AVX-512 VNNI's VPDPBUSD where the CPU has it
// (one instruction) and PMADDUBSW + PMADDWD on plain AVX2; nothing saturates on either
// path (|q| <= 128, |xq| <= 127: each PMADDUBSW pair stays within 2 * 128 * 127 = 32512),
// so the two give the same integers and the same results to the bit.
//
// "Fine" activations (llm_activations = int8x2) add a second byte per value: the first
// pass's rounding error times 256, rounded to int8 and clamped to +-127, so a value is the
// 16-bit hi * 256 + lo with the block scale amax / (127 * 256). Both bytes meet the same
// unpacked weights, (q . hi) * 256 + (q . lo) stays an int32 (|.| <= 32 * 128 * 127 * 257),
// and the scale table, conversion and FMA are the one pass's: the second costs two dot
// products per 64 weights. A single int8 pass rounds each value by up to half a step of
// amax / 127; a block holding one of the large activations some channels carry then
// loses the small ones' detail, enough to move near-tied logits (SmolLM2's "The" against
// "L" for "What is the capital of France?", 0.08 apart in fp32, 0.25 the other way in int8).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace nf4 {

// Activations quantised per row: int8 values plus per-block scale and scaled sum.
struct QuantRows {
  std::vector<int8_t> q;      // [M, Kp]  int8
  std::vector<int8_t> q_lo;   // [M, Kp]  the fine activations' low bytes (else empty)
  std::vector<float> scale;   // [M, Bp]  per block (64 for NF4/Q8: absmax / 127 / 63;
                              //          32 for the native formats: absmax / 127,
                              //          or absmax / (127 * 256) with low bytes)
  std::vector<float> excess;  // [M, Bp]  NF4: 63 * block sum of q; native: scale * block
                              //          sum of q; zero past the last block
};

constexpr int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

enum class Native { kU4, kI8, kI8x16 };

template <Native F>
constexpr int64_t group_size() { return F == Native::kI8x16 ? 16 : 32; }

template <Native F>
constexpr int64_t native_row_bytes(int64_t kp) { return F == Native::kU4 ? kp / 2 : kp; }

// A native weight as its tile kernel reads it (S: at::Half or float scales/offsets).
template <typename S>
struct NativeView {
  const uint8_t* codes;
  const S* scales;   // [N, pad8(Kp / G)]
  const S* offsets;  // [N, pad8(Kp / 32)], nullptr for none
  int64_t kp;
};

constexpr int64_t kMaxGroups = 1024;  // K up to 16384 with groups of 16

#if NF4_VEC_MATH
// Dot products of 32 unsigned bytes with 32 signed ones, four at a time: int32 x 8.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc + dot_u8s8(u, s), in one instruction where VNNI exists.
inline __m256i dot_u8s8_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, dot_u8s8(u, s));
#endif
}

// Loads N * 8 floats into v and returns their largest magnitude.
template <int N>
inline float load_abs_max(const float* x, __m256* v) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 top = _mm256_setzero_ps();
  for (int j = 0; j < N; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    top = _mm256_max_ps(top, _mm256_and_ps(v[j], abs_mask));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// Eight int32 lanes x 4 -> 32 int8 in order (the packs saturate). Two packs work within
// 128-bit lanes; the dword permutation puts the bytes in order.
inline void store_bytes32(const __m256i* qi, int8_t* q) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i a = _mm256_packs_epi32(qi[0], qi[1]);
  const __m256i b = _mm256_packs_epi32(qi[2], qi[3]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order));
}

inline int32_t lane_sum(__m256i v) {
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
}

// One whole block of 32 values: q = round(x * 127 / amax) (nearest-even, as std::nearbyint
// rounds); with `lo`, also lo = clamp(round((x * 127 / amax - q) * 256), +-127). Returns
// amax and adds the values' sum (hi * 256 + lo with `lo`) to `total`.
inline float quantise_block32(const float* x, int8_t* q, int8_t* lo, int32_t* total) {
  __m256 v[4];
  const float amax = load_abs_max<4>(x, v);
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i qi[4], li[4];
  __m256i sum = _mm256_setzero_si256();
  const __m256 step = _mm256_set1_ps(256.0f);
  const __m256i limit = _mm256_set1_epi32(127);
  for (int j = 0; j < 4; ++j) {
    const __m256 scaled = _mm256_mul_ps(v[j], inv);
    qi[j] = _mm256_cvtps_epi32(scaled);
    if (lo != nullptr) {
      const __m256 error = _mm256_sub_ps(scaled, _mm256_cvtepi32_ps(qi[j]));
      li[j] = _mm256_cvtps_epi32(_mm256_mul_ps(error, step));
      li[j] = _mm256_max_epi32(_mm256_min_epi32(li[j], limit), _mm256_sub_epi32(
          _mm256_setzero_si256(), limit));
      sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_slli_epi32(qi[j], 8), li[j]));
    } else {
      sum = _mm256_add_epi32(sum, qi[j]);
    }
  }
  store_bytes32(qi, q);
  if (lo != nullptr) store_bytes32(li, lo);
  *total += lane_sum(sum);
  return amax;
}
#endif

// Row r of `x` ([*, k] floats) quantised per 32 into q (kp values, zero past k), and into
// low bytes `lo` unless it is nullptr, with scales and scaled sums for pad8(kp / 32)
// blocks (zero past the last).
inline void quantise_row32(const float* x, int64_t k, int64_t kp, int8_t* q, int8_t* lo,
                           float* scale, float* sum) {
  std::fill(q + k, q + kp, int8_t(0));
  if (lo != nullptr) std::fill(lo + k, lo + kp, int8_t(0));
  const int64_t nb = kp / 32;
  std::fill(scale + nb, scale + pad8(nb), 0.0f);
  std::fill(sum + nb, sum + pad8(nb), 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * 32;
    const int64_t k1 = std::min(k, k0 + 32);
    float amax = 0.0f;
    int32_t total = 0;
#if NF4_VEC_MATH
    if (k1 - k0 == 32) {
      amax = quantise_block32(x + k0, q + k0, lo ? lo + k0 : nullptr, &total);
    } else
#endif
    {
      for (int64_t i = k0; i < k1; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int64_t i = k0; i < k1; ++i) {
        const float scaled = x[i] * inv;
        q[i] = int8_t(std::nearbyint(scaled));
        if (lo != nullptr) {
          lo[i] = int8_t(std::clamp(std::nearbyint((scaled - float(q[i])) * 256.0f),
                                    -127.0f, 127.0f));
          total += q[i] * 256 + lo[i];
        } else {
          total += q[i];
        }
      }
    }
    scale[b] = lo != nullptr ? amax / (127.0f * 256.0f) : amax / 127.0f;
    sum[b] = scale[b] * float(total);
  }
}

// Dot products of weight rows [0, n_rows) of `w` with MR activation rows starting at r0:
// dots[n * MR + r] (four floats of room needed past the last row, as tile_dots).
template <Native F, typename S, int MR, bool Fine>
void native_dots(const NativeView<S>& w, int64_t n_rows, const QuantRows& xq, int64_t r0,
                 float* dots) {
  constexpr int64_t G = group_size<F>();
  const int64_t kp = w.kp;
  const int64_t nb = kp / 64;            // 64-weight blocks the loop walks
  const int64_t n32p = pad8(kp / 32);    // activation blocks (and offsets) per row
  const int64_t ngp = pad8(kp / G);      // weight scales per row
  const int64_t row_bytes = native_row_bytes<F>(kp);
  alignas(32) float d[MR][kMaxGroups];   // per group: weight scale * activation scale
#if NF4_VEC_MATH
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const int8_t* xrow = xq.q.data() + r0 * kp;
  const int8_t* xrow_lo = Fine ? xq.q_lo.data() + r0 * kp : nullptr;
  for (int64_t n = 0; n < n_rows; ++n) {
    const uint8_t* wn = w.codes + n * row_bytes;
    const S* sn = w.scales + n * ngp;
    const S* on = w.offsets ? w.offsets + n * n32p : nullptr;
    _mm_prefetch(reinterpret_cast<const char*>(sn + 4 * ngp), _MM_HINT_T0);
    // Activation row r's table; its accumulator starts at the offsets' share.
    auto table = [&](int r) __attribute__((always_inline)) {
      const float* xs = xq.scale.data() + (r0 + r) * n32p;
      __m256 start = _mm256_setzero_ps();
      if constexpr (G == 32) {
        for (int64_t j = 0; j < ngp; j += 8) {
          _mm256_store_ps(&d[r][j], _mm256_mul_ps(load8(sn + j), _mm256_loadu_ps(xs + j)));
        }
      } else {  // two weight groups share an activation block
        const __m256i pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (int64_t j = 0; j < ngp; j += 8) {
          const __m256 x8 = _mm256_permutevar8x32_ps(
              _mm256_castps128_ps256(_mm_loadu_ps(xs + j / 2)), pairs);
          _mm256_store_ps(&d[r][j], _mm256_mul_ps(load8(sn + j), x8));
        }
      }
      if (on != nullptr) {
        const float* sums = xq.excess.data() + (r0 + r) * n32p;
        for (int64_t j = 0; j < n32p; j += 8) {
          start = _mm256_fmadd_ps(load8(on + j), _mm256_loadu_ps(sums + j), start);
        }
      }
      return start;
    };
    __m256 acc0 = table(0), acc1 = _mm256_setzero_ps(), acc2 = acc1, acc3 = acc1;
    __m256 acc4 = acc1, acc5 = acc1, acc6 = acc1, acc7 = acc1;
    if constexpr (MR > 1) acc1 = table(1);
    if constexpr (MR > 2) acc2 = table(2);
    if constexpr (MR > 3) acc3 = table(3);
    if constexpr (MR > 4) acc4 = table(4);
    if constexpr (MR > 5) acc5 = table(5);
    if constexpr (MR > 6) acc6 = table(6);
    if constexpr (MR > 7) acc7 = table(7);
    // lo, hi: weights 0-31 and 32-63 of block b as the unsigned operand; w0, w1 the signs
    // (int8 layouts only).
    auto step = [&](__m256 acc, int r, int64_t b, __m256i lo, __m256i hi, __m256i w0,
                    __m256i w1) __attribute__((always_inline)) {
      // 32 activation bytes at p, carrying the weights' signs for the int8 layouts.
      auto signed_x = [&](const int8_t* p, __m256i w) __attribute__((always_inline)) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        if constexpr (F != Native::kU4) return _mm256_sign_epi8(x, w);
        return x;
      };
      const int64_t at = r * kp + b * 64;
      __m256i i0 = dot_u8s8(lo, signed_x(xrow + at, w0));
      __m256i i1 = dot_u8s8(hi, signed_x(xrow + at + 32, w1));
      if constexpr (Fine) {  // (q . hi) * 256 + (q . lo)
        i0 = dot_u8s8_add(_mm256_slli_epi32(i0, 8), lo, signed_x(xrow_lo + at, w0));
        i1 = dot_u8s8_add(_mm256_slli_epi32(i1, 8), hi, signed_x(xrow_lo + at + 32, w1));
      }
      const __m256 s0 = _mm256_cvtepi32_ps(i0);
      const __m256 s1 = _mm256_cvtepi32_ps(i1);
      if constexpr (G == 32) {
        acc = _mm256_fmadd_ps(s0, _mm256_broadcast_ss(&d[r][2 * b]), acc);
        return _mm256_fmadd_ps(s1, _mm256_broadcast_ss(&d[r][2 * b + 1]), acc);
      } else {  // lanes 0-3 of s0 are group 4b, lanes 4-7 group 4b + 1, and so on
        const __m256 four = _mm256_castps128_ps256(_mm_load_ps(&d[r][4 * b]));
        const __m256 d0 = _mm256_permutevar8x32_ps(four, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
        const __m256 d1 = _mm256_permutevar8x32_ps(four, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
        acc = _mm256_fmadd_ps(s0, d0, acc);
        return _mm256_fmadd_ps(s1, d1, acc);
      }
    };
    constexpr int64_t kBytes = F == Native::kU4 ? 32 : 64;  // per 64-weight block
    for (int64_t b = 0; b < nb; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(wn + b * kBytes + 16 * kBytes), _MM_HINT_T0);
      __m256i lo, hi, w0 = _mm256_setzero_si256(), w1 = w0;
      if constexpr (F == Native::kU4) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * 32));
        lo = _mm256_and_si256(packed, low_mask);
        hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
      } else {
        w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * 64));
        w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * 64 + 32));
        lo = _mm256_abs_epi8(w0);
        hi = _mm256_abs_epi8(w1);
      }
      acc0 = step(acc0, 0, b, lo, hi, w0, w1);
      if constexpr (MR > 1) acc1 = step(acc1, 1, b, lo, hi, w0, w1);
      if constexpr (MR > 2) acc2 = step(acc2, 2, b, lo, hi, w0, w1);
      if constexpr (MR > 3) acc3 = step(acc3, 3, b, lo, hi, w0, w1);
      if constexpr (MR > 4) acc4 = step(acc4, 4, b, lo, hi, w0, w1);
      if constexpr (MR > 5) acc5 = step(acc5, 5, b, lo, hi, w0, w1);
      if constexpr (MR > 6) acc6 = step(acc6, 6, b, lo, hi, w0, w1);
      if constexpr (MR > 7) acc7 = step(acc7, 7, b, lo, hi, w0, w1);
    }
    auto four_sums = [](__m256 a, __m256 b, __m256 c, __m256 e, float* out)
        __attribute__((always_inline)) {
      const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, e));
      _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(pairs),
                                    _mm256_extractf128_ps(pairs, 1)));
    };
    four_sums(acc0, acc1, acc2, acc3, dots + n * MR);
    if constexpr (MR > 4) four_sums(acc4, acc5, acc6, acc7, dots + n * MR + 4);
  }
#else
  for (int64_t n = 0; n < n_rows; ++n) {
    const uint8_t* wn = w.codes + n * row_bytes;
    const S* sn = w.scales + n * ngp;
    const S* on = w.offsets ? w.offsets + n * n32p : nullptr;
    for (int r = 0; r < MR; ++r) {
      const int8_t* xr = xq.q.data() + (r0 + r) * kp;
      const int8_t* xl = Fine ? xq.q_lo.data() + (r0 + r) * kp : nullptr;
      const float* xs = xq.scale.data() + (r0 + r) * n32p;
      const float* sums = xq.excess.data() + (r0 + r) * n32p;
      float total = 0.0f;
      if (on != nullptr) {
        for (int64_t h = 0; h < kp / 32; ++h) total += to_float(on[h]) * sums[h];
      }
      for (int64_t g = 0; g < kp / G; ++g) {
        int32_t dot = 0;
        for (int64_t i = g * G; i < (g + 1) * G; ++i) {
          int32_t q;
          if constexpr (F == Native::kU4) {
            const int64_t b = i / 64, j = i % 64;
            const uint8_t byte = wn[b * 32 + (j & 31)];
            q = j < 32 ? (byte & 0x0F) : (byte >> 4);
          } else {
            q = reinterpret_cast<const int8_t*>(wn)[i];
          }
          dot += q * (Fine ? xr[i] * 256 + xl[i] : xr[i]);
        }
        total += float(dot) * (to_float(sn[g]) * xs[g * G / 32]);
      }
      dots[n * MR + r] = total;
    }
  }
#endif
}

}  // namespace nf4
