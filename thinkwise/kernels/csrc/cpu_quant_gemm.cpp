// Quantized-weight linear layers for x86 CPUs (thinkwise.kernels.cpu_quant_gemm): built once with
// AVX-512 VNNI (operators thinkwise_cpu::*) and, for CPUs without it, once with AVX2 + FMA + F16C
// (-DTHINKWISE_AVX2, operators thinkwise_cpu_avx2::*): same layout, same results.
//
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) where W is stored in blocks of 32 weights along k:
// unsigned codes c, one fp16 scale s per block and, for 4-bit codes, one fp16 offset o per
// block: W = s * c + o (4-bit: c in 0..15, GGUF Q4_1/Q4_K-like; 5-bit: c = q + 16 in 0..31, the
// offset implicitly -16 * s, GGUF Q5_0; 8-bit: c = q + 128 in 1..255, the offset implicitly
// -128 * s, GGUF Q8_0). The activations are quantized per row and block of 32 to int8 with a
// scale of their own (llama.cpp's Q8_0 approach), so a block's dot product is integer work
// (vpdpbusd: unsigned codes x signed activations), scaled in float by s * s_x; the offset
// term is o * (s_x * sum of the block's int8 activations). The result is exactly
// dequant(W) . dequant(quant(x)) up to float summation order: the PyTorch twin in
// cpu_quant_gemm.py.
//
// Layout (built by cpu_quant_gemm.layout): 16 weight rows are interleaved so that one
// 512-bit register holds 4 consecutive codes of each of the 16 rows; a vpdpbusd against 4
// activation bytes broadcast to every lane then adds 4 products to each row's own lane, and
// the 16 lanes are the 16 outputs: no horizontal sums, and the block's scales are one vector
// of 16 fp16 per block. Per tile of 16 rows and block of 32 inputs ("step" s = inputs 4s..4s+3,
// "lane" l = row 16t + l, "q" = byte within the step):
//   8-bit: 512 bytes [s 0..7][l][q];
//   4-bit: 256 bytes [t 0..3][l][q], low nibble step t, high nibble step t + 4;
//   5-bit: those 256 bytes of low nibbles, then 64 bytes of bit planes [l][q]: bit s is the fifth
//          bit of step s (one shift and one mask put step s's fifth bits in place in every byte).
// Scales (and 4-bit offsets) are [tiles, blocks, 16] fp16; rows are padded to 16 with zero scales.
// Threads: tiles of 16 rows are claimed by the caller and helper threads of our own
// (TilePool), at::get_num_threads() in all; the caller never waits for a helper to start.

#include <ATen/Parallel.h>  // at::get_num_threads
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <type_traits>
#include <utility>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace {

// For the helpers of a block's inner loop: GCC otherwise leaves some out of line once a tile is
// instantiated for every row count, and their register arrays then go through memory.
#define TW_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlock = 32;
constexpr int kLanes = 16;  // weight rows per tile: one float lane each

constexpr int64_t block_bytes(int64_t bits) { return bits == 8 ? 512 : bits == 5 ? 320 : 256; }

struct QuantizedActivations {
  QuantizedActivations(int64_t rows_, int64_t k_)
      : rows(rows_), k(k_), blocks(k_ / kBlock), codes(rows_ * k_), scales(rows_ * blocks), block_sums(rows_ * blocks) {}
  int64_t rows, k, blocks;
  std::vector<int8_t> codes;      // [rows, K]
  std::vector<float> scales;      // [rows, blocks]
  std::vector<float> block_sums;  // [rows, blocks]: offset_factor * s_x * sum of the block's codes
};

// Activation rows multiplied per pass over a tile's weights: each block's codes are read (and,
// below 8 bits, decoded) once a pass, so more rows a pass is less decode work a row.
constexpr int kTokensPerTile = 8;

