// Quantized-weight linear layers for x86 CPUs with AVX-512 VNNI (thinkwise.kernels.cpu_quant_gemm).
//
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) where W is stored in blocks of 32 weights along k:
// unsigned codes c, one fp16 scale s per block and, for 4-bit codes, one fp16 offset o per
// block: W = s * c + o (4-bit: c in 0..15, two codes per byte, GGUF Q4_1/Q4_K-like; 5-bit:
// c = q + 16 in 0..31, the offset implicitly -16 * s, GGUF Q5_0; 8-bit: c = q + 128 in 1..255,
// the offset implicitly -128 * s, GGUF Q8_0). The activations are quantized per row and
// block of 32 to int8 with a scale of their own (llama.cpp's Q8_0 approach), so a block's dot
// product is one VNNI instruction (vpdpbusd: unsigned codes x signed activations, 64 pairs at a
// time), scaled in float by s * s_x; the offset term is o * (s_x * sum of the block's int8
// activations). The result is exactly dequant(W) . dequant(quant(x)) up to float summation
// order, which is what the PyTorch twin in cpu_quant_gemm.py computes.
//
// Layout (see cpu_quant_gemm.py): rows padded to Kp = K rounded up to 64; 8-bit rows are Kp
// bytes; 4-bit rows Kp / 2 bytes, where byte j of each 32-byte chunk holds the code of weight j
// (low nibble) and of weight j + 32 (high nibble) of that 64-weight chunk; 5-bit rows 40 bytes
// per 64-weight chunk: those 32 bytes of low nibbles, then a 64-bit mask whose bit i is the
// fifth bit of weight i of the chunk; scales/offsets are
// [N, Kp / 32] fp16. Threads: the output rows are split with at::parallel_for (PyTorch's own
// OpenMP pool, so no second pool competes for the cores).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;  // weights per inner step: two blocks of 32
constexpr int kRowsPerTile = 4;  // weight rows per tile
constexpr int kTokensPerTile = 4;  // activation rows per tile

struct QuantizedActivations {
  int64_t rows, padded_k, groups_padded;
  std::vector<int8_t> codes;       // [rows, Kp]
  std::vector<float> lane_scales;  // [rows, Kp / 64, 16]: lanes 0-7 the even block's scale, 8-15 the odd one's
  std::vector<float> block_sums;   // [rows, Gp]: factor * s_x * sum of the block's int8 codes; zero past Kp / 32
};

inline __m512 load16_as_float(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_as_float(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// `offset_factor` scales the block sums by what multiplies them in the offset term (see tile).
template <typename T>
QuantizedActivations quantize_activations(const T* x, int64_t rows, int64_t k, int64_t padded_k, float offset_factor) {
  QuantizedActivations a;
  a.rows = rows;
  a.padded_k = padded_k;
  const int64_t blocks = padded_k / 32, chunks = padded_k / kChunk;
  a.groups_padded = (blocks + 15) / 16 * 16;
  a.codes.assign(rows * padded_k, 0);
  a.lane_scales.assign(rows * chunks * 16, 0.f);
  a.block_sums.assign(rows * a.groups_padded, 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < k / 32; ++b) {
      const T* src = x + m * k + b * 32;
      __m512 lo = load16_as_float(src), hi = load16_as_float(src + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      float scale = amax / 127.f;
      float inverse = scale > 0.f ? 1.f / scale : 0.f;
      __m512 inv = _mm512_set1_ps(inverse);
      // Round half to even (the MXCSR default), as torch.round in the twin.
      __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
      __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      int8_t* dst = a.codes.data() + m * padded_k + b * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q_hi));
      int32_t code_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
      a.block_sums[m * a.groups_padded + b] = offset_factor * scale * static_cast<float>(code_sum);
      float* lanes = a.lane_scales.data() + (m * chunks + b / 2) * 16 + (b % 2) * 8;
      for (int i = 0; i < 8; ++i) lanes[i] = scale;
    }
  }
  return a;
}

template <typename T>
inline void store_value(T* out, float value) { *out = static_cast<T>(value); }

inline __m256 high_half(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

// The lane sums of four vectors, as [sum a, sum b, sum c, sum d].
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), high_half(a));
  __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), high_half(b));
  __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), high_half(c));
  __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), high_half(d));
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

constexpr int64_t chunk_bytes(int bits) { return bits == 8 ? 64 : bits == 5 ? 40 : 32; }

