// The small per-layer operations of a CPU decode step, one call each (thinkwise.kernels.cpu_decode_ops).
//
// At batch 1 a decoder layer's linears are a few hundred microseconds, and the work around them
// (residual add + RMSNorm, q/k norm + rotary + the K/V cache write, paged decode attention,
// SiLU(gate) * up) was ~40 ATen ops per layer in the PyTorch twins (kernels/fused.py,
// kernels/paged_attention.py), each a few microseconds of dispatch: a third of the token's
// time on the default model. Each group here is one operator. They round exactly where the
// twins round (bf16 after the residual add, after normalising and after the weight product,
// after each rotary product and the sum), so bf16 results agree with the twins to the last bit
// except for fp32 summation order in the norm's mean and attention's dot products.
// Attention runs in fp32: scores, softmax and the weighted sum, as the twin does.
// Compiled with -march=native for the machine that builds it (the build directory is keyed
// by the CPU's flags). The loops are written for the compiler to vectorize, except attention's
// dot products and weighted sum, which have AVX2/FMA forms (with the plain loops elsewhere):
// the compiler's per-row horizontal sums and accumulators kept in memory ran them at ~4
// multiply-adds a cycle, ~280 ns a cached position for Qwen2.5-0.5B's 14 heads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TW_ATTEND_AVX2 1
#else
#define TW_ATTEND_AVX2 0
#endif

// The element helpers below must inline into the loops that use them, or those loops stay
// scalar: left to GCC's heuristics, growing this file (attention's AVX2 helpers) pushed it past
// its inlining budget and silu_row lost vec_exp and its vectorization (~10 -> ~50 us a row).
#define TW_INLINE inline __attribute__((always_inline))

namespace {

// Loads and stores of the storage type T in float. bf16 by bit operations on its uint16
// bits (round to nearest even, NaN kept a quiet NaN, as c10::BFloat16 converts) so that
// loops over them vectorize: c10's own conversion is a branchy helper on a struct, which the
// compiler leaves scalar.
TW_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
TW_INLINE uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
template <typename T>
TW_INLINE float ld(const T* p) {
  return static_cast<float>(*p);
}
template <>
TW_INLINE float ld<c10::BFloat16>(const c10::BFloat16* p) {
  return bits_to_float(static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16);
}
template <typename T>
TW_INLINE void st(T* p, float v) {
  *p = static_cast<T>(v);
}
template <>
TW_INLINE void st<c10::BFloat16>(c10::BFloat16* p, float v) {
  *reinterpret_cast<uint16_t*>(p) = bf16_bits(v);
}

// Rounds a float to the storage type T and back (identity for float): where the twins round.
template <typename T>
TW_INLINE float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}
template <>
TW_INLINE float round_to<float>(float v) {
  return v;
}
template <>
TW_INLINE float round_to<c10::BFloat16>(float v) {
  return bits_to_float(static_cast<uint32_t>(bf16_bits(v)) << 16);
}

// exp(x) for the loops the compiler vectorizes (std::exp stays a scalar call): 2^n exp(r),
// n = round(x / ln 2), |r| <= ln 2 / 2, Cephes' polynomial (within ~2 ulp of expf;
// the results are rounded to bf16 or summed in fp32, where that does not show).
TW_INLINE float vec_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: adding it leaves n in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  return p * bits_to_float((bits - 0x4B400000u + 127u) << 23);
}

template <typename T>
TW_INLINE void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = ld(src + i);
}

// rstd of a row, as the twin: mean of squares in fp32 (accumulated in double here, so the
// sum is the exact one rounded once), plus eps, rsqrt.
inline float inverse_rms(const float* x, int64_t n, double eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float mean = static_cast<float>(sum / n);
  return 1.0f / std::sqrt(mean + static_cast<float>(eps));
}