// Calls pass(m0, std::integral_constant<int, MR>{}) over `rows` activation rows: passes of
// kTokensPerTile rows, then one pass of the remaining rows.
template <typename Pass>
inline void row_passes(int64_t rows, const Pass& pass) {
  int64_t m0 = 0;
  for (; m0 + kTokensPerTile <= rows; m0 += kTokensPerTile) pass(m0, std::integral_constant<int, kTokensPerTile>{});
  switch (rows - m0) {
    case 7: pass(m0, std::integral_constant<int, 7>{}); break;
    case 6: pass(m0, std::integral_constant<int, 6>{}); break;
    case 5: pass(m0, std::integral_constant<int, 5>{}); break;
    case 4: pass(m0, std::integral_constant<int, 4>{}); break;
    case 3: pass(m0, std::integral_constant<int, 3>{}); break;
    case 2: pass(m0, std::integral_constant<int, 2>{}); break;
    case 1: pass(m0, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

#ifndef THINKWISE_AVX2
// ---------------------------------------------------------------------------------- AVX-512 VNNI

constexpr float offset_factor(int bits) { return bits == 4 ? 1.f : bits == 5 ? -16.f : -128.f; }

inline __m512 load16_as_float(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_as_float(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
QuantizedActivations quantize_activations(const T* x, int64_t rows, int64_t k, float factor) {
  QuantizedActivations a(rows, k);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < a.blocks; ++b) {
      const T* src = x + m * k + b * kBlock;
      __m512 lo = load16_as_float(src), hi = load16_as_float(src + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      float scale = amax / 127.f;
      __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      // Round half to even (the MXCSR default), as torch.round in the twin.
      __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
      __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      int8_t* dst = a.codes.data() + m * k + b * kBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q_hi));
      int32_t code_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
      a.scales[m * a.blocks + b] = scale;
      a.block_sums[m * a.blocks + b] = factor * scale * static_cast<float>(code_sum);
    }
  }
  return a;
}

inline void store16(float* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }
inline void store16(c10::BFloat16* dst, __m512 v, __mmask16 mask) {
  // Round to nearest even, as c10::BFloat16(float) does for finite values.
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// Step S's fifth bits into the low-nibble codes w[S]: bit S of each plane byte moved to bit 4
// by a 16-bit shift (the bits it carries over from the neighbouring byte land below bit 4 or
// above it, never on it), then w | (moved & 0x10) in one vpternlogd (0xF8 = A | (B & C)).
template <int S>
TW_ALWAYS_INLINE __m512i move_bit_to_4(__m512i planes) {
  if constexpr (S < 4) return _mm512_slli_epi16(planes, 4 - S);
  else if constexpr (S > 4) return _mm512_srli_epi16(planes, S - 4);
  else return planes;
}

template <size_t... S>
TW_ALWAYS_INLINE void add_fifth_bits(__m512i w[8], __m512i planes, std::index_sequence<S...>) {
  const __m512i fifth_bit = _mm512_set1_epi8(0x10);
  ((w[S] = _mm512_ternarylogic_epi32(w[S], move_bit_to_4<S>(planes), fifth_bit, 0xF8)), ...);
}

// One tile of 16 weight rows times `MR` activation rows from m0, over all of K.
template <int Bits, int MR, typename TOut>
inline void tile(const uint8_t* codes, const c10::Half* scales, const c10::Half* offsets,
                 const QuantizedActivations& a, int64_t m0, __m512 bias, TOut* out, int64_t n_total,
                 __mmask16 valid) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = bias;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint8_t* block = codes + b * block_bytes(Bits);
    __m512i w[8];
    if constexpr (Bits == 8) {
      for (int s = 0; s < 8; ++s) w[s] = _mm512_loadu_si512(block + 64 * s);
    } else {
      for (int t = 0; t < 4; ++t) {
        __m512i v = _mm512_loadu_si512(block + 64 * t);
        w[t] = _mm512_and_si512(v, low_nibbles);
        w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
      }
      if constexpr (Bits == 5) add_fifth_bits(w, _mm512_loadu_si512(block + 256), std::make_index_sequence<8>{});
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * kLanes)));
    __m512 wo;
    if constexpr (Bits == 4)
      wo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + b * kLanes)));
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const int8_t* xq = a.codes.data() + m * a.k + b * kBlock;
      __m512i dot = _mm512_setzero_si512();
      for (int s = 0; s < 8; ++s) {
        int32_t four;
        std::memcpy(&four, xq + 4 * s, sizeof(four));
        dot = _mm512_dpbusd_epi32(dot, w[s], _mm512_set1_epi32(four));
      }
      const __m512 sx = _mm512_set1_ps(a.scales[m * a.blocks + b]);
      const __m512 sums = _mm512_set1_ps(a.block_sums[m * a.blocks + b]);
      if constexpr (Bits == 4) {
        acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), sx), ws, acc[i]);
        acc[i] = _mm512_fmadd_ps(wo, sums, acc[i]);
      } else {  // s * (s_x * dot + factor * s_x * sum)
        acc[i] = _mm512_fmadd_ps(ws, _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sx, sums), acc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) store16(out + (m0 + i) * n_total, acc[i], valid);
}

