// Quantised linear layers for x86 CPUs: fused dequantisation and int8 dot products.
// NF4 and the 8-bit head are below; the GGUF file's own block layouts (u4, i8) have their
// tile kernels in native_tiles.h and share the threading, chunking and epilogues here.
//
// Weights stay in the NF4 format of agent/decoder/nf4.py (64-weight blocks, 32 bytes of
// split-half nibbles, one float16 scale per block). Per call:
//   1. each activation row is quantised to int8 per 64-block (scale = absmax / 127), and
//      each block's sum of those int8 values is kept;
//   2. for a weight block, one AND and one shift give 64 ordered 4-bit codes and PSHUFB
//      maps them through a 16-entry table to round(63 * codebook) + 63, an unsigned byte
//      in [0, 126] (the 7-bit codebook moved up by 63), PMADDUBSW's unsigned side;
//   3. PMADDUBSW/PMADDWD give the int32 dot product of the block, too large by 63 times
//      the activation block's sum;
//   4. the block result is scaled by weight scale * activation scale in one FMA, and the
//      excess (63 * activation sums, scaled the same way) is taken out once per output.
// The correction depends on the activations alone, so weights need no per-block extra
// data and no per-call set-up: their float16 scales are read in place.
// A decoded weight block is reused for up to MR activation rows while it sits in
// registers, so batched decode reads every weight byte once per step.
//
// The same loop serves 8-bit weights (agent/decoder/q8.py: int8 in [-127, 127], 64 per
// block, one float16 scale), which Parley uses for the output head: PMADDUBSW takes
// |w| as its unsigned side and the activation with w's sign as the signed one.
//
// Products never saturate: |xq| <= 127 and a moved code <= 126 keep each PMADDUBSW pair
// within 2 * 127 * 126 = 32004 < 32767; for 8-bit weights |xq| <= 127 and |w| <= 127
// keep it within 2 * 127 * 127 = 32258.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "native_tiles.h"
#include "thread_pool.h"
#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define NF4_SIMD 1
#else
#define NF4_SIMD 0
#endif

namespace {

// The kernels' own threads (the caller plus helpers), independent of torch's intra-op
// pool: set once by `set_threads` before the first kernel runs, else torch's thread count.
std::atomic<int> g_threads{0};

nf4::ThreadPool& pool() {
  static nf4::ThreadPool* instance = [] {
    const int wanted = g_threads.load() > 0 ? g_threads.load() : at::get_num_threads();
    return new nf4::ThreadPool(std::max(0, wanted - 1));
  }();
  return *instance;
}

constexpr int kBlock = 64;
constexpr int kBlockBytes = 32;
constexpr int kMaxRows = 8;  // activation rows sharing one decoded weight block

const float kCodebook[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int kCodeShift = 63;  // added to the 7-bit codes: unsigned for PMADDUBSW

// round(63 * codebook) (the 7-bit code the scalar path multiplies with) and the same
// moved up by kCodeShift (the unsigned byte the AVX2 path multiplies with).
struct Lut {
  alignas(16) int8_t code[16];
  alignas(16) uint8_t shifted[16];
  Lut() {
    for (int i = 0; i < 16; ++i) {
      code[i] = int8_t(std::lrint(63.0f * kCodebook[i]));
      shifted[i] = uint8_t(code[i] + kCodeShift);
    }
  }
};
const Lut kLut;

using nf4::QuantRows;  // activations quantised per row and block (native_tiles.h)

#if NF4_SIMD
// One whole 64-value block: q = round(x * 127 / amax) (nearest-even, as std::nearbyint
// rounds), the int8 values' sum added to `total`; returns amax. The same values as the
// scalar loop in a fraction of the instructions (a decode step quantises every linear's
// input, at up to 16 rows on one thread).
inline float quantise_block(const float* x, int8_t* q, int32_t* total) {
  __m256 v[8];
  const float amax = nf4::load_abs_max<8>(x, v);
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i qi[8];
  __m256i sum = _mm256_setzero_si256();
  for (int j = 0; j < 8; ++j) {
    qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    sum = _mm256_add_epi32(sum, qi[j]);
  }
  nf4::store_bytes32(qi, q);
  nf4::store_bytes32(qi + 4, q + 32);
  *total += nf4::lane_sum(sum);
  return amax;
}
#endif

void quantise_rows(const float* x, int64_t m, int64_t k, int64_t kp, bool sums,
                   QuantRows& out) {
  const int64_t nb = kp / kBlock;
  const int64_t nbp = nf4::pad8(nb);
  // Every element is written below except the (zero) padding past k.
  out.q.resize(m * kp);
  out.scale.assign(m * nbp, 0.0f);
  if (sums) out.excess.assign(m * nbp, 0.0f);
  constexpr int64_t kRowsPerChunk = 16;
  pool().run((m + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    const int64_t end = std::min(m, (chunk + 1) * kRowsPerChunk);
    for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) {
      const float* xr = x + r * k;
      int8_t* qr = out.q.data() + r * kp;
      std::fill(qr + k, qr + kp, int8_t(0));
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * kBlock;
        const int64_t k1 = std::min(k, k0 + kBlock);
        float amax = 0.0f;
        int32_t total = 0;
#if NF4_SIMD
        if (k1 - k0 == kBlock) {
          amax = quantise_block(xr + k0, qr + k0, &total);
        } else
#endif
        {
          for (int64_t i = k0; i < k1; ++i) amax = std::max(amax, std::fabs(xr[i]));
          const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
          for (int64_t i = k0; i < k1; ++i) {
            qr[i] = int8_t(std::nearbyint(xr[i] * inv));
            total += qr[i];
          }
        }
        out.scale[r * nbp + b] = amax / 127.0f / 63.0f;
        if (sums) out.excess[r * nbp + b] = float(kCodeShift * total);
      }
    }
  });
}