// out = weight * T(x * rstd): normalise in fp32, round to T, then the product rounds to T.
template <typename T>
inline void norm_row(const float* x, const T* weight, T* out, int64_t n, double eps) {
  const float rstd = inverse_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i)
    st(out + i, ld(weight + i) * round_to<T>(x[i] * rstd));
}

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, T* residual, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, rows * cols < (1 << 16) ? rows : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(cols);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * cols;
      if (residual != nullptr) {  // the residual stream rounds to T, and is stored
        T* rr = residual + r * cols;
        for (int64_t i = 0; i < cols; ++i) {
          st(rr + i, ld(xr + i) + ld(rr + i));
          row[i] = ld(rr + i);
        }
      } else {
        to_float(xr, row.data(), cols);
      }
      norm_row(row.data(), w, o + r * cols, cols, eps);
    }
  });
}

// rmsnorm(x + residual), the sum x + residual written into `residual`; without a residual
// rmsnorm(x). x [rows, cols] contiguous; weight [cols] of x's dtype.
at::Tensor add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "add_rms_norm: x must be a contiguous [rows, cols] tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(1),
              "add_rms_norm: weight must be a contiguous [cols] tensor of x's dtype");
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must be contiguous and shaped and typed like x");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_impl<scalar_t>(x, residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr, weight, out,
                                eps);
  });
  return out;
}

// Half-rotation rotary embedding of one head, in place in `h` (floats holding T values):
// h * cos + rotate(h) * sin with rotate(h) = (-h2, h1); each product rounds to T, then the sum.
template <typename T>
inline void rotate_head(float* h, const T* cos, const T* sin, int64_t dim) {
  const int64_t half = dim / 2;
  float tmp[1024];
  for (int64_t i = 0; i < dim; ++i) {
    const float rotated = i < half ? -h[i + half] : h[i - half];
    tmp[i] = round_to<T>(round_to<T>(h[i] * ld(cos + i)) +
                         round_to<T>(rotated * ld(sin + i)));
  }
  std::memcpy(h, tmp, dim * sizeof(float));
}

template <typename T>
void qkv_rotary_cache_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const T* q_norm,
                           const T* k_norm, double eps, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& slots, at::Tensor& q_out, int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t tokens = qkv.size(0), heads_all = heads + 2 * kv_heads;
  const T* src = qkv.data_ptr<T>();
  const int64_t stride = qkv.stride(0);
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t cos_stride = cos.stride(0), sin_stride = sin.stride(0);
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  T* qo = q_out.data_ptr<T>();
  at::parallel_for(0, tokens * heads_all, tokens * heads_all * dim < (1 << 16) ? tokens * heads_all : 1,
                   [&](int64_t begin, int64_t end) {
    std::vector<float> h(dim), normed(dim);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / heads_all, head = job % heads_all;
      const T* in = src + t * stride + head * dim;
      T* dst;
      if (head < heads) dst = qo + (t * heads + head) * dim;
      else if (head < heads + kv_heads) dst = kc + (slot[t] * kv_heads + head - heads) * dim;
      else dst = vc + (slot[t] * kv_heads + head - heads - kv_heads) * dim;
      if (head >= heads + kv_heads) {  // v: stored as it is
        std::memcpy(dst, in, dim * sizeof(T));
        continue;
      }
      to_float(in, h.data(), dim);
      const T* norm_weight = head < heads ? q_norm : k_norm;
      if (norm_weight != nullptr) {  // Qwen3: RMSNorm over the head, rounded as the twin rounds
        const float rstd = inverse_rms(h.data(), dim, eps);
        for (int64_t i = 0; i < dim; ++i)
          h[i] = round_to<T>(ld(norm_weight + i) * round_to<T>(h[i] * rstd));
      }
      rotate_head<T>(h.data(), cp + t * cos_stride, sp + t * sin_stride, dim);
      for (int64_t i = 0; i < dim; ++i) st(dst + i, h[i]);
    }
  });
}