// One tile of 16 weight rows (`live` of them real) times every activation row.
template <int Bits, typename TOut>
inline void compute_tile(const uint8_t* codes, const c10::Half* scales, const c10::Half* offsets,
                         const QuantizedActivations& a, const float* bias, TOut* out, int64_t n_total, int live) {
  const __mmask16 valid = static_cast<__mmask16>((1u << live) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias) : _mm512_setzero_ps();
  row_passes(a.rows, [&](int64_t m0, auto rows) {
    tile<Bits, decltype(rows)::value>(codes, scales, offsets, a, m0, b, out, n_total, valid);
  });
}

#else
// ------------------------------------------------------------------------- AVX2 + FMA + F16C
// The same tiles as two 256-bit halves (lanes 0..7 and 8..15). Without vpdpbusd, a step's
// products come from vpmaddubsw (unsigned x signed bytes -> saturating int16 sums of pairs) and
// vpmaddwd by ones (-> one int32 per lane). No sum can saturate: 4- and 5-bit codes are small
// enough to add the int16 pair sums of 8 steps (4-bit: 8 x 2 x 15 x 127 = 30480) or 4 steps (5-bit:
// 4 x 2 x 31 x 127 = 31496) before widening; 8-bit codes are made signed (q = c - 128) and
// multiplied as |q| x (x with q's sign) (2 x 127 x 127 = 32258), so their dot product is
// sum q x and needs no offset term (offset factor 0).

constexpr float offset_factor(int bits) { return bits == 4 ? 1.f : bits == 5 ? -16.f : 0.f; }

inline __m256 load8_as_float(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_as_float(const c10::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float max_of(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t sum_of(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

template <typename T>
QuantizedActivations quantize_activations(const T* x, int64_t rows, int64_t k, float factor) {
  QuantizedActivations a(rows, k);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // packs_epi32 then packs_epi16 interleave the four vectors' 4-value groups within 128-bit
  // halves; this dword permutation puts the 32 bytes back in input order.
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < a.blocks; ++b) {
      const T* src = x + m * k + b * kBlock;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = load8_as_float(src + 8 * i);
      const __m256 peak = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                                        _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
      float scale = max_of(peak) / 127.f;
      __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      __m256i q[4];  // round half to even (the MXCSR default), as torch.round in the twin
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.codes.data() + m * k + b * kBlock),
                          _mm256_permutevar8x32_epi32(bytes, in_order));
      int32_t code_sum = sum_of(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
      a.scales[m * a.blocks + b] = scale;
      a.block_sums[m * a.blocks + b] = factor * scale * static_cast<float>(code_sum);
    }
  }
  return a;
}

// Step S's fifth bits of lanes 8H..8H+7 into the low-nibble codes w[S]: bit S of each plane byte
// moved to bit 4 by a 16-bit shift (the bits it carries over from the neighbouring byte land
// below bit 4 or above it, never on it), masked and or-ed in: 3 instructions a step.
template <int S>
TW_ALWAYS_INLINE __m256i move_bit_to_4(__m256i planes) {
  if constexpr (S < 4) return _mm256_slli_epi16(planes, 4 - S);
  else if constexpr (S > 4) return _mm256_srli_epi16(planes, S - 4);
  else return planes;
}

template <size_t... S>
TW_ALWAYS_INLINE void add_fifth_bits(__m256i w[8], __m256i planes, std::index_sequence<S...>) {
  const __m256i fifth_bit = _mm256_set1_epi8(0x10);
  ((w[S] = _mm256_or_si256(w[S], _mm256_and_si256(move_bit_to_4<S>(planes), fifth_bit))), ...);
}

// The int32 dot products of lanes 8H..8H+7 of one 8-bit block with one row of int8
// activations `xq`. The codes are read again for every row: from L1, as memory operands.
template <int H>
TW_ALWAYS_INLINE __m256i byte_dot(const uint8_t* block, const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i sum = _mm256_setzero_si256();
  for (int s = 0; s < 8; ++s) {
    int32_t four;  // the step's 4 activations, broadcast to every lane
    std::memcpy(&four, xq + 4 * s, sizeof(four));
    const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * s + 32 * H)), flip);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(_mm256_set1_epi32(four), q));
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, ones));
  }
  return sum;
}