constexpr int kMaxBlocks = 256;  // K up to 16384

enum class Format { kNF4, kQ8 };

// Bytes per 64-weight block of a weight row.
constexpr int64_t block_bytes(Format f) { return f == Format::kNF4 ? 32 : 64; }

// Dot products of weight rows [0, n_rows) (row_bytes apart, float16 scales nb apart in
// `wscales`) with MR activation rows starting at r0: dots[n * MR + r]. Sums are stored
// four at a time, so `dots` needs four floats of room past its last row.
// One call covers a chunk's rows so the constants, the activation rows (in L1) and the
// loop set-up are paid once per chunk, not once per weight row. What is left per weight
// row (each activation row's scale table, started with its correction) is worth keeping
// lean: at K = 576 a row is only nine blocks.
template <Format F, int MR>
void tile_dots(const uint8_t* w, int64_t row_bytes, const at::Half* wscales, int64_t n_rows,
               const QuantRows& xq, int64_t r0, int64_t kp, float* dots) {
  const int64_t nb = kp / kBlock;
  const int64_t nbp = nf4::pad8(nb);
  // The activation scales carry the NF4 table's 1/63; 8-bit weights need it undone.
  constexpr float kUnit = F == Format::kNF4 ? 1.0f : 63.0f;
  // Per-block factor weight scale * activation scale, one table per activation row.
  alignas(32) float d[MR][kMaxBlocks];
#if NF4_SIMD
  const __m256i lut = _mm256_broadcastsi128_si256(
      _mm_load_si128(reinterpret_cast<const __m128i*>(kLut.shifted)));
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xrow = xq.q.data() + r0 * kp;
  constexpr int64_t kBytes = block_bytes(F);
  const __m256 unit = _mm256_set1_ps(kUnit);
  const int64_t whole = nb / 8 * 8;  // blocks whose scales load eight at a time
  for (int64_t n = 0; n < n_rows; ++n) {
    const uint8_t* wn = w + n * row_bytes;
    const at::Half* sn = wscales + n * nb;
    _mm_prefetch(reinterpret_cast<const char*>(sn + 8 * nb), _MM_HINT_T0);
    // The row's last nb % 8 scales, zero-padded, assembled in a register (a vector load
    // of values just stored one by one would stall on store forwarding). The float16
    // scales are read in place; the activation scales are zero past nb anyway.
    __m128i tail = _mm_setzero_si128();
    switch (nb - whole) {
      case 7: tail = _mm_insert_epi16(tail, sn[whole + 6].x, 6); [[fallthrough]];
      case 6: tail = _mm_insert_epi16(tail, sn[whole + 5].x, 5); [[fallthrough]];
      case 5: tail = _mm_insert_epi16(tail, sn[whole + 4].x, 4); [[fallthrough]];
      case 4: tail = _mm_insert_epi16(tail, sn[whole + 3].x, 3); [[fallthrough]];
      case 3: tail = _mm_insert_epi16(tail, sn[whole + 2].x, 2); [[fallthrough]];
      case 2: tail = _mm_insert_epi16(tail, sn[whole + 1].x, 1); [[fallthrough]];
      case 1: tail = _mm_insert_epi16(tail, sn[whole].x, 0); break;
      default: break;
    }
    const __m256 tail_scales = _mm256_cvtph_ps(tail);
    // Activation row r's table, and where its accumulator starts: NF4's moved codes make
    // each block's sum too large by 63 * the activation block's sum, so it starts at minus
    // sum_b d[r][b] * that excess (8-bit weights need no correction).
    auto table = [&](int r) __attribute__((always_inline)) {
      const float* xs = xq.scale.data() + (r0 + r) * nbp;
      __m256 start = _mm256_setzero_ps();
      for (int64_t b = 0; b < nbp; b += 8) {
        const __m256 ws = b < whole ? nf4::load8(sn + b) : tail_scales;
        const __m256 dv = _mm256_mul_ps(_mm256_mul_ps(ws, _mm256_loadu_ps(xs + b)), unit);
        _mm256_store_ps(&d[r][b], dv);
        if constexpr (F == Format::kNF4) {
          const float* excess = xq.excess.data() + (r0 + r) * nbp;
          start = _mm256_fnmadd_ps(dv, _mm256_loadu_ps(excess + b), start);
        }
      }
      return start;
    };
    // Named accumulators (not an array) so the compiler keeps them in registers.
    // Rows past MR stay zero: four_sums reads them.
    __m256 acc0 = table(0), acc1 = _mm256_setzero_ps(), acc2 = acc1, acc3 = acc1;
    __m256 acc4 = acc1, acc5 = acc1, acc6 = acc1, acc7 = acc1;
    if constexpr (MR > 1) acc1 = table(1);
    if constexpr (MR > 2) acc2 = table(2);
    if constexpr (MR > 3) acc3 = table(3);
    if constexpr (MR > 4) acc4 = table(4);
    if constexpr (MR > 5) acc5 = table(5);
    if constexpr (MR > 6) acc6 = table(6);
    if constexpr (MR > 7) acc7 = table(7);
    // lo, hi: the block's weights 0-31 and 32-63 as PMADDUBSW's unsigned operand.
    auto step = [&](__m256 acc, int r, int64_t b, __m256i lo, __m256i hi)
        __attribute__((always_inline)) {
      const int8_t* xb = xrow + r * kp + b * kBlock;
      __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
      __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32));
      __m256i p0, p1;
      if constexpr (F == Format::kQ8) {  // lo, hi hold |w|: move w's sign onto x
        const __m256i* wb = reinterpret_cast<const __m256i*>(wn + b * 64);
        p0 = _mm256_maddubs_epi16(lo, _mm256_sign_epi8(x0, _mm256_loadu_si256(wb)));
        p1 = _mm256_maddubs_epi16(hi, _mm256_sign_epi8(x1, _mm256_loadu_si256(wb + 1)));
      } else {  // lo, hi are the moved (unsigned) codes
        p0 = _mm256_maddubs_epi16(lo, x0);
        p1 = _mm256_maddubs_epi16(hi, x1);
      }
      const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(p0, ones),
                                         _mm256_madd_epi16(p1, ones));
      return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(&d[r][b]), acc);
    };
    for (int64_t b = 0; b < nb; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(wn + b * kBytes + 16 * kBytes), _MM_HINT_T0);
      __m256i lo, hi;
      if constexpr (F == Format::kNF4) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * 32));
        lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(packed, low_mask));
        hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask));
      } else {
        const __m256i* wb = reinterpret_cast<const __m256i*>(wn + b * 64);
        lo = _mm256_abs_epi8(_mm256_loadu_si256(wb));
        hi = _mm256_abs_epi8(_mm256_loadu_si256(wb + 1));
      }
      acc0 = step(acc0, 0, b, lo, hi);
      if constexpr (MR > 1) acc1 = step(acc1, 1, b, lo, hi);
      if constexpr (MR > 2) acc2 = step(acc2, 2, b, lo, hi);
      if constexpr (MR > 3) acc3 = step(acc3, 3, b, lo, hi);
      if constexpr (MR > 4) acc4 = step(acc4, 4, b, lo, hi);
      if constexpr (MR > 5) acc5 = step(acc5, 5, b, lo, hi);
      if constexpr (MR > 6) acc6 = step(acc6, 6, b, lo, hi);
      if constexpr (MR > 7) acc7 = step(acc7, 7, b, lo, hi);
    }
    // Four horizontal sums at once: lane i of the result is row i's total.
    auto four_sums = [](__m256 a, __m256 b, __m256 c, __m256 e, float* out)
        __attribute__((always_inline)) {
      const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, e));
      _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(pairs),
                                    _mm256_extractf128_ps(pairs, 1)));
    };
    four_sums(acc0, acc1, acc2, acc3, dots + n * MR);  // rows past MR are overwritten next
    if constexpr (MR > 4) four_sums(acc4, acc5, acc6, acc7, dots + n * MR + 4);
  }