// One tile: `NR` weight rows from n0 times `MR` activation rows from m0, over all of K.
template <int Bits, int NR, int MR, typename TOut>
inline void tile(const uint8_t* codes, int64_t row_bytes, const c10::Half* scales, const c10::Half* offsets,
                 int64_t blocks, const QuantizedActivations& a, int64_t n0, int64_t m0, const float* bias,
                 TOut* out, int64_t n_total) {
  const int64_t chunks = a.padded_k / kChunk;
  const __m512i lane_block = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MR; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i w[NR];
    __m512 ws[NR];
    for (int j = 0; j < NR; ++j) {
      const uint8_t* row = codes + (n0 + j) * row_bytes;
      const uint8_t* chunk = row + c * chunk_bytes(Bits);
      if constexpr (Bits == 8) {
        w[j] = _mm512_loadu_si512(chunk);
      } else {
        __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), packed, 1);
        both = _mm512_mask_blend_epi64(0xF0, both, _mm512_srli_epi16(both, 4));
        w[j] = _mm512_and_si512(both, low_nibbles);
        if constexpr (Bits == 5) {
          uint64_t high;
          std::memcpy(&high, chunk + 32, sizeof(high));
          w[j] = _mm512_or_si512(w[j], _mm512_maskz_mov_epi8(_cvtu64_mask64(high), _mm512_set1_epi8(0x10)));
        }
      }
      uint32_t two;
      std::memcpy(&two, scales + (n0 + j) * blocks + 2 * c, sizeof(two));
      __m128 pair = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(two)));
      ws[j] = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(pair));
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      __m512i xq = _mm512_loadu_si512(a.codes.data() + m * a.padded_k + c * kChunk);
      __m512 xs = _mm512_loadu_ps(a.lane_scales.data() + (m * chunks + c) * 16);
      for (int j = 0; j < NR; ++j) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[j], xq);
        acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws[j], xs), acc[j][i]);
      }
    }
  }
  // The offset term, folded into the accumulators before the one reduction: sum over blocks
  // of o (4-bit), -16 * s (5-bit) or -128 * s (8-bit) times the block sums (the factor is
  // already in the sums: quantize_activations). Each offset vector is converted once and
  // used for every activation row.
  for (int j = 0; j < NR; ++j) {
    const c10::Half* off = (Bits == 4 ? offsets : scales) + (n0 + j) * blocks;
    for (int64_t g = 0; g < blocks; g += 16) {
      __mmask16 mask = blocks - g >= 16 ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << (blocks - g)) - 1);
      __m512 o = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, off + g));
      for (int i = 0; i < MR; ++i)
        acc[j][i] = _mm512_fmadd_ps(o, _mm512_loadu_ps(a.block_sums.data() + (m0 + i) * a.groups_padded + g), acc[j][i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    TOut* dst = out + (m0 + i) * n_total + n0;
    if constexpr (NR == 4) {
      __m128 sums = reduce4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
      if (bias) sums = _mm_add_ps(sums, _mm_loadu_ps(bias + n0));
      alignas(16) float values[4];
      _mm_store_ps(values, sums);
      for (int j = 0; j < 4; ++j) store_value(dst + j, values[j]);
    } else {
      for (int j = 0; j < NR; ++j) store_value(dst + j, _mm512_reduce_add_ps(acc[j][i]) + (bias ? bias[n0 + j] : 0.f));
    }
  }
}

template <int Bits, int NR, typename TOut>
void rows_block(const uint8_t* codes, int64_t row_bytes, const c10::Half* scales, const c10::Half* offsets,
                int64_t blocks, const QuantizedActivations& a, int64_t n0, const float* bias, TOut* out,
                int64_t n_total) {
  int64_t m0 = 0;
  for (; m0 + kTokensPerTile <= a.rows; m0 += kTokensPerTile)
    tile<Bits, NR, kTokensPerTile>(codes, row_bytes, scales, offsets, blocks, a, n0, m0, bias, out, n_total);
  switch (a.rows - m0) {
    case 3: tile<Bits, NR, 3>(codes, row_bytes, scales, offsets, blocks, a, n0, m0, bias, out, n_total); break;
    case 2: tile<Bits, NR, 2>(codes, row_bytes, scales, offsets, blocks, a, n0, m0, bias, out, n_total); break;
    case 1: tile<Bits, NR, 1>(codes, row_bytes, scales, offsets, blocks, a, n0, m0, bias, out, n_total); break;
    default: break;
  }
}

