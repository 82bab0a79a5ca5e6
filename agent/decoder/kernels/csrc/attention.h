// Attention for new tokens in one call, each token a row with its own cache slot and
// position: RoPE on the q and k heads, every row's k and v written into the cache first,
// then softmax(q.K/sqrt(D)) over positions 0..pos of the row's slot, times V. A decode
// step is one row per stream; a prompt chunk is rows of one slot at consecutive positions,
// which makes the same loop causal. What model.Attention does with ~12 PyTorch ops and
// scaled_dot_product_attention, at a few microseconds of dispatch instead of ~150 per
// layer. Same maths in float32; the rotate-half RoPE layout.
//
// Shapes: qkv [R, (H + 2 Hkv) D]; caches [L, S, Hkv, T, D] (model.KVCache), float32 or
// float16 (half the memory and half the bytes read per key; the maths stays float32);
// slots and positions int64 [R]; cos, sin [context, D / 2]. Returns [R, H D].

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "thread_pool.h"
#include "vec_math.h"

namespace nf4 {

// A row of float values into a float32 or float16 cache (to_float and load8, in
// vec_math.h, read them back).
inline void store_row(const float* x, int64_t n, float* out) { std::copy_n(x, n, out); }
inline void store_row(const float* x, int64_t n, c10::Half* out) {
  int64_t i = 0;
#if NF4_VEC_MATH
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) out[i] = c10::Half(x[i]);
}

// y[:D/2] = x1 cos - x2 sin, y[D/2:] = x2 cos + x1 sin  (x = [x1, x2]).
inline void rope_rotate(const float* x, const float* cos, const float* sin, int64_t d,
                        float scale, float* y) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    y[i] = (x1 * cos[i] - x2 * sin[i]) * scale;
    y[i + half] = (x2 * cos[i] + x1 * sin[i]) * scale;
  }
}

#if NF4_VEC_MATH
// Lane i of the result is the sum of the eight lanes of a[i]. Every key goes through the
// same pairing of lanes, whichever of the eight it is.
inline __m256 sum_each(const __m256 a[8]) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Scores of eight keys (rows `d` apart) against q: eight independent accumulators over the
// eight-wide columns, then one transposing reduction, instead of a horizontal sum per key
// (whose latency bounded the old loop at long contexts).
template <typename C>
inline __m256 eight_scores(const float* q, const C* k, int64_t d) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  const int64_t wide = d / 8 * 8;
  for (int64_t j = 0; j < wide; j += 8) {
    const __m256 qj = _mm256_loadu_ps(q + j);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qj, load8(k + i * d + j), a[i]);
  }
  __m256 s = sum_each(a);
  if (wide < d) {  // head sizes that are not a multiple of eight
    alignas(32) float rest[8];
    for (int i = 0; i < 8; ++i) {
      float r = 0.0f;
      for (int64_t j = wide; j < d; ++j) r += q[j] * to_float(k[i * d + j]);
      rest[i] = r;
    }
    s = _mm256_add_ps(s, _mm256_load_ps(rest));
  }
  return s;
}

// out[8R] (+)= sum_t p[t] v[t][:8R], v rows `d` apart: R accumulators, one FMA each per
// key; with `more` they start from out (the sum continues over a further run of keys).
template <int R, typename C>
inline void weighted_columns(const float* p, const C* v, int64_t n, int64_t d, float* out,
                             bool more) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = more ? _mm256_loadu_ps(out + 8 * r) : _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m256 w = _mm256_broadcast_ss(p + t);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(w, load8(v + t * d + 8 * r), a[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + 8 * r, a[r]);
}
#endif