#else
  for (int64_t n = 0; n < n_rows; ++n) {
    const uint8_t* wn = w + n * row_bytes;
    const at::Half* sn = wscales + n * nb;
    for (int r = 0; r < MR; ++r) {
      const int8_t* xr = xq.q.data() + (r0 + r) * kp;
      const float* xs = xq.scale.data() + (r0 + r) * nbp;
      float total = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        if constexpr (F == Format::kNF4) {
          const int8_t* xb = xr + b * kBlock;
          for (int j = 0; j < kBlockBytes; ++j) {
            const uint8_t byte = wn[b * kBlockBytes + j];
            dot += int32_t(kLut.code[byte & 0x0F]) * xb[j];
            dot += int32_t(kLut.code[byte >> 4]) * xb[j + 32];
          }
        } else {
          const int8_t* wb = reinterpret_cast<const int8_t*>(wn) + b * kBlock;
          for (int j = 0; j < kBlock; ++j) dot += int32_t(wb[j]) * xr[b * kBlock + j];
        }
        total += float(dot) * nf4::to_float(sn[b]) * xs[b] * kUnit;
      }
      dots[n * MR + r] = total;
    }
  }
#endif
}

// Every weight layout the kernels read; the numbers are the Python side's (kernels/cpu.py).
enum class Kind : int64_t { kNF4 = 0, kQ8 = 1, kU4 = 2, kI8 = 3, kI8x16 = 4 };