// q [tokens, heads, dim] from the fused qkv projection [tokens, (heads + 2 kv_heads) * dim]:
// optional per-head q/k RMSNorm, rotary on q and k, k and v written to their cache slots
// (caches [blocks, block_size, kv_heads, dim] contiguous, of qkv's dtype).
at::Tensor qkv_rotary_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                            double eps, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                            int64_t heads, int64_t kv_heads, int64_t dim) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (heads + 2 * kv_heads) * dim,
              "qkv_rotary_cache: qkv must be [tokens, (heads + 2 kv_heads) * head_dim] with unit column stride");
  TORCH_CHECK(dim % 2 == 0 && dim <= 1024, "qkv_rotary_cache: head_dim must be even and at most 1024");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == qkv.size(0) && t->size(1) == dim && t->stride(1) == 1 &&
                    t->scalar_type() == dtype,
                "qkv_rotary_cache: cos and sin must be [tokens, head_dim] of qkv's dtype");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->dim() == 4 && t->is_contiguous() && t->size(2) == kv_heads && t->size(3) == dim &&
                    t->scalar_type() == dtype,
                "qkv_rotary_cache: caches must be contiguous [blocks, block_size, kv_heads, head_dim] of qkv's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == qkv.size(0),
              "qkv_rotary_cache: slot_mapping must be contiguous int64 [tokens]");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "qkv_rotary_cache: q and k norms come together");
  if (q_norm.has_value())
    for (const at::Tensor* t : {&*q_norm, &*k_norm})
      TORCH_CHECK(t->numel() == dim && t->is_contiguous() && t->scalar_type() == dtype,
                  "qkv_rotary_cache: q/k norm weights must be contiguous [head_dim] of qkv's dtype");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.numel(); ++t)  // a bad slot would write outside the cache
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "qkv_rotary_cache: slot ", slots[t], " outside the cache");
  at::Tensor q = at::empty({qkv.size(0), heads, dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "qkv_rotary_cache", [&] {
    qkv_rotary_cache_impl<scalar_t>(qkv, cos, sin, q_norm ? q_norm->data_ptr<scalar_t>() : nullptr,
                                    k_norm ? k_norm->data_ptr<scalar_t>() : nullptr, eps, k_cache, v_cache,
                                    slot_mapping, q, heads, kv_heads, dim);
  });
  return q;
}

// Attention reads the context in chunks of positions, each chunk's K (then V) rows converted
// to fp32 once into a small buffer that stays in L1, then used by every query head of the group.
constexpr int64_t kAttendChunk = 32;

// Rows [start, start + n) of one KV head's cached K or V, in fp32, `dim` apart.
template <typename T>
void gather_rows(const T* cache, const int64_t* table, int64_t start, int64_t n, int64_t block_size,
                 int64_t kv_heads, int64_t kv_head, int64_t dim, float* dst) {
  // Walk the blocks instead of dividing per row (a 64-bit division is ~40 cycles, as much as
  // converting the row).
  int64_t block = start / block_size, offset = start % block_size;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t slot = table[block] * block_size + offset;
    to_float(cache + (slot * kv_heads + kv_head) * dim, dst + j * dim, dim);
    if (++offset == block_size) {
      offset = 0;
      ++block;
    }
  }
}

#if TW_ATTEND_AVX2
// The dot products of q with 8 rows k_j (`dim` apart, dim a multiple of 8): one accumulator
// per row, the eight reduced together by a transposing hadd tree (the compiler's per-row
// horizontal sums cost more than the products at head_dim 64).
inline __m256 dot_8_rows(const float* q, const float* k, int64_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t i = 0; i < dim; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + dim + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * dim + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * dim + i), a3);
    a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * dim + i), a4);
    a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * dim + i), a5);
    a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * dim + i), a6);
    a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * dim + i), a7);
  }
  // hadd pairs within 128-bit halves: u0 = [sums of a0..a3 over lanes 0-3 | over lanes 4-7].
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// scores[j] = scale * q . k_j for the n rows of a chunk (the buffer holds whole groups of 8).
inline void score_rows(const float* q, const float* k, int64_t n, int64_t dim, float scale, float* scores) {
  int64_t j = 0;
#if TW_ATTEND_AVX2
  if (dim % 8 == 0) {
    for (; j < n; j += 8) {
      alignas(32) float dots[8];
      _mm256_store_ps(dots, _mm256_mul_ps(dot_8_rows(q, k + j * dim, dim), _mm256_set1_ps(scale)));
      for (int64_t r = 0; r < 8 && j + r < n; ++r) scores[j + r] = dots[r];
    }
    return;
  }
#endif
  for (; j < n; ++j) {
    const float* kj = k + j * dim;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < dim; ++i) dot += q[i] * kj[i];
    scores[j] = dot * scale;
  }
}