// scores[t] = q . k[t] for t < n (rows `d` apart); returns the largest. Keys go eight at a
// time, the last few padded with zero rows, so a key's score does not depend on where the
// row's history happens to end.
template <typename C>
inline float key_scores(const float* q, const C* k, int64_t n, int64_t d, float* scores) {
  float top = -INFINITY;
#if NF4_VEC_MATH
  int64_t t = 0;
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  for (; t + 8 <= n; t += 8) {
    const __m256 s = eight_scores(q, k + t * d, d);
    _mm256_storeu_ps(scores + t, s);
    top8 = _mm256_max_ps(top8, s);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  for (float x : lanes) top = std::max(top, x);
  if (t < n) {
    thread_local std::vector<C> padded;
    padded.assign(8 * d, C(0.0f));
    std::copy(k + t * d, k + n * d, padded.data());
    _mm256_store_ps(lanes, eight_scores(q, padded.data(), d));
    for (int64_t i = 0; t + i < n; ++i) {
      scores[t + i] = lanes[i];
      top = std::max(top, lanes[i]);
    }
  }
#else
  for (int64_t t = 0; t < n; ++t) {
    float total = 0.0f;
    for (int64_t j = 0; j < d; ++j) total += q[j] * to_float(k[t * d + j]);
    scores[t] = total;
    top = std::max(top, total);
  }
#endif
  return top;
}

// out[D] = sum_t p[t] v[t] for t < n, v rows `d` apart; accumulators stay in registers.
// With `more`, the sum continues from out: split over runs of keys it adds the same terms
// in the same order as one call over all of them.
template <typename C>
inline void weighted_rows(const float* p, const C* v, int64_t n, int64_t d, float* out,
                          bool more = false) {
  int64_t d0 = 0;
#if NF4_VEC_MATH
  for (; d0 + 64 <= d; d0 += 64) weighted_columns<8>(p, v + d0, n, d, out + d0, more);
  switch ((d - d0) / 8) {
    case 7: weighted_columns<7>(p, v + d0, n, d, out + d0, more); break;
    case 6: weighted_columns<6>(p, v + d0, n, d, out + d0, more); break;
    case 5: weighted_columns<5>(p, v + d0, n, d, out + d0, more); break;
    case 4: weighted_columns<4>(p, v + d0, n, d, out + d0, more); break;
    case 3: weighted_columns<3>(p, v + d0, n, d, out + d0, more); break;
    case 2: weighted_columns<2>(p, v + d0, n, d, out + d0, more); break;
    case 1: weighted_columns<1>(p, v + d0, n, d, out + d0, more); break;
    default: break;
  }
  d0 += (d - d0) / 8 * 8;
#endif
  if (d0 < d) {
    if (!more) std::fill(out + d0, out + d, 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = d0; i < d; ++i) out[i] += p[t] * to_float(v[t * d + i]);
    }
  }
}

// What token_attention does once its arguments are checked: `C` is the cache's element.
template <typename C>
void attend(const float* xp, int64_t b_rows, int64_t width, C* kc, C* vc, int64_t head_stride,
            const int64_t* slot, const int64_t* pos, const float* cp, const float* sp,
            int64_t n_head, int64_t n_kv_head, int64_t d, ThreadPool& pool, float* op) {
  const int64_t half = d / 2;
  // The new keys (rotated) and values first: the row's query heads, and later rows of
  // the same slot, read them.
  std::vector<float> rotated(d);
  for (int64_t b = 0; b < b_rows; ++b) {
    for (int64_t g = 0; g < n_kv_head; ++g) {
      const int64_t at = (slot[b] * n_kv_head + g) * head_stride + pos[b] * d;
      rope_rotate(xp + b * width + (n_head + g) * d, cp + pos[b] * half, sp + pos[b] * half,
                  d, 1.0f, rotated.data());
      store_row(rotated.data(), d, kc + at);
      store_row(xp + b * width + (n_head + n_kv_head + g) * d, d, vc + at);
    }
  }
  const int64_t group = n_head / n_kv_head;
  const float scale = 1.0f / std::sqrt(float(d));
  // A task is one row and a run of query heads sharing a KV head. With long histories
  // (the keys and values of a row's KV heads outgrow L2 past ~500 positions) the whole
  // group goes together: its heads take each run of 64 keys in turn, read from memory
  // once and from L1 for the others (8 streams at 2,000 positions, 30 layers: 1.19x).
  // Only where there are tasks enough to share: one row alone keeps a task per head, or
  // three KV heads would leave one of two threads idle half the time. Short histories
  // stay in cache anyway and keep a task per head too (the runs cost ~4% there).
  int64_t longest = 0;
  for (int64_t b = 0; b < b_rows; ++b) longest = std::max(longest, pos[b] + 1);
  const bool grouped = longest >= 512 && b_rows * n_kv_head >= 4 * pool.size();
  const int64_t heads = grouped ? group : 1;
  const int64_t tasks_per_row = n_head / heads;
  pool.run(b_rows * tasks_per_row, [&](int64_t task) {
    const int64_t b = task / tasks_per_row, h0 = task % tasks_per_row * heads;
    const int64_t n = pos[b] + 1;  // keys 0..pos
    const int64_t base = (slot[b] * n_kv_head + h0 / group) * head_stride;
    const int64_t run = heads > 1 ? 64 : n;  // one head: all keys in one go
    thread_local std::vector<float> q, scores, top, inv;
    q.resize(heads * d);
    scores.resize(heads * n);
    top.assign(heads, -INFINITY);
    inv.resize(heads);
    for (int64_t j = 0; j < heads; ++j) {
      rope_rotate(xp + b * width + (h0 + j) * d, cp + pos[b] * half, sp + pos[b] * half, d,
                  scale, q.data() + j * d);
    }
    for (int64_t t0 = 0; t0 < n; t0 += run) {  // runs of whole eight-key groups
      const int64_t len = std::min(run, n - t0);
      for (int64_t j = 0; j < heads; ++j) {
        top[j] = std::max(top[j], key_scores(q.data() + j * d, kc + base + t0 * d, len, d,
                                             scores.data() + j * n + t0));
      }
    }
    float* y = op + b * n_head * d + h0 * d;
    for (int64_t j = 0; j < heads; ++j) {
      inv[j] = 1.0f / exp_shifted_sum(scores.data() + j * n, n, top[j]);
    }
    for (int64_t t0 = 0; t0 < n; t0 += run) {
      const int64_t len = std::min(run, n - t0);
      for (int64_t j = 0; j < heads; ++j) {
        weighted_rows(scores.data() + j * n + t0, vc + base + t0 * d, len, d, y + j * d,
                      t0 > 0);
      }
    }
    for (int64_t j = 0; j < heads; ++j) {
      for (int64_t i = 0; i < d; ++i) y[j * d + i] *= inv[j];
    }
  });
}