// A quantised weight as the kernels read it.
struct Weight {
  Kind kind;
  const uint8_t* codes;
  const void* scales;   // NF4/Q8: float16 [N, Kp/64]; native: [N, pad8(Kp/G)]
  const void* offsets;  // native only, [N, pad8(Kp/32)]; nullptr for none
  bool half;            // native scales and offsets are float16 (else float32)
  const float* bias;    // nullptr for none
  int64_t rows, kp;
  // Native only: activation passes, 1 (int8) or 2 (int8 and its rounding error, a 16-bit
  // value in two bytes; see native_tiles.h).
  int passes = 1;
};

bool is_native(Kind k) { return k == Kind::kU4 || k == Kind::kI8 || k == Kind::kI8x16; }

// Bytes of codes per weight row.
int64_t code_bytes(const Weight& w) {
  return (w.kind == Kind::kNF4 || w.kind == Kind::kU4) ? w.kp / 2 : w.kp;
}

// Dot products of weight rows [n0, n0 + n) with MR activation rows from r0 (see tile_dots).
using Tile = void (*)(const Weight&, int64_t, int64_t, const QuantRows&, int64_t, float*);

template <Format F, int MR>
void legacy_tile(const Weight& w, int64_t n0, int64_t n, const QuantRows& xq, int64_t r0,
                 float* dots) {
  const int64_t nb = w.kp / kBlock;
  const int64_t row_bytes = nb * block_bytes(F);
  tile_dots<F, MR>(w.codes + n0 * row_bytes, row_bytes,
                   static_cast<const at::Half*>(w.scales) + n0 * nb, n, xq, r0, w.kp, dots);
}

template <nf4::Native F, typename S, int MR, bool Fine>
void native_tile(const Weight& w, int64_t n0, int64_t n, const QuantRows& xq, int64_t r0,
                 float* dots) {
  const int64_t n32p = nf4::pad8(w.kp / 32);
  const nf4::NativeView<S> view{
      w.codes + n0 * nf4::native_row_bytes<F>(w.kp),
      static_cast<const S*>(w.scales) + n0 * nf4::pad8(w.kp / nf4::group_size<F>()),
      w.offsets ? static_cast<const S*>(w.offsets) + n0 * n32p : nullptr, w.kp};
  nf4::native_dots<F, S, MR, Fine>(view, n, xq, r0, dots);
}

template <Format F>
constexpr Tile kLegacyTiles[kMaxRows + 1] = {
    nullptr,           legacy_tile<F, 1>, legacy_tile<F, 2>, legacy_tile<F, 3>,
    legacy_tile<F, 4>, legacy_tile<F, 5>, legacy_tile<F, 6>, legacy_tile<F, 7>,
    legacy_tile<F, 8>};

template <nf4::Native F, typename S, bool Fine>
constexpr Tile kNativeTiles[kMaxRows + 1] = {
    nullptr,                       native_tile<F, S, 1, Fine>, native_tile<F, S, 2, Fine>,
    native_tile<F, S, 3, Fine>,    native_tile<F, S, 4, Fine>, native_tile<F, S, 5, Fine>,
    native_tile<F, S, 6, Fine>,    native_tile<F, S, 7, Fine>, native_tile<F, S, 8, Fine>};

template <nf4::Native F, bool Fine>
Tile native_tile_for(const Weight& w, int rows) {
  return w.half ? kNativeTiles<F, at::Half, Fine>[rows] : kNativeTiles<F, float, Fine>[rows];
}

template <nf4::Native F>
Tile native_tile_for(const Weight& w, int rows) {
  return w.passes == 2 ? native_tile_for<F, true>(w, rows) : native_tile_for<F, false>(w, rows);
}