#if TW_ATTEND_AVX2
// acc[c, c + 8 R) += sum_j w[j] * v_j[c, c + 8 R): R registers held across the n rows.
template <int R>
TW_INLINE void accumulate_slab(const float* w, const float* v, int64_t n, int64_t dim, int64_t c, float* acc) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_loadu_ps(acc + c + 8 * r);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 wj = _mm256_broadcast_ss(w + j);
    const float* vj = v + j * dim + c;
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vj + 8 * r), a[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + c + 8 * r, a[r]);
}
#endif

// acc[0, dim) += sum_j w[j] * v_j over the n rows of a chunk. With AVX2, 64 columns at a time
// stay in eight registers across the rows: eight independent FMA chains hide the FMA's latency
// (four left it latency-bound at ~0.8 FMAs a cycle), then 32 at a time.
inline void accumulate_rows(const float* w, const float* v, int64_t n, int64_t dim, float* acc) {
  int64_t c = 0;
#if TW_ATTEND_AVX2
  for (; c + 64 <= dim; c += 64) accumulate_slab<8>(w, v, n, dim, c, acc);
  for (; c + 32 <= dim; c += 32) accumulate_slab<4>(w, v, n, dim, c, acc);
#endif
  for (int64_t j = 0; j < n; ++j) {
    const float wj = w[j];
    const float* vj = v + j * dim;
#pragma omp simd
    for (int64_t i = c; i < dim; ++i) acc[i] += wj * vj[i];
  }
}

// One (sequence, KV head): its `group` query heads attend to the sequence's cached context.
template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t length, int64_t first,
            int64_t block_size, int64_t kv_heads, int64_t kv_head, int64_t group, int64_t dim, float scale, T* out,
            std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& rows) {
  const int64_t span = length - first;
  scores.resize(group * span);
  acc.assign(group * dim, 0.f);
  // The chunk buffer (rows past a short last chunk keep older finite values: read, never used)
  // and, after it, the group's queries in fp32.
  rows.resize((kAttendChunk + group) * dim);
  float* chunk = rows.data();
  float* qf = rows.data() + kAttendChunk * dim;
  to_float(q, qf, group * dim);
  for (int64_t c = first; c < length; c += kAttendChunk) {
    const int64_t n = std::min(kAttendChunk, length - c);
    gather_rows(k_cache, table, c, n, block_size, kv_heads, kv_head, dim, chunk);
    for (int64_t g = 0; g < group; ++g) score_rows(qf + g * dim, chunk, n, dim, scale, scores.data() + g * span + c - first);
  }
  std::vector<float> inv_sum(group);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * span;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < span; ++j) top = std::max(top, s[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < span; ++j) {
      s[j] = vec_exp(s[j] - top);
      sum += s[j];
    }
    inv_sum[g] = 1.f / sum;
  }
  for (int64_t c = first; c < length; c += kAttendChunk) {
    const int64_t n = std::min(kAttendChunk, length - c);
    gather_rows(v_cache, table, c, n, block_size, kv_heads, kv_head, dim, chunk);
    for (int64_t g = 0; g < group; ++g)
      accumulate_rows(scores.data() + g * span + c - first, chunk, n, dim, acc.data() + g * dim);
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < dim; ++i) st(out + g * dim + i, acc[g * dim + i] * inv_sum[g]);
}

