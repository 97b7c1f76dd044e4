// AVX2 pieces of w8a8_linear_avx2: per-row activation quantization to s8 and
// output conversion. Private to w8a8_avx2.cpp (the only file that includes it),
// so its functions live in an anonymous namespace compiled with that file's ISA.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "slmkern/common.h"
#include "w8a8_scratch.h"

namespace slmkern {
namespace {

// 8 elements of x (any DType) as fp32. bf16 -> fp32 is a shift and F16C's
// vcvtph2ps is exact, so every value matches load_as_f32.
inline __m256 load8_f32(const void* p, DType t, int64_t i) {
  if (t == DType::f32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (t == DType::bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// The last n (< 8) elements, zero-filled: copied first so nothing past the row is read.
inline __m256 load8_tail_f32(const void* p, DType t, int64_t i, int64_t n) {
  alignas(32) uint8_t tmp[32] = {};
  const size_t esz = t == DType::f32 ? 4 : 2;
  std::memcpy(tmp, static_cast<const char*>(p) + i * esz, static_cast<size_t>(n) * esz);
  return load8_f32(tmp, t, 0);
}

// q = clamp(rint(x * inv), -127, 127) for 8 lanes, as 8 int8 in the low 64 bits.
inline __m128i quant8(__m256 x, __m256 inv) {
  // x * inv rounded once (no FMA), then half-to-even: nearbyint in the spec.
  const __m256 r = _mm256_round_ps(_mm256_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256i q = _mm256_cvttps_epi32(r);
  q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  return _mm_packs_epi16(w, w);
}

// Quantize rows [0, rows) of x (row stride ldx) into qa and its absolute value
// into qabs (both row stride lda >= Kp): qa[m][k] = q for k < K and 0 up to Kp.
// sx[m] is the row scale; the spec is quantize_rows_s8_ref.
inline void quantize_rows_s8_avx2(const void* x, DType t, int64_t rows, int64_t K, int64_t ldx,
                                  int8_t* qa, uint8_t* qabs, int64_t lda, float* sx) {
  const int64_t Kp = int8_padded_k(K), K8 = K / 8 * 8;
  const __m256i absbits = _mm256_set1_epi32(0x7fffffff);
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t off = m * ldx;
    // amax as integers on |x|'s bit pattern: for finite floats the order is the
    // same, and NaN/inf patterns (>= 0x7f800000) sort above every finite value.
    __m256i mx0 = _mm256_setzero_si256(), mx1 = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 v0 = load8_f32(x, t, off + k), v1 = load8_f32(x, t, off + k + 8);
      mx0 = _mm256_max_epu32(mx0, _mm256_and_si256(_mm256_castps_si256(v0), absbits));
      mx1 = _mm256_max_epu32(mx1, _mm256_and_si256(_mm256_castps_si256(v1), absbits));
    }
    for (; k < K8; k += 8)
      mx0 = _mm256_max_epu32(mx0, _mm256_and_si256(_mm256_castps_si256(load8_f32(x, t, off + k)), absbits));
    if (K8 < K)
      mx1 = _mm256_max_epu32(
          mx1, _mm256_and_si256(_mm256_castps_si256(load8_tail_f32(x, t, off + K8, K - K8)), absbits));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epu32(mx0, mx1));
    uint32_t abits = 0;
    for (int i = 0; i < 8; ++i) abits = lanes[i] > abits ? lanes[i] : abits;
    int8_t* qr = qa + m * lda;
    uint8_t* ar = qabs + m * lda;
    float amax;
    std::memcpy(&amax, &abits, 4);
    if (abits >= 0x7f800000u || amax < kActZeroThreshold) {
      std::memset(qr, 0, static_cast<size_t>(Kp));
      std::memset(ar, 0, static_cast<size_t>(Kp));
      sx[m] = abits >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(127.f / amax);
    for (k = 0; k < K8; k += 8) {
      const __m128i q = quant8(load8_f32(x, t, off + k), inv);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), q);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(ar + k), _mm_abs_epi8(q));
    }
    if (K8 < K) {
      alignas(16) int8_t tmp[16];
      const __m128i q = quant8(load8_tail_f32(x, t, off + K8, K - K8), inv);
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), q);
      std::memcpy(qr + K8, tmp, static_cast<size_t>(K - K8));
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), _mm_abs_epi8(q));
      std::memcpy(ar + K8, tmp, static_cast<size_t>(K - K8));
    }
    for (k = K; k < Kp; ++k) qr[k] = 0, ar[k] = 0;
    sx[m] = amax / 127.f;
  }
}

