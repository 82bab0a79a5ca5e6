// Attention for new tokens in one call, each token a row with its own cache slot and
// position: RoPE on the q and k heads, every row's k and v written into the cache first,
// then softmax(q.K/sqrt(D)) over positions 0..pos of the row's slot, times V. A decode
// step is one row per stream; a prompt chunk is rows of one slot at consecutive positions,
// which makes the same loop causal. What model.Attention does with ~12 PyTorch ops and
// scaled_dot_product_attention, at a few microseconds of dispatch instead of ~150 per
// layer. Same maths in float32; the rotate-half RoPE layout.
//
// Shapes: qkv [R, (H + 2 Hkv) D]; caches [L, S, Hkv, T, D] (model.KVCache); slots and
// positions int64 [R]; cos, sin [context, D / 2]. Returns [R, H D].

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "thread_pool.h"
#include "vec_math.h"

namespace nf4 {

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

// out[D] = sum_t p[t] v[t] for t < n, v rows `d` apart; accumulators stay in registers.
inline void weighted_rows(const float* p, const float* v, int64_t n, int64_t d, float* out) {
  int64_t d0 = 0;
#if NF4_VEC_MATH
  for (; d0 + 32 <= d; d0 += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t t = 0; t < n; ++t) {
      const float* row = v + t * d + d0;
      const __m256 w = _mm256_broadcast_ss(p + t);
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 16), a2);
      a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 24), a3);
    }
    _mm256_storeu_ps(out + d0, a0);
    _mm256_storeu_ps(out + d0 + 8, a1);
    _mm256_storeu_ps(out + d0 + 16, a2);
    _mm256_storeu_ps(out + d0 + 24, a3);
  }
#endif
  if (d0 < d) {
    std::fill(out + d0, out + d, 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = d0; i < d; ++i) out[i] += p[t] * v[t * d + i];
    }
  }
}

inline at::Tensor token_attention(const at::Tensor& qkv, at::Tensor& k_cache,
                                   at::Tensor& v_cache, int64_t layer,
                                   const at::Tensor& slots, const at::Tensor& positions,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   int64_t n_head, int64_t n_kv_head, ThreadPool& pool) {
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes(),
              "caches must be [layers, slots, kv heads, positions, head dim]");
  TORCH_CHECK(k_cache.dtype() == at::kFloat && v_cache.dtype() == at::kFloat &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous float32");
  const int64_t n_slots = k_cache.size(1), max_t = k_cache.size(3), d = k_cache.size(4);
  TORCH_CHECK(k_cache.size(2) == n_kv_head && n_head % n_kv_head == 0, "head counts mismatch");
  TORCH_CHECK(layer >= 0 && layer < k_cache.size(0), "layer out of range");
  const int64_t b_rows = slots.numel();
  const at::Tensor x = qkv.reshape({b_rows, -1}).to(at::kFloat).contiguous();
  TORCH_CHECK(x.size(1) == (n_head + 2 * n_kv_head) * d, "qkv width mismatch");
  TORCH_CHECK(positions.numel() == b_rows, "one position per row");
  const at::Tensor slot_t = slots.to(at::kLong).contiguous();
  const at::Tensor pos_t = positions.to(at::kLong).contiguous();
  const at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  TORCH_CHECK(c.dim() == 2 && c.size(1) * 2 == d && c.sizes() == s.sizes(), "rope tables");
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < b_rows; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < n_slots, "slot out of range");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < std::min(max_t, c.size(0)), "position out of range");
  }
  const float* xp = x.data_ptr<float>();
  const int64_t width = x.size(1);
  const int64_t head_stride = max_t * d;
  const int64_t layer_stride = n_slots * n_kv_head * head_stride;
  float* kc = k_cache.data_ptr<float>() + layer * layer_stride;
  float* vc = v_cache.data_ptr<float>() + layer * layer_stride;
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t half = d / 2;

  // The new keys (rotated) and values first: the row's query heads, and later rows of
  // the same slot, read them.
  for (int64_t b = 0; b < b_rows; ++b) {
    for (int64_t g = 0; g < n_kv_head; ++g) {
      const int64_t at = (slot[b] * n_kv_head + g) * head_stride + pos[b] * d;
      rope_rotate(xp + b * width + (n_head + g) * d, cp + pos[b] * half, sp + pos[b] * half,
                  d, 1.0f, kc + at);
      std::copy_n(xp + b * width + (n_head + n_kv_head + g) * d, d, vc + at);
    }
  }

  at::Tensor out = at::empty({b_rows, n_head * d}, x.options());
  float* op = out.data_ptr<float>();
  const int64_t group = n_head / n_kv_head;
  const float scale = 1.0f / std::sqrt(float(d));
  pool.run(b_rows * n_head, [&](int64_t task) {
    const int64_t b = task / n_head, h = task % n_head;
    const int64_t n = pos[b] + 1;  // keys 0..pos
    const int64_t base = (slot[b] * n_kv_head + h / group) * head_stride;
    thread_local std::vector<float> q, scores;
    q.resize(d);
    scores.resize(n);
    rope_rotate(xp + b * width + h * d, cp + pos[b] * half, sp + pos[b] * half, d, scale,
                q.data());
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      scores[t] = dot(q.data(), kc + base + t * d, d);
      top = std::max(top, scores[t]);
    }
    const float inv = 1.0f / exp_shifted_sum(scores.data(), n, top);
    float* y = op + b * n_head * d + h * d;
    weighted_rows(scores.data(), vc + base, n, d, y);
    for (int64_t i = 0; i < d; ++i) y[i] *= inv;
  });
  return qkv.scalar_type() == at::kFloat ? out : out.to(qkv.scalar_type());
}

}  // namespace nf4