template <typename T>
void decode_attention_impl(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                           at::Tensor& out) {
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int64_t table_stride = block_tables.stride(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const T* qp = query.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  int64_t work = 0;
  for (int64_t b = 0; b < batch; ++b) work += lens[b];
  work *= heads * dim;
  const int64_t jobs = batch * kv_heads;
  at::parallel_for(0, jobs, work < (1 << 19) ? jobs : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc, row;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / kv_heads, h = job % kv_heads;
      const int64_t length = lens[b];
      T* dst = op + (b * heads + h * group) * dim;
      if (length <= 0) {  // a padding row: nothing to attend to
        for (int64_t i = 0; i < group * dim; ++i) st(dst + i, 0.f);
        continue;
      }
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      attend<T>(qp + (b * heads + h * group) * dim, kc, vc, tables + b * table_stride, length, first, block_size,
                kv_heads, h, group, dim, static_cast<float>(scale), dst, scores, acc, row);
    }
  });
}

// One query token per sequence: query [B, H, D] -> [B, H, D], attending to each sequence's
// first seq_lens[b] cached tokens (only its last `window` when window > 0).
at::Tensor decode_attention(const at::Tensor& query_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            int64_t window) {
  const at::Tensor query = query_in.contiguous();
  TORCH_CHECK(query.dim() == 3, "decode_attention: query must be [batch, heads, head_dim]");
  const int64_t batch = query.size(0);
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->dim() == 4 && t->is_contiguous() && t->size(3) == query.size(2) &&
                    t->scalar_type() == query.scalar_type() && t->sizes() == k_cache.sizes(),
                "decode_attention: caches must be contiguous [blocks, block_size, kv_heads, head_dim] of the "
                "query's dtype");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "decode_attention: heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) >= batch,
              "decode_attention: block_tables must be int64 [>= batch, blocks] with unit column stride");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() && seq_lens.numel() >= batch,
              "decode_attention: seq_lens must be contiguous int64 [>= batch]");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1);
  for (int64_t b = 0; b < batch; ++b) {  // every block read must exist: a bad table is an error, not a crash
    TORCH_CHECK(lens[b] <= block_tables.size(1) * block_size, "decode_attention: sequence ", b, " has ", lens[b],
                " tokens, more than its block table holds");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int64_t id = tables[b * block_tables.stride(0) + i];
      TORCH_CHECK(id >= 0 && id < blocks, "decode_attention: block ", id, " outside the cache");
    }
  }
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "decode_attention", [&] {
    decode_attention_impl<scalar_t>(query, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
  });
  return out;
}

template <typename T>
__attribute__((noinline)) void silu_row(const T* g, const T* u, T* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = ld(g + i);
    // Below -88 exp(-x) overflows in expf (torch's silu gives -0); vec_exp clamps instead.
    const float silu = x < -88.0f ? x * 0.0f : x / (1.f + vec_exp(-x));
    st(o + i, round_to<T>(silu) * ld(u + i));
  }
}

template <typename T>
void silu_mul_impl(const T* in, T* out, int64_t rows, int64_t cols, int64_t stride) {
  at::parallel_for(0, rows, rows * cols < (1 << 16) ? rows : 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_row(in + r * stride, in + r * stride + cols, out + r * cols, cols);
  });
}

// silu(gate) * up for the fused gate/up output [rows, 2 * cols]: silu in fp32 rounded to T
// (as F.silu on a T tensor), then the product rounded to T.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be [rows, 2 * cols] with unit column stride");
  const int64_t rows = gate_up.size(0), cols = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, cols}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, cols, gate_up.stride(0));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(thinkwise_cpu_decode, m) {
  m.def("add_rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps) -> Tensor");
  m.def("qkv_rotary_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm, Tensor? k_norm, float eps, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, int heads, int kv_heads, int dim) -> Tensor");
  m.def("decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int window) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("qkv_rotary_cache", c10::DispatchKey::CPU, TORCH_FN(qkv_rotary_cache));
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
}