Tile tile_for(const Weight& w, int rows) {
  switch (w.kind) {
    case Kind::kNF4: return kLegacyTiles<Format::kNF4>[rows];
    case Kind::kQ8: return kLegacyTiles<Format::kQ8>[rows];
    case Kind::kU4: return native_tile_for<nf4::Native::kU4>(w, rows);
    case Kind::kI8: return native_tile_for<nf4::Native::kI8>(w, rows);
    case Kind::kI8x16: return native_tile_for<nf4::Native::kI8x16>(w, rows);
  }
  return nullptr;
}

// Epilogue applied to the raw dot products of output column n (and its partner row for
// fused gate/up pairs).
enum class Epilogue { kNone, kSwiGLU };

// Runs the weight rows [n_begin, n_end) against every activation row.
// kNone:   out[m, n] = dot(x[m], W[n]) + bias[n]  (+ residual[m, n] where given)
// kSwiGLU: out[m, n] = silu(dot(x[m], W[n]) + b[n]) * (dot(x[m], W[n + F]) + b[n + F])
// Activation rows go MR at a time over the whole chunk of weight rows, which then stays in
// L1 for the next MR rows (prefill), instead of each weight row streaming every activation.
void run_rows(const Weight& w, const QuantRows& xq, int64_t m, int64_t n_begin, int64_t n_end,
              int64_t out_stride, int64_t partner, Epilogue epilogue, const float* residual,
              float* out) {
  const float* bias = w.bias;
  const int64_t width = n_end - n_begin;
  const bool swiglu = epilogue == Epilogue::kSwiGLU;
  // The raw dot products of the chunk's rows (and of their SwiGLU partners).
  thread_local std::vector<float> dots, dots2, ups;
  dots.resize(width * kMaxRows + 4);
  dots2.resize(width * kMaxRows + 4);
  ups.resize(width);
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
    const int rows = int(std::min<int64_t>(kMaxRows, m - r0));
    const Tile kernel = tile_for(w, rows);
    kernel(w, n_begin, width, xq, r0, dots.data());
    if (swiglu) kernel(w, n_begin + partner, width, xq, r0, dots2.data());
    for (int r = 0; r < rows; ++r) {
      float* o = out + (r0 + r) * out_stride + n_begin;
      for (int64_t i = 0; i < width; ++i) {
        o[i] = dots[i * rows + r] + (bias ? bias[n_begin + i] : 0.0f);
      }
      if (residual != nullptr) {  // the same sum as adding the two tensors afterwards
        const float* res = residual + (r0 + r) * out_stride + n_begin;
        for (int64_t i = 0; i < width; ++i) o[i] = res[i] + o[i];
      }
      if (!swiglu) continue;
      // Gates are in `o`; the activation runs eight columns at a time.
      for (int64_t i = 0; i < width; ++i) {
        ups[i] = dots2[i * rows + r] + (bias ? bias[n_begin + partner + i] : 0.0f);
      }
      nf4::silu_mul_n(o, ups.data(), o, width);
    }
  }
}

// A bias as float32, one value per weight row; undefined for none.
at::Tensor float_bias(const c10::optional<at::Tensor>& bias, int64_t rows) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  at::Tensor b = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(b.numel() == rows, "bias must have one value per weight row");
  return b;
}

// The weight's tensors checked against its layout; `offsets` undefined for none.
Weight checked(Kind kind, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& offsets, const at::Tensor& bias, int64_t passes = 1) {
  TORCH_CHECK(passes == 1 || (passes == 2 && is_native(kind)),
              "activations take one pass, or two for the native layouts; not ", passes);
  const bool packed = kind == Kind::kNF4 || kind == Kind::kU4;
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.dtype() == (packed ? at::kByte : at::kChar),
              packed ? "qweight must be contiguous uint8 [N, Kp/2]"
                     : "qweight must be contiguous int8 [N, Kp]");
  const int64_t rows = qweight.size(0);
  const int64_t kp = qweight.size(1) * (packed ? 2 : 1);
  TORCH_CHECK(kp % kBlock == 0, "padded in_features must be a multiple of 64, not ", kp);
  TORCH_CHECK(kp <= nf4::kMaxGroups * 16 && kp / kBlock <= kMaxBlocks, "in_features above ",
              kMaxBlocks * kBlock);
  TORCH_CHECK(scales.is_contiguous(), "scales must be contiguous");
  bool half = true;
  if (!is_native(kind)) {
    TORCH_CHECK(scales.dtype() == at::kHalf && scales.numel() == rows * (kp / kBlock),
                "scales must be float16 [N, Kp/64]");
    TORCH_CHECK(!offsets.defined(), "NF4 and 8-bit head weights take no offsets");
  } else {
    half = scales.dtype() == at::kHalf;
    TORCH_CHECK(half || scales.dtype() == at::kFloat, "scales must be float16 or float32");
    const int64_t group = kind == Kind::kI8x16 ? 16 : 32;
    TORCH_CHECK(scales.numel() == rows * nf4::pad8(kp / group),
                "scales must be [N, pad8(Kp / ", group, ")]");
    if (offsets.defined()) {
      TORCH_CHECK(offsets.is_contiguous() && offsets.dtype() == scales.dtype() &&
                      offsets.numel() == rows * nf4::pad8(kp / 32),
                  "offsets must be contiguous [N, pad8(Kp / 32)] in the scales' dtype");
    }
  }
  return {kind, static_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr(),
          offsets.defined() ? offsets.data_ptr() : nullptr, half,
          bias.defined() ? bias.data_ptr<float>() : nullptr, rows, kp, int(passes)};
}