// The 4- or 5-bit codes of lanes 8H..8H+7 of one block, one register a step. Decoded once
// and used for every activation row of the pass (the decode costs more than a row's dot).
template <int Bits, int H>
TW_ALWAYS_INLINE void decode_half(const uint8_t* block, __m256i w[8]) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  for (int t = 0; t < 4; ++t) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * t + 32 * H));
    w[t] = _mm256_and_si256(v, low_nibbles);
    w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
  }
  if constexpr (Bits == 5)
    add_fifth_bits(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 256 + 32 * H)),
                   std::make_index_sequence<8>{});
}

// The int32 dot products of decoded 4- or 5-bit codes `w` with one row of int8 activations.
template <int Bits>
TW_ALWAYS_INLINE __m256i nibble_dot(const __m256i w[8], const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i sum = _mm256_setzero_si256();
  constexpr int kStepsPerWiden = Bits == 4 ? 8 : 4;  // see the bounds above
  for (int s0 = 0; s0 < 8; s0 += kStepsPerWiden) {
    __m256i pairs = _mm256_setzero_si256();
    for (int s = s0; s < s0 + kStepsPerWiden; ++s) {
      int32_t four;
      std::memcpy(&four, xq + 4 * s, sizeof(four));
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[s], _mm256_set1_epi32(four)));
    }
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, ones));
  }
  return sum;
}

// Half H (lanes 8H..8H+7) of one block times `MR` activation rows from m0, into acc[i][H].
template <int Bits, int MR, int H>
TW_ALWAYS_INLINE void accumulate_half(const uint8_t* block, const QuantizedActivations& a, int64_t m0, int64_t b,
                            __m256 ws, __m256 wo, __m256 acc[][2]) {
  __m256i w[8];
  if constexpr (Bits != 8) decode_half<Bits, H>(block, w);
  for (int i = 0; i < MR; ++i) {
    const int64_t m = m0 + i;
    const int8_t* xq = a.codes.data() + m * a.k + b * kBlock;
    __m256i dot;
    if constexpr (Bits == 8) dot = byte_dot<H>(block, xq);
    else dot = nibble_dot<Bits>(w, xq);
    const __m256 sx = _mm256_set1_ps(a.scales[m * a.blocks + b]);
    const __m256 sums = _mm256_set1_ps(a.block_sums[m * a.blocks + b]);
    if constexpr (Bits == 4) {
      acc[i][H] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), sx), ws, acc[i][H]);
      acc[i][H] = _mm256_fmadd_ps(wo, sums, acc[i][H]);
    } else {  // s * (s_x * dot + factor * s_x * sum), the factor 0 for 8-bit codes
      acc[i][H] = _mm256_fmadd_ps(ws, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sx, sums), acc[i][H]);
    }
  }
}

template <typename TOut>
inline void store_lanes(TOut* dst, const __m256 acc[2], int live) {
  if constexpr (std::is_same_v<TOut, float>) {
    if (live == kLanes) {
      _mm256_storeu_ps(dst, acc[0]);
      _mm256_storeu_ps(dst + 8, acc[1]);
      return;
    }
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, acc[0]);
  _mm256_store_ps(lanes + 8, acc[1]);
  for (int l = 0; l < live; ++l) dst[l] = static_cast<TOut>(lanes[l]);  // bf16: round to nearest even
}