// The new tokens' slots, positions and RoPE tables as the kernel reads them.
struct TokenRows {
  at::Tensor slot_t, pos_t, cos_t, sin_t;  // int64, int64, float32, float32; contiguous
  const int64_t* slot;
  const int64_t* pos;
  const float* cp;
  const float* sp;
  int64_t rows;

  TokenRows(const at::Tensor& slots, const at::Tensor& positions, const at::Tensor& cos,
            const at::Tensor& sin)
      : slot_t(slots.to(at::kLong).contiguous()),
        pos_t(positions.to(at::kLong).contiguous()),
        cos_t(cos.to(at::kFloat).contiguous()),
        sin_t(sin.to(at::kFloat).contiguous()) {
    rows = slot_t.numel();
    TORCH_CHECK(pos_t.numel() == rows, "one position per row");
    TORCH_CHECK(cos_t.dim() == 2 && cos_t.sizes() == sin_t.sizes(), "rope tables");
    slot = slot_t.data_ptr<int64_t>();
    pos = pos_t.data_ptr<int64_t>();
    cp = cos_t.data_ptr<float>();
    sp = sin_t.data_ptr<float>();
  }
};

// Attention of `tokens.rows` rows of q, k, v (xp, `width` floats apart) into op [R, H D].
inline void attend_rows(const float* xp, int64_t width, at::Tensor& k_cache,
                        at::Tensor& v_cache, int64_t layer, const TokenRows& tokens,
                        int64_t n_head, int64_t n_kv_head, ThreadPool& pool, float* op) {
  const int64_t b_rows = tokens.rows;
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes(),
              "caches must be [layers, slots, kv heads, positions, head dim]");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf) && v_cache.scalar_type() == dtype &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous, both float32 or both float16");
  const int64_t n_slots = k_cache.size(1), max_t = k_cache.size(3), d = k_cache.size(4);
  TORCH_CHECK(k_cache.size(2) == n_kv_head && n_head % n_kv_head == 0, "head counts mismatch");
  TORCH_CHECK(layer >= 0 && layer < k_cache.size(0), "layer out of range");
  TORCH_CHECK(width == (n_head + 2 * n_kv_head) * d, "qkv width mismatch");
  TORCH_CHECK(tokens.cos_t.size(1) * 2 == d, "rope tables do not match the head size");
  for (int64_t b = 0; b < b_rows; ++b) {
    TORCH_CHECK(tokens.slot[b] >= 0 && tokens.slot[b] < n_slots, "slot out of range");
    TORCH_CHECK(tokens.pos[b] >= 0 && tokens.pos[b] < std::min(max_t, tokens.cos_t.size(0)),
                "position out of range");
  }
  const int64_t head_stride = max_t * d;
  const int64_t layer_offset = layer * n_slots * n_kv_head * head_stride;
  if (dtype == at::kHalf) {
    attend(xp, b_rows, width, k_cache.data_ptr<at::Half>() + layer_offset,
           v_cache.data_ptr<at::Half>() + layer_offset, head_stride, tokens.slot, tokens.pos,
           tokens.cp, tokens.sp, n_head, n_kv_head, d, pool, op);
  } else {
    attend(xp, b_rows, width, k_cache.data_ptr<float>() + layer_offset,
           v_cache.data_ptr<float>() + layer_offset, head_stride, tokens.slot, tokens.pos,
           tokens.cp, tokens.sp, n_head, n_kv_head, d, pool, op);
  }
}

inline at::Tensor token_attention(const at::Tensor& qkv, at::Tensor& k_cache,
                                   at::Tensor& v_cache, int64_t layer,
                                   const at::Tensor& slots, const at::Tensor& positions,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   int64_t n_head, int64_t n_kv_head, ThreadPool& pool) {
  const TokenRows tokens(slots, positions, cos, sin);
  const at::Tensor x = qkv.reshape({tokens.rows, -1}).to(at::kFloat).contiguous();
  TORCH_CHECK(k_cache.dim() == 5,  // attend_rows checks the rest; the head size is read here
              "caches must be [layers, slots, kv heads, positions, head dim]");
  at::Tensor out = at::empty({tokens.rows, n_head * k_cache.size(4)}, x.options());
  attend_rows(x.data_ptr<float>(), x.size(1), k_cache, v_cache, layer, tokens,
              n_head, n_kv_head, pool, out.data_ptr<float>());
  return qkv.scalar_type() == at::kFloat ? out : out.to(qkv.scalar_type());
}

}  // namespace nf4