// Activations for a native weight: int8 per 32 values (and with two passes their
// rounding error in q_lo), scales and scaled sums.
void quantise_rows32(const float* x, int64_t m, int64_t k, int64_t kp, int passes,
                     QuantRows& out) {
  const int64_t nbp = nf4::pad8(kp / 32);
  out.q.resize(m * kp);
  out.q_lo.resize(passes == 2 ? m * kp : 0);
  out.scale.resize(m * nbp);
  out.excess.resize(m * nbp);
  constexpr int64_t kRowsPerChunk = 16;
  pool().run((m + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    const int64_t end = std::min(m, (chunk + 1) * kRowsPerChunk);
    for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) {
      nf4::quantise_row32(x + r * k, k, kp, out.q.data() + r * kp,
                          passes == 2 ? out.q_lo.data() + r * kp : nullptr,
                          out.scale.data() + r * nbp, out.excess.data() + r * nbp);
    }
  });
}

// Bytes a weight row occupies (codes and scales), for sizing chunks.
int64_t row_bytes(const Weight& w) {
  if (!is_native(w.kind)) return w.kp / kBlock * block_bytes(
      w.kind == Kind::kNF4 ? Format::kNF4 : Format::kQ8);
  const int64_t group = w.kind == Kind::kI8x16 ? 16 : 32;
  return code_bytes(w) + (w.kp / group) * (w.half ? 2 : 4) * (w.offsets ? 2 : 1);
}

// out[m, n] = x[m, :k] . W[n] + bias[n] (+ residual[m, n]) for float rows x and out; with
// `swiglu` W is [gate; up] and out has half its rows as columns.
void linear_rows(const Weight& w, const float* x, int64_t m, int64_t k, bool swiglu,
                 const float* residual, float* out) {
  TORCH_CHECK(k <= w.kp && w.kp - k < kBlock, "input features ", k, " do not match weight ",
              w.kp);
  TORCH_CHECK(!swiglu || w.rows % 2 == 0, "fused gate/up weight needs an even row count");
  if (m == 0) return;
  const int64_t kp = w.kp;
  const int64_t n_out = swiglu ? w.rows / 2 : w.rows;
  // Reused per calling thread (no allocation once warm). The lambdas below must see this
  // thread's buffers, not their own thread_local copies, hence the plain reference.
  thread_local QuantRows buffers;
  QuantRows& xq = buffers;
  if (is_native(w.kind)) {
    quantise_rows32(x, m, k, kp, w.passes, xq);
  } else {
    quantise_rows(x, m, k, kp, w.kind == Kind::kNF4, xq);
  }
  // Decode (one tile of activation rows): chunks of about 2^16 multiply-adds and at least
  // eight per call, small enough that the threads finish together and a late helper
  // costs little.
  // Prefill (more rows than one tile): each tile of activation rows is read into L1 once
  // per chunk and then meets every weight row of it, so chunks hold about 16 KiB of
  // weights (from L2 a block of weights costs 32 bytes per tile, its activations 512),
  // and still at least eight per call.
  const int64_t per_row = kp * m * (swiglu ? 2 : 1);
  const int64_t weight_bytes = row_bytes(w) * (swiglu ? 2 : 1);
  int64_t rows = m > kMaxRows
      ? std::clamp<int64_t>(std::min<int64_t>(16384 / weight_bytes, n_out / 8), 16, 512)
      : std::clamp<int64_t>(std::min<int64_t>((int64_t(1) << 16) / per_row,
                                              (n_out + 7) / 8), 8, 512);
  rows = (rows + 7) / 8 * 8;  // the SwiGLU epilogue then runs without a partial vector
  const Epilogue ep = swiglu ? Epilogue::kSwiGLU : Epilogue::kNone;
  pool().run((n_out + rows - 1) / rows, [&](int64_t chunk) {
    const int64_t begin = chunk * rows;
    run_rows(w, xq, m, begin, std::min(n_out, begin + rows), n_out, n_out, ep, residual, out);
  });
}