// One tile of 16 weight rows times `MR` activation rows from m0, over all of K.
template <int Bits, int MR, typename TOut>
inline void tile(const uint8_t* codes, const c10::Half* scales, const c10::Half* offsets,
                 const QuantizedActivations& a, int64_t m0, const __m256 bias[2], TOut* out, int64_t n_total,
                 int live) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = bias[0], acc[i][1] = bias[1];
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint8_t* block = codes + b * block_bytes(Bits);
    const __m128i* s16 = reinterpret_cast<const __m128i*>(scales + b * kLanes);
    const __m256 ws[2] = {_mm256_cvtph_ps(_mm_loadu_si128(s16)), _mm256_cvtph_ps(_mm_loadu_si128(s16 + 1))};
    __m256 wo[2] = {};
    if constexpr (Bits == 4) {
      const __m128i* o16 = reinterpret_cast<const __m128i*>(offsets + b * kLanes);
      wo[0] = _mm256_cvtph_ps(_mm_loadu_si128(o16));
      wo[1] = _mm256_cvtph_ps(_mm_loadu_si128(o16 + 1));
    }
    accumulate_half<Bits, MR, 0>(block, a, m0, b, ws[0], wo[0], acc);
    accumulate_half<Bits, MR, 1>(block, a, m0, b, ws[1], wo[1], acc);
  }
  for (int i = 0; i < MR; ++i) store_lanes(out + (m0 + i) * n_total, acc[i], live);
}

template <int Bits, typename TOut>
inline void compute_tile(const uint8_t* codes, const c10::Half* scales, const c10::Half* offsets,
                         const QuantizedActivations& a, const float* bias, TOut* out, int64_t n_total, int live) {
  alignas(32) float lanes[kLanes] = {};
  if (bias) std::memcpy(lanes, bias, live * sizeof(float));
  const __m256 b[2] = {_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8)};
  row_passes(a.rows, [&](int64_t m0, auto rows) {
    tile<Bits, decltype(rows)::value>(codes, scales, offsets, a, m0, b, out, n_total, live);
  });
}
#endif

// Tiles of one call are shared between the calling thread and helper threads of our own,
// claimed from one atomic word. The caller never waits for a helper to start: it claims
// runs until none are left and then waits only for runs a helper has already claimed. On
// these shared 2-core machines a fork-join pool (OpenMP's barrier) made a small call wait for
// a worker the OS had not scheduled yet: 1 ms instead of 60 us per call under load. A call
// with no helper running is simply single-threaded; a forked child (no helper threads)
// still computes everything. The word packs generation (16 bits) | tiles (24) | next (24),
// so a helper holding a stale view can never claim tiles of another call.
class TilePool {
 public:
  using Work = std::function<void(int64_t, int64_t)>;

  static TilePool& instance() {
    static const bool registered = [] {
      // A forked child has none of the helper threads (and maybe a mutex one of them held):
      // it starts a fresh pool. The old one is leaked on purpose; its threads are detached.
      pthread_atfork(nullptr, nullptr, [] { current_ = new TilePool(); });
      return true;
    }();
    (void)registered;
    if (current_ == nullptr) current_ = new TilePool();
    return *current_;
  }