template <int Bits, typename TIn>
void run(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
         const float* bias, at::Tensor& out, int64_t k) {
  const int64_t rows = x.size(0), n = codes.size(0);
  const int64_t row_bytes = codes.size(1);
  const int64_t padded_k = row_bytes / chunk_bytes(Bits) * kChunk;
  const int64_t blocks = padded_k / 32;
  constexpr float offset_factor = Bits == 4 ? 1.f : Bits == 5 ? -16.f : -128.f;
  QuantizedActivations a = quantize_activations(x.data_ptr<TIn>(), rows, k, padded_k, offset_factor);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  const c10::Half* o = Bits == 4 ? offsets.data_ptr<c10::Half>() : nullptr;
  const int64_t full_tiles = n / kRowsPerTile;
  auto body = [&](auto* out_ptr) {
    // Dynamic split: each thread takes the next run of tiles from a shared counter, so a
    // thread the OS preempts (the cores are shared) holds back only the run it is in, not
    // half of the matrix as a static split would.
    const int64_t tiles = full_tiles + 1;  // the last one: the rows past the last full tile
    const int threads = at::get_num_threads();
    const int64_t run_length = std::max<int64_t>(4, tiles / (32 * std::max(threads, 1)));
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t start; (start = next.fetch_add(run_length)) < tiles;) {
        for (int64_t t = start; t < std::min(tiles, start + run_length); ++t) {
          if (t < full_tiles) {
            rows_block<Bits, kRowsPerTile>(w, row_bytes, s, o, blocks, a, t * kRowsPerTile, bias, out_ptr, n);
          } else {
            for (int64_t r = full_tiles * kRowsPerTile; r < n; ++r)
              rows_block<Bits, 1>(w, row_bytes, s, o, blocks, a, r, bias, out_ptr, n);
          }
        }
      }
    });
  };
  if (out.scalar_type() == at::kBFloat16)
    body(out.data_ptr<c10::BFloat16>());
  else
    body(out.data_ptr<float>());
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                        int64_t in_features, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_linear: x must be a contiguous [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "quant_linear: x must be bfloat16 or float32");
  TORCH_CHECK(x.size(1) == in_features && in_features % 32 == 0, "quant_linear: x has ", x.size(1),
              " columns, the layer ", in_features, " (a multiple of 32)");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "quant_linear: codes must be contiguous uint8 [N, bytes]");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "quant_linear: bits must be 4, 5 or 8, not ", bits);
  TORCH_CHECK(codes.size(1) % chunk_bytes(bits) == 0, "quant_linear: ", bits, "-bit code rows must be a multiple of ",
              chunk_bytes(bits), " bytes");
  const int64_t padded_k = codes.size(1) / chunk_bytes(bits) * kChunk;
  TORCH_CHECK(padded_k == (in_features + kChunk - 1) / kChunk * kChunk, "quant_linear: code rows hold ",
              padded_k, " inputs, not ", in_features, " padded to a multiple of 64");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(0) == codes.size(0) &&
                  scales.size(1) == padded_k / 32,
              "quant_linear: scales must be contiguous fp16 [N, Kp/32]");
  if (bits == 4) {
    TORCH_CHECK(offsets.has_value() && offsets->scalar_type() == at::kHalf && offsets->is_contiguous() &&
                    offsets->sizes() == scales.sizes(),
                "quant_linear: 4-bit codes need fp16 offsets shaped like the scales");
  }
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == codes.size(0), "quant_linear: bias must be [N]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options());
  if (x.size(0) == 0 || codes.size(0) == 0) return out;
  const at::Tensor empty_offsets;
  const at::Tensor& off = bits == 4 ? *offsets : empty_offsets;
  if (x.scalar_type() == at::kBFloat16) {
    if (bits == 4) run<4, c10::BFloat16>(x, codes, scales, off, bias_ptr, out, in_features);
    else if (bits == 5) run<5, c10::BFloat16>(x, codes, scales, off, bias_ptr, out, in_features);
    else run<8, c10::BFloat16>(x, codes, scales, off, bias_ptr, out, in_features);
  } else {
    if (bits == 4) run<4, float>(x, codes, scales, off, bias_ptr, out, in_features);
    else if (bits == 5) run<5, float>(x, codes, scales, off, bias_ptr, out, in_features);
    else run<8, float>(x, codes, scales, off, bias_ptr, out, in_features);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(thinkwise_cpu, m) {
  m.def("quant_linear(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, Tensor? bias, int in_features, "
        "int bits) -> Tensor");
  m.impl("quant_linear", c10::DispatchKey::CPU, TORCH_FN(quant_linear));
}