at::Tensor forward(const at::Tensor& x, const Weight& w, bool swiglu) {
  const int64_t k = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t n_out = swiglu ? w.rows / 2 : w.rows;
  at::Tensor out = at::empty({x2.size(0), n_out}, x2.options());
  linear_rows(w, x2.data_ptr<float>(), x2.size(0), k, swiglu, nullptr, out.data_ptr<float>());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n_out;
  out = out.reshape(out_shape);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor kind_forward(Kind kind, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& x,
                        bool swiglu, int64_t passes = 1) {
  const at::Tensor bias_f = float_bias(bias, qweight.size(0));
  const at::Tensor offs =
      offsets.has_value() && offsets->numel() ? *offsets : at::Tensor();
  return forward(x, checked(kind, qweight, scales, offs, bias_f, passes), swiglu);
}

// Arguments put the weight first so Python can bind them once (functools.partial).
at::Tensor nf4_linear(const at::Tensor& qweight, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  return kind_forward(Kind::kNF4, qweight, scales, c10::nullopt, bias, x, false);
}

at::Tensor q8_linear(const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  return kind_forward(Kind::kQ8, qweight, scales, c10::nullopt, bias, x, false);
}

at::Tensor nf4_swiglu(const at::Tensor& qweight, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  return kind_forward(Kind::kNF4, qweight, scales, c10::nullopt, bias, x, true);
}

// Any layout by its number (Kind), with its activations' passes: the native formats'
// entry point.
at::Tensor weight_linear(int64_t kind, bool swiglu, int64_t passes, const at::Tensor& qweight,
                         const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  TORCH_CHECK(kind >= 0 && kind <= 4, "unknown weight layout ", kind);
  return kind_forward(static_cast<Kind>(kind), qweight, scales, offsets, bias, x, swiglu,
                      passes);
}

// op[r] = xp[r] / rms(xp[r]) * wp for m rows of d floats (sums of squares in double).
void norm_rows(const float* xp, int64_t m, int64_t d, const float* wp, double eps, float* op) {
  constexpr int64_t kRowsPerChunk = 32;
  pool().run((m + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    const int64_t end = std::min(m, (chunk + 1) * kRowsPerChunk);
    for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) {
      const float* xr = xp + r * d;
      double ss = 0.0;
      for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * xr[i];
      const float inv = float(1.0 / std::sqrt(ss / double(d) + eps));
      for (int64_t i = 0; i < d; ++i) op[r * d + i] = xr[i] * inv * wp[i];
    }
  });
}

// y = x / rms(x) * weight over the last dimension (float32 math, output in x's dtype).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.numel() == d, "norm weight has ", weight.numel(), " values for ", d);
  const at::Tensor x2 = x.reshape({-1, d}).to(at::kFloat).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(x2);
  norm_rows(x2.data_ptr<float>(), x2.size(0), d, w.data_ptr<float>(), eps,
            out.data_ptr<float>());
  out = out.reshape(x.sizes());
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor token_attention(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                           int64_t layer, const at::Tensor& slots, const at::Tensor& positions,
                           const at::Tensor& cos, const at::Tensor& sin, int64_t n_head,
                           int64_t n_kv_head) {
  return nf4::token_attention(qkv, k_cache, v_cache, layer, slots, positions, cos, sin,
                              n_head, n_kv_head, pool());
}