  void run(int64_t tiles, int threads, const Work& work) {
    std::unique_lock<std::mutex> busy(call_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || threads <= 1 || tiles < 2 || tiles >= (1 << 24)) {  // another call runs: do it here
      work(0, tiles);
      return;
    }
    ensure_helpers(threads - 1);
    prefetch_end_.store(0, std::memory_order_relaxed);  // this call's weights are read now; stop pulling
    work_ = &work;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t generation = (++generation_) & 0xFFFF;
    claim_.store(generation << 48 | static_cast<uint64_t>(tiles) << 24, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work_on(generation);
    while (done_.load(std::memory_order_acquire) < tiles) _mm_pause();
  }

  static constexpr int kMaxSegments = 16;

  // Hands the helpers, idle until the next call, byte ranges to pull toward the cache in
  // order (`prefetch_some`). Races with a helper still on the previous ranges are harmless:
  // prefetch instructions never fault and change no data, at worst a line is fetched for nothing.
  void prefetch(const std::pair<const char*, size_t>* segments, int count) {
    if (helpers_.load(std::memory_order_relaxed) == 0 || count <= 0) return;
    prefetch_end_.store(0, std::memory_order_relaxed);
    size_t total = 0;
    count = std::min(count, kMaxSegments);
    for (int i = 0; i < count; ++i) {
      prefetch_base_[i].store(segments[i].first, std::memory_order_relaxed);
      prefetch_start_[i].store(total, std::memory_order_relaxed);
      total += segments[i].second;
    }
    prefetch_segments_.store(count, std::memory_order_relaxed);
    prefetch_cursor_.store(0, std::memory_order_relaxed);
    prefetch_end_.store(total, std::memory_order_release);
  }

 private:
  static uint64_t generation_of(uint64_t v) { return v >> 48; }
  static int64_t tiles_of(uint64_t v) { return static_cast<int64_t>((v >> 24) & 0xFFFFFF); }
  static int64_t next_of(uint64_t v) { return static_cast<int64_t>(v & 0xFFFFFF); }
  static int64_t run_length(int64_t tiles) { return std::max<int64_t>(1, tiles / 32); }
  static bool open(uint64_t v, uint64_t seen) { return generation_of(v) != seen && next_of(v) < tiles_of(v); }

  void work_on(uint64_t generation) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    for (;;) {
      if (generation_of(v) != generation || next_of(v) >= tiles_of(v)) return;
      const int64_t tiles = tiles_of(v), start = next_of(v), end = std::min(tiles, start + run_length(tiles));
      if (!claim_.compare_exchange_weak(v, (v & ~uint64_t{0xFFFFFF}) | static_cast<uint64_t>(end),
                                        std::memory_order_acq_rel))
        continue;
      (*work_)(start, end);  // valid: the caller waits for these tiles before it returns
      done_.fetch_add(end - start, std::memory_order_acq_rel);
      v = claim_.load(std::memory_order_acquire);
    }
  }

  void ensure_helpers(int wanted) {
    while (static_cast<int>(helpers_.load(std::memory_order_relaxed)) < wanted) {
      std::thread(&TilePool::helper, this).detach();
      ++helpers_;
    }
  }

  void helper() {
    uint64_t seen = generation_of(claim_.load());
    for (;;) {
      uint64_t v = claim_.load(std::memory_order_acquire);
      // Spin ~100 us for the next call (the gaps between a layer's matmuls are shorter), then
      // sleep; while there are weights to prefetch, pull them first.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      for (int i = 0; !open(v, seen); ++i) {
        const bool pulled = prefetch_some();
        if (!pulled) _mm_pause();
        v = claim_.load(std::memory_order_acquire);
        if (!pulled && (i & 255) == 255 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return open(v = claim_.load(std::memory_order_seq_cst), seen); });
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = generation_of(v);
      work_on(seen);
    }
  }

  // One 4 KB piece of the prefetch ranges (64 lines), or false when none is left.
  bool prefetch_some() {
    constexpr size_t kPiece = 4096;
    const size_t end = prefetch_end_.load(std::memory_order_acquire);
    if (prefetch_cursor_.load(std::memory_order_relaxed) >= end) return false;
    const size_t start = prefetch_cursor_.fetch_add(kPiece, std::memory_order_relaxed);
    if (start >= end) return false;
    const int count = std::min(prefetch_segments_.load(std::memory_order_relaxed), kMaxSegments);
    int segment = 0;
    while (segment + 1 < count && prefetch_start_[segment + 1].load(std::memory_order_relaxed) <= start) ++segment;
    for (size_t at = start; at < std::min(start + kPiece, end); at += 64) {
      while (segment + 1 < count && prefetch_start_[segment + 1].load(std::memory_order_relaxed) <= at) ++segment;
      _mm_prefetch(prefetch_base_[segment].load(std::memory_order_relaxed) +
                       (at - prefetch_start_[segment].load(std::memory_order_relaxed)),
                   _MM_HINT_T0);
    }
    return true;
  }

  std::atomic<const char*> prefetch_base_[kMaxSegments] = {};
  std::atomic<size_t> prefetch_start_[kMaxSegments] = {};
  std::atomic<int> prefetch_segments_{0};
  std::atomic<size_t> prefetch_cursor_{0}, prefetch_end_{0};
  std::mutex call_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  uint64_t generation_ = 0;
  std::atomic<size_t> helpers_{0};  // atomic: `prefetch` reads it outside the call mutex
  const Work* work_ = nullptr;
  static inline TilePool* current_ = nullptr;
};