// Horizontal min / max of 8 lanes.
inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// q = clamp(rint(x * inv) + zero, 0, 127) + add for 8 lanes, as 8 bytes in the low 64 bits (add is 0,
// or 128 - zero to recenter; the result stays in [0, 255]).
inline __m128i quant8_u7(__m256 x, __m256 inv, __m256i zero, __m256i add) {
  const __m256 r = _mm256_round_ps(_mm256_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256i q = _mm256_add_epi32(_mm256_cvttps_epi32(r), zero);
  q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_setzero_si256()), _mm256_set1_epi32(127));
  q = _mm256_add_epi32(q, add);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  return _mm_packus_epi16(w, w);
}

// Asymmetric 7-bit rows (the spec is quantize_rows_u7_ref): codes into q (row stride lda >= Kp), row
// scales into sx, zero points into zero (may be null with recenter). Columns K..Kp-1 get 0 (128 with
// recenter). NaN / inf are found on |x|'s bit pattern, as in quantize_rows_s8_avx2.
inline void quantize_rows_u7_impl(const void* x, DType t, int64_t rows, int64_t K, int64_t ldx, uint8_t* q,
                                  int64_t lda, float* sx, int32_t* zero, bool recenter) {
  const int64_t Kp = int8_padded_k(K), K8 = K / 8 * 8;
  const __m256i absbits = _mm256_set1_epi32(0x7fffffff);
  const uint8_t pad = recenter ? 128 : 0;
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t off = m * ldx;
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // the zero-filled tail cannot move them
    __m256i mx = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k < K8; k += 8) {
      const __m256 v = load8_f32(x, t, off + k);
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
      mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(v), absbits));
    }
    if (K8 < K) {
      const __m256 v = load8_tail_f32(x, t, off + K8, K - K8);
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
      mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(v), absbits));
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), mx);
    uint32_t abits = 0;
    for (int i = 0; i < 8; ++i) abits = lanes[i] > abits ? lanes[i] : abits;
    const float range = hmax8(hi) - hmin8(lo);
    uint8_t* qr = q + m * lda;
    if (zero) zero[m] = 0;
    if (abits >= 0x7f800000u || !(range <= std::numeric_limits<float>::max()) || range < kActZeroThreshold) {
      std::memset(qr, pad, static_cast<size_t>(Kp));
      sx[m] = abits >= 0x7f800000u || !(range <= std::numeric_limits<float>::max())
                  ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      continue;
    }
    const float invs = 127.f / range;
    const float zf = std::min(127.f, std::max(0.f, std::nearbyint(-hmin8(lo) * invs)));
    const int32_t z = static_cast<int32_t>(zf);
    const __m256 inv = _mm256_set1_ps(invs);
    const __m256i zv = _mm256_set1_epi32(z), add = _mm256_set1_epi32(recenter ? 128 - z : 0);
    for (k = 0; k < K8; k += 8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), quant8_u7(load8_f32(x, t, off + k), inv, zv, add));
    if (K8 < K) {
      alignas(16) uint8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp),
                      quant8_u7(load8_tail_f32(x, t, off + K8, K - K8), inv, zv, add));
      std::memcpy(qr + K8, tmp, static_cast<size_t>(K - K8));
    }
    for (k = K; k < Kp; ++k) qr[k] = pad;
    if (zero) zero[m] = z;
    sx[m] = range / 127.f;
  }
}