// New tokens (rows with a slot and a position each, as token_attention takes them)
// through a whole transformer block:
//   h = x + wo(attention(norm1(x)));  out = h + w2(swiglu(w13(norm2(h))))
// with the same kernels the PyTorch modules call one by one (model.TransformerBlock with
// NF4 linears), so the result is the same to the bit. One Python call per layer instead
// of about ten, and inside it raw buffers of this thread's instead of tensors: each
// tensor op (an allocation, a dtype check, an add) cost a few microseconds, ~30 a layer.
// `w` holds norm1, wqkv (qweight, scales, offsets), wo (the same three), norm2, w13
// (three), w2 (three), with an undefined tensor for absent offsets; `kinds` gives each
// linear's layout (Kind) and `passes` its activations' passes. Weights come first so
// Python can bind them once.
at::Tensor block_forward(const std::vector<at::Tensor>& w, const std::vector<int64_t>& kinds,
                         const std::vector<int64_t>& passes,
                         const c10::optional<at::Tensor>& qkv_bias, double eps,
                         const at::Tensor& x, at::Tensor& k_cache, at::Tensor& v_cache,
                         int64_t layer, const at::Tensor& slots, const at::Tensor& positions,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t n_head,
                         int64_t n_kv_head) {
  TORCH_CHECK(w.size() == 14, "block_forward takes 14 weight tensors, not ", w.size());
  TORCH_CHECK(kinds.size() == 4, "block_forward takes 4 weight layouts, not ", kinds.size());
  for (int64_t k : kinds) TORCH_CHECK(k >= 0 && k <= 4, "unknown weight layout ", k);
  TORCH_CHECK(passes.size() == 4, "block_forward takes 4 pass counts, not ", passes.size());
  const int64_t m = slots.numel();
  const at::Tensor rows = x.reshape({m, -1}).to(at::kFloat).contiguous();
  const int64_t dim = rows.size(1);
  for (int i : {0, 7}) {
    TORCH_CHECK(w[i].scalar_type() == at::kFloat && w[i].is_contiguous() &&
                    w[i].numel() == dim, "norm weights must be contiguous float32 [dim]");
  }
  const at::Tensor bias_f = float_bias(qkv_bias, w[1].size(0));
  const at::Tensor none;
  auto linear = [&](int slot, int first, const at::Tensor& bias) {
    const at::Tensor& offsets = w[first + 2];  // an empty tensor for none
    return checked(static_cast<Kind>(kinds[slot]), w[first], w[first + 1],
                   offsets.numel() ? offsets : none, bias, passes[slot]);
  };
  const Weight wqkv = linear(0, 1, bias_f);
  const Weight wo = linear(1, 4, none);
  const Weight w13 = linear(2, 8, none);
  const Weight w2 = linear(3, 11, none);
  TORCH_CHECK(wo.rows == dim && w2.rows == dim, "output projections must give dim columns");
  const nf4::TokenRows tokens(slots, positions, cos, sin);
  const int64_t head_dim = k_cache.size(-1);
  const int64_t hidden = w13.rows / 2;
  // Intermediates in this thread's buffers (reused, no allocation once warm); only the
  // block's output is a new tensor.
  thread_local std::vector<float> normed, qkv, attended, h, gated;
  normed.resize(m * dim);
  qkv.resize(m * wqkv.rows);
  attended.resize(m * n_head * head_dim);
  h.resize(m * dim);
  gated.resize(m * hidden);
  at::Tensor out = at::empty({m, dim}, rows.options());
  norm_rows(rows.data_ptr<float>(), m, dim, w[0].data_ptr<float>(), eps, normed.data());
  linear_rows(wqkv, normed.data(), m, dim, false, nullptr, qkv.data());
  nf4::attend_rows(qkv.data(), wqkv.rows, k_cache, v_cache, layer, tokens, n_head,
                   n_kv_head, pool(), attended.data());
  linear_rows(wo, attended.data(), m, n_head * head_dim, false,
                            rows.data_ptr<float>(), h.data());
  norm_rows(h.data(), m, dim, w[7].data_ptr<float>(), eps, normed.data());
  linear_rows(w13, normed.data(), m, dim, true, nullptr, gated.data());
  linear_rows(w2, gated.data(), m, hidden, false, h.data(),
                            out.data_ptr<float>());
  return out.reshape(x.sizes()).to(x.scalar_type());
}

bool simd_enabled() { return NF4_SIMD == 1; }

int threads() { return pool().size(); }

// Returns the thread count in effect: `n` unless the pool already runs with another one.
int set_threads(int n) {
  TORCH_CHECK(n >= 1, "thread count must be at least 1");
  g_threads.store(n);
  return pool().size();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs: the event loop keeps serving meanwhile.
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("linear", &nf4_linear, release(), "y = x @ dequant(W).T + bias (int8 activations)");
  m.def("q8_linear", &q8_linear, release(),
        "y = x @ dequant(W).T + bias for 8-bit weights (int8 activations)");
  m.def("swiglu", &nf4_swiglu, release(),
        "silu(x @ Wg.T + bg) * (x @ Wu.T + bu), W = [Wg; Wu]");
  m.def("rms_norm", &rms_norm, release(), "x / rms(x) * weight over the last dimension");
  m.def("token_attention", &token_attention, release(),
        "attention for new tokens: RoPE, k and v into the cache, softmax(q.K) V");
  m.def("block_forward", &block_forward, release(),
        "new tokens through a whole transformer block with quantised linears");
  m.def("weight_linear", &weight_linear, release(),
        "y = x @ dequant(W).T + bias (or its SwiGLU) for a weight of any layout");
  m.def("simd_enabled", &simd_enabled, "whether the AVX2/FMA/F16C path was compiled");
  m.def("threads", &threads, "threads the kernels use (the caller plus helpers)");
  m.def("set_threads", &set_threads, "fix the kernels' thread count (before first use)");
}
