// AVX-512 pieces of w8a8_linear_avx512vnni: per-row activation quantization to
// the unsigned vpdpbusd operand and output conversion. Private to
// w8a8_avx512vnni.cpp (the only file that includes it), so its functions live
// in an anonymous namespace compiled with that file's ISA.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "slmkern/common.h"
#include "w8a8_scratch.h"

namespace slmkern {
namespace {

inline __mmask16 tail_mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 elements of x (any DType) as fp32, lanes outside `m` read nothing and are 0.
// bf16 -> fp32 is a shift and F16C's vcvtph2ps is exact, so every value matches load_as_f32.
inline __m512 load16_f32(const void* p, DType t, int64_t i, __mmask16 m) {
  if (t == DType::f32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  if (t == DType::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Quantize rows [0, rows) of x (row stride ldx) into qa (row stride lda >= Kp):
// qa[m][k] = q + 128 for k < K and 128 (q = 0) up to Kp, where the packed
// weights are zero anyway. sx[m] is the row scale; the spec is quantize_rows_s8_ref.
inline void quantize_rows_u8_avx512(const void* x, DType t, int64_t rows, int64_t K, int64_t ldx,
                                    uint8_t* qa, int64_t lda, float* sx) {
  const int64_t Kp = int8_padded_k(K);
  const __m512i absbits = _mm512_set1_epi32(0x7fffffff);
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t off = m * ldx;
    // amax as integers on |x|'s bit pattern: for finite floats the order is the
    // same, and NaN/inf patterns (>= 0x7f800000) sort above every finite value.
    __m512i mx0 = _mm512_setzero_si512(), mx1 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 v0 = load16_f32(x, t, off + k, 0xffff), v1 = load16_f32(x, t, off + k + 16, 0xffff);
      mx0 = _mm512_max_epu32(mx0, _mm512_and_si512(_mm512_castps_si512(v0), absbits));
      mx1 = _mm512_max_epu32(mx1, _mm512_and_si512(_mm512_castps_si512(v1), absbits));
    }
    for (; k < K; k += 16) {
      const __m512 v = load16_f32(x, t, off + k, tail_mask16(K - k));
      mx0 = _mm512_max_epu32(mx0, _mm512_and_si512(_mm512_castps_si512(v), absbits));
    }
    const uint32_t abits = _mm512_reduce_max_epu32(_mm512_max_epu32(mx0, mx1));
    uint8_t* qr = qa + m * lda;
    float amax;
    std::memcpy(&amax, &abits, 4);
    if (abits >= 0x7f800000u || amax < kActZeroThreshold) {
      std::memset(qr, 128, static_cast<size_t>(Kp));
      sx[m] = abits >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      continue;
    }
    const __m512 inv = _mm512_set1_ps(127.f / amax);
    // x * inv rounded once (no FMA), then rint half-to-even: nearbyint in the spec.
    const auto qround = [&](int64_t i, __mmask16 msk) {
      return _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16_f32(x, t, off + i, msk), inv),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    };
    k = 0;
    {
      // 64 at a time: in-lane saturating packs to int16, clamp, pack to int8,
      // then one dword permute restores the order.
      const __m512i lo16 = _mm512_set1_epi16(-127), hi16 = _mm512_set1_epi16(127);
      const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      const __m512i shift64 = _mm512_set1_epi8(static_cast<char>(0x80));
      for (; k + 64 <= K; k += 64) {
        __m512i a = _mm512_packs_epi32(qround(k, 0xffff), qround(k + 16, 0xffff));
        __m512i b = _mm512_packs_epi32(qround(k + 32, 0xffff), qround(k + 48, 0xffff));
        a = _mm512_min_epi16(_mm512_max_epi16(a, lo16), hi16);
        b = _mm512_min_epi16(_mm512_max_epi16(b, lo16), hi16);
        const __m512i q8 = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(a, b));
        _mm512_storeu_si512(qr + k, _mm512_xor_si512(q8, shift64));  // q + 128 as u8
      }
    }
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m128i shift = _mm_set1_epi8(static_cast<char>(0x80));
    for (; k < K; k += 16) {
      const __mmask16 msk = tail_mask16(K - k);
      const __m512i q = _mm512_min_epi32(_mm512_max_epi32(qround(k, msk), lo), hi);
      _mm_mask_storeu_epi8(qr + k, msk, _mm_xor_si128(_mm512_cvtepi32_epi8(q), shift));
    }
    for (k = K; k < Kp; ++k) qr[k] = 128;
    sx[m] = amax / 127.f;
  }
}

// Store 16 fp32 results as dtype t, rounding like store_from_f32 (RNE, quiet NaN).
inline void store16(void* y, DType t, int64_t i, __m512 v, __mmask16 m) {
  if (t == DType::f32) {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + i, m, v);
    return;
  }
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i u = _mm512_castps_si512(v);
  __m256i h;
  if (t == DType::bf16) {
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    h = _mm512_cvtepi32_epi16(r);
  } else {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // the spec's NaN is sign | 0x7e00 whatever the payload
    const __m256i sign = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
    const __m256i qnan = _mm256_or_si256(_mm256_and_si256(sign, _mm256_set1_epi16(static_cast<short>(0x8000))),
                                         _mm256_set1_epi16(0x7e00));
    h = _mm256_mask_mov_epi16(h, nan, qnan);
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + i, m, h);
}

}  // namespace
}  // namespace slmkern