// The weights of the call that followed each layer's last time. A decode step calls the same
// layers in the same order every step, and between two calls (attention, norms, the Python
// around them: tens of microseconds at batch 1) the helper threads only spin; with this they
// pull the following layers' codes and scales (a few MiB ahead: `budget`) toward the cache
// instead, so the next calls start on weights already there or in flight rather than at DRAM
// rate. Walking the chain further than the next layer matters: 1 layer ahead gained ~4%, 4 MiB
// ahead ~5-17% at batch 1 (A/B by round, same build). Keyed by the codes' address (stable
// while a model lives; a stale entry after a model is freed only prefetches a wrong range,
// which cannot fault).
class NextWeights {
 public:
  struct Range {
    const char* codes = nullptr;
    size_t code_bytes = 0;
    const char* scales = nullptr;
    size_t scale_bytes = 0;
  };

  // Bytes to prefetch ahead along the learned order: 4 MiB unless set (`set_weight_prefetch`,
  // from THINKWISE_CPU_WEIGHT_PREFETCH by the Python side; 0 turns it off). A few layers of a
  // small model: a gap's worth at ~20 GB/s, well inside the last-level cache.
  static std::atomic<int64_t>& budget() {
    static std::atomic<int64_t> bytes{4 << 20};
    return bytes;
  }

  // Records that `current` followed the previous call and fills `out` with the ranges of the
  // calls that followed it last time, in order, up to `budget` bytes; returns how many.
  int step(const Range& current, size_t budget, std::pair<const char*, size_t>* out, int capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (last_ != nullptr && last_ != current.codes) {
      if (next_.size() >= 4096) next_.clear();  // many models come and go (tests): stay small
      next_[last_] = current;
    }
    last_ = current.codes;
    int count = 0;
    size_t taken = 0;
    const char* at = current.codes;
    while (count + 2 <= capacity && taken < budget) {
      const auto found = next_.find(at);
      if (found == next_.end() || found->second.codes == current.codes) break;  // unknown, or a full cycle
      const Range& next = found->second;
      const size_t code_bytes = std::min(next.code_bytes, budget - taken);
      out[count++] = {next.codes, code_bytes};
      taken += code_bytes;
      if (code_bytes < next.code_bytes) break;  // the budget ends inside this layer
      out[count++] = {next.scales, next.scale_bytes};
      taken += next.scale_bytes;
      at = next.codes;
    }
    return count;
  }

  static NextWeights& instance() {
    static NextWeights* weights = new NextWeights();  // never destroyed: helper threads outlive exit
    return *weights;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<const char*, Range> next_;
  const char* last_ = nullptr;
};

template <int Bits, typename TIn, typename TOut>
void run(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const c10::Half* offsets,
         const float* bias, TOut* out, int64_t k, int64_t n) {
  const int64_t rows = x.size(0), tiles = codes.size(0), blocks = k / kBlock;
  const QuantizedActivations a = quantize_activations(x.data_ptr<TIn>(), rows, k, offset_factor(Bits));
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  TilePool::instance().run(tiles, at::get_num_threads(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kLanes;
      const int live = static_cast<int>(std::min<int64_t>(kLanes, n - n0));
      compute_tile<Bits>(w + t * blocks * block_bytes(Bits), s + t * blocks * kLanes,
                         offsets ? offsets + t * blocks * kLanes : nullptr, a, bias ? bias + n0 : nullptr, out + n0,
                         n, live);
    }
  });
}