// gelu_epilogue_f32 (common.h) on 8 lanes: the same fp32 operations in the same order.
inline __m256 gelu8(__m256 v) {
  const auto c = [](float f) { return _mm256_set1_ps(f); };
  const __m256 z = _mm256_mul_ps(v, c(0.70710677f));
  const __m256 a = _mm256_andnot_ps(c(-0.0f), z);
  const __m256 t = _mm256_div_ps(c(1.0f), _mm256_add_ps(_mm256_mul_ps(a, c(0.3275911f)), c(1.0f)));
  __m256 p = _mm256_mul_ps(t, c(1.061405429f));
  p = _mm256_mul_ps(_mm256_add_ps(p, c(-1.453152027f)), t);
  p = _mm256_mul_ps(_mm256_add_ps(p, c(1.421413741f)), t);
  p = _mm256_mul_ps(_mm256_add_ps(p, c(-0.284496736f)), t);
  p = _mm256_mul_ps(_mm256_add_ps(p, c(0.254829592f)), t);
  __m256 sx = _mm256_xor_ps(_mm256_mul_ps(a, a), c(-0.0f));  // -(a*a)
  // sx < -87 ? -87 : sx, NaN kept (the compare is false for NaN)
  sx = _mm256_blendv_ps(sx, c(-87.0f), _mm256_cmp_ps(sx, c(-87.0f), _CMP_LT_OQ));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(sx, c(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(sx, _mm256_mul_ps(n, c(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, c(-2.12194440e-4f)));
  __m256 e = _mm256_mul_ps(r, c(1.9875691500e-4f));
  e = _mm256_mul_ps(_mm256_add_ps(e, c(1.3981999507e-3f)), r);
  e = _mm256_mul_ps(_mm256_add_ps(e, c(8.3334519073e-3f)), r);
  e = _mm256_mul_ps(_mm256_add_ps(e, c(4.1665795894e-2f)), r);
  e = _mm256_mul_ps(_mm256_add_ps(e, c(1.6666665459e-1f)), r);
  e = _mm256_mul_ps(_mm256_add_ps(e, c(5.0000001201e-1f)), r);
  e = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(e, r), r), c(1.0f));
  const __m256 nn = _mm256_and_ps(n, _mm256_cmp_ps(n, n, _CMP_ORD_Q));  // NaN -> 0, as the scalar spec
  const __m256 scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nn), _mm256_set1_epi32(127)), 23));
  const __m256 erfc = _mm256_mul_ps(p, _mm256_mul_ps(e, scale));
  const __m256 h = _mm256_blendv_ps(_mm256_sub_ps(c(2.0f), erfc), erfc, _mm256_cmp_ps(z, c(0.0f), _CMP_LT_OQ));
  return _mm256_mul_ps(_mm256_mul_ps(v, c(0.5f)), h);
}

// Store n (<= 8) fp32 results as dtype t, rounding like store_from_f32 (RNE, quiet NaN).
inline void store8(void* y, DType t, int64_t i, __m256 v, int64_t n) {
  alignas(32) uint8_t tmp[32];
  const bool full = n >= 8;
  if (t == DType::f32) {
    if (full) {
      _mm256_storeu_ps(static_cast<float*>(y) + i, v);
      return;
    }
    _mm256_store_ps(reinterpret_cast<float*>(tmp), v);
    std::memcpy(static_cast<float*>(y) + i, tmp, static_cast<size_t>(n) * 4);
    return;
  }
  const __m256i u = _mm256_castps_si256(v);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  __m128i h;
  if (t == DType::bf16) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qn, nan);
    h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // the spec's NaN is sign | 0x7e00 whatever the payload
    const __m256i qn = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                       _mm256_set1_epi32(0x7e00));
    const __m128i qn16 = _mm_packus_epi32(_mm256_castsi256_si128(qn), _mm256_extracti128_si256(qn, 1));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
    h = _mm_blendv_epi8(h, qn16, nan16);
  }
  if (full) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + i), h);
    return;
  }
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
  std::memcpy(static_cast<uint16_t*>(y) + i, tmp, static_cast<size_t>(n) * 2);
}

}  // namespace
}  // namespace slmkern