template <int Bits>
void dispatch(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const c10::Half* offsets,
              const float* bias, at::Tensor& out, int64_t k, int64_t n) {
  if (x.scalar_type() == at::kBFloat16)
    run<Bits, c10::BFloat16>(x, codes, scales, offsets, bias, out.data_ptr<c10::BFloat16>(), k, n);
  else
    run<Bits, float>(x, codes, scales, offsets, bias, out.data_ptr<float>(), k, n);
}

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                        int64_t in_features, int64_t out_features, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "quant_linear: bits must be 4, 5 or 8, not ", bits);
  TORCH_CHECK(x_in.dim() == 2, "quant_linear: x must be [M, K]");
  const at::Tensor x = x_in.contiguous();  // no copy (and no dispatch) when it already is
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "quant_linear: x must be bfloat16 or float32");
  TORCH_CHECK(x.size(1) == in_features && in_features % kBlock == 0 && in_features > 0, "quant_linear: x has ",
              x.size(1), " columns, the layer ", in_features, " (a positive multiple of 32)");
  const int64_t tiles = (out_features + kLanes - 1) / kLanes, blocks = in_features / kBlock;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(0) == tiles && codes.size(1) == blocks * block_bytes(bits),
              "quant_linear: ", bits, "-bit codes for ", out_features, "x", in_features, " must be contiguous uint8 [",
              tiles, ", ", blocks * block_bytes(bits), "]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == tiles && scales.size(1) == blocks * kLanes,
              "quant_linear: scales must be contiguous fp16 [", tiles, ", ", blocks * kLanes, "]");
  if (bits == 4) {
    TORCH_CHECK(offsets.has_value() && offsets->scalar_type() == at::kHalf && offsets->is_contiguous() &&
                    offsets->sizes() == scales.sizes(),
                "quant_linear: 4-bit codes need fp16 offsets shaped like the scales");
  }
  // The bias in float32, converted here rather than by an ATen op per call (~5 us each).
  std::vector<float> bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                "quant_linear: bias must be a contiguous float32 or bfloat16 [", out_features, "]");
    bias_f.resize(out_features);
    if (bias->scalar_type() == at::kFloat) {
      std::memcpy(bias_f.data(), bias->data_ptr<float>(), out_features * sizeof(float));
    } else {
      const c10::BFloat16* b = bias->data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < out_features; ++i) bias_f[i] = static_cast<float>(b[i]);
    }
  }
  const float* bias_ptr = bias.has_value() ? bias_f.data() : nullptr;
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return out;
  const c10::Half* off = bits == 4 ? offsets->data_ptr<c10::Half>() : nullptr;
  if (bits == 4) dispatch<4>(x, codes, scales, off, bias_ptr, out, in_features, out_features);
  else if (bits == 5) dispatch<5>(x, codes, scales, off, bias_ptr, out, in_features, out_features);
  else dispatch<8>(x, codes, scales, off, bias_ptr, out, in_features, out_features);
  const int64_t budget = NextWeights::budget().load(std::memory_order_relaxed);
  if (budget > 0 && at::get_num_threads() > 1) {
    std::pair<const char*, size_t> ahead[TilePool::kMaxSegments];
    const int count = NextWeights::instance().step(
        {static_cast<const char*>(codes.data_ptr()), static_cast<size_t>(codes.nbytes()),
         static_cast<const char*>(scales.data_ptr()), static_cast<size_t>(scales.nbytes())},
        static_cast<size_t>(budget), ahead, TilePool::kMaxSegments);
    TilePool::instance().prefetch(ahead, count);
  }
  return out;
}

void set_weight_prefetch(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_weight_prefetch: bytes must be >= 0 (0 turns prefetching off), not ", bytes);
  NextWeights::budget().store(bytes, std::memory_order_relaxed);
}

}  // namespace

#ifdef THINKWISE_AVX2
#define TW_OPERATORS thinkwise_cpu_avx2
#else
#define TW_OPERATORS thinkwise_cpu
#endif
#define TW_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands TW_OPERATORS before TORCH_LIBRARY pastes it

TW_LIBRARY(TW_OPERATORS, m) {
  m.def("quant_linear(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, Tensor? bias, int in_features, "
        "int out_features, int bits) -> Tensor");
  m.impl("quant_linear", c10::DispatchKey::CPU, TORCH_FN(quant_linear));
  m.def("set_weight_prefetch(int bytes) -> ()", TORCH_FN(set_weight_prefetch));
}
