// Vector traits for the int4 engine (w4_engine.h): one struct per ISA, each
// compiled only in translation units built with that ISA's flags. Everything
// here has internal linkage, so the AVX2 and AVX-512 copies of a name never
// meet at link time.
//
// A 64-byte weight block (16 channels x 8 k, see slmkern/int4.h) is H vectors
// of L channels; lo()/hi() give the unsigned nibble operands (0..15) for the
// block's first and second 4-k halves, dot2() adds both u8 x s8 4-term dot
// products to an int32 accumulator per channel.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "slmkern/common.h"

namespace slmkern {
namespace {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Scalar element access for tails and the NaN/inf row path. Local copies of
// common.h's load_as_f32 / store_from_f32: an out-of-line copy of those built
// with AVX-512 flags must never be the one the linker keeps for baseline code.
inline float x_at(const void* p, DType t, int64_t i) {
  if (t == DType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (t == DType::f16) return f16_to_f32(h);  // out of line in int8_pack.cpp (baseline)
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void y_store(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32) {
    static_cast<float*>(p)[i] = v;
  } else if (t == DType::f16) {
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);  // out of line (baseline)
  } else {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    static_cast<uint16_t*>(p)[i] = nan ? static_cast<uint16_t>((u >> 16) | 0x40)
                                       : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512 shared parts: one zmm = the whole 16-channel block.
struct Avx512Base {
  static constexpr int H = 1, L = 16, kRegs = 32;
  using I = __m512i;
  using F = __m512;
  static I load_block(const uint8_t* p, int) { return _mm512_loadu_si512(p); }
  static I lo(I b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0f)); }
  static I hi(I b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0f)); }
  static I bq(const int8_t* p) { return _mm512_set1_epi32(load_i32(p)); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F loadf(const float* p, int) { return _mm512_loadu_ps(p); }
  static F loadf_n(const float* p, int, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }

  // v -> dtype at y[0, n): n <= 16. bf16 rounds to nearest even (NaN stays NaN),
  // f16 uses the hardware conversion (also round-to-nearest-even).
  static void store(void* y, DType t, F v, int n) {
    const __mmask16 mk = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
    if (t == DType::f32) {
      _mm512_mask_storeu_ps(y, mk, v);
    } else if (t == DType::bf16) {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i r = _mm512_srli_epi32(
          _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
          16);
      const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      const __mmask16 isnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __m512i h = _mm512_mask_blend_epi32(isnan, r, qnan);
      _mm256_mask_storeu_epi16(y, mk, _mm512_cvtepi32_epi16(h));
    } else {
      _mm256_mask_storeu_epi16(y, mk, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }

  // 16 elements of x (dtype t) at p as fp32.
  static F load_x(const void* p, DType t) {
    if (t == DType::f32) return _mm512_loadu_ps(p);
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    if (t == DType::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
  static F abs(F v) { return _mm512_abs_ps(v); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  // Lanes that are NaN or inf.
  static bool any_nonfinite(F v) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ) != 0;
  }
  // round-to-nearest-even to int32 (default MXCSR rounding, like nearbyint)
  static I to_int(F v) { return _mm512_cvtps_epi32(v); }
  static I clamp_i(I v, int32_t lo_, int32_t hi_) {
    return _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(hi_)), _mm512_set1_epi32(lo_));
  }
  static I srai(I v, int s) { return _mm512_srai_epi32(v, s); }
  // Balanced base-256 low digit of v: ((v + 128) & 255) - 128, in [-128, 127].
  static I low_digit(I v) {
    return _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)), _mm512_set1_epi32(255)),
                            _mm512_set1_epi32(128));
  }
  static I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
  static void store_s8(int8_t* p, I v, int n) {
    _mm_mask_storeu_epi8(p, static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u), _mm512_cvtepi32_epi8(v));
  }
  static int32_t hsum_i(I v) { return _mm512_reduce_add_epi32(v); }
};

#if defined(__AVX512VNNI__)
// u8 x s8 4-term dots with vpdpbusd: the nibble is the unsigned operand, so
// signed activations need no +128 shift.
struct Vnni512 : Avx512Base {
  static constexpr bool kChain = true;  // dot2 has latency: spread over accumulators
  // The activation is an embedded {1to16} broadcast from memory: GCC does not
  // fold _mm512_set1_epi32(load) into vpdpbusd and spends a uop per broadcast.
  static I dpbusd_bcast(I acc, I w, const int8_t* q) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(q)));
    return acc;
  }
  static I dot2(I acc, I l, I h, const int8_t* ql, const int8_t* qh) {
    return dpbusd_bcast(dpbusd_bcast(acc, l, ql), h, qh);
  }
};
#endif

// vpmaddubsw: u (<= 15) x q (s8) pairs are <= 2*15*128 = 3840 in magnitude,
// so the two halves add in int16 without saturation before vpmaddwd.
struct Bw512 : Avx512Base {
  static constexpr bool kChain = false;
  static I dot2(I acc, I l, I h, const int8_t* ql, const int8_t* qh) {
    const I t = _mm512_add_epi16(_mm512_maddubs_epi16(l, bq(ql)), _mm512_maddubs_epi16(h, bq(qh)));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(t, _mm512_set1_epi16(1)));
  }
};
#endif  // AVX-512

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// AVX2: a 64-byte block is two ymm halves, channels 0-7 then 8-15.
struct Avx2 {
  static constexpr int H = 2, L = 8, kRegs = 16;
  static constexpr bool kChain = false;
  using I = __m256i;
  using F = __m256;
  static I load_block(const uint8_t* p, int h) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h)); }
  static I lo(I b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0f)); }
  static I hi(I b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0f)); }
  static I bq(const int8_t* p) { return _mm256_set1_epi32(load_i32(p)); }
  static I dot2(I acc, I l, I h, const int8_t* ql, const int8_t* qh) {
    const I t = _mm256_add_epi16(_mm256_maddubs_epi16(l, bq(ql)), _mm256_maddubs_epi16(h, bq(qh)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(t, _mm256_set1_epi16(1)));
  }
  static I zero_i() { return _mm256_setzero_si256(); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  static F zero_f() { return _mm256_setzero_ps(); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F loadf(const float* p, int h) { return _mm256_loadu_ps(p + 8 * h); }
  static __m256i first_n(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F loadf_n(const float* p, int h, int n) { return _mm256_maskload_ps(p + 8 * h, first_n(n)); }

  // Activation-prep helpers (see Avx512Base); tails go through a padded copy.
  static F load_x(const void* p, DType t) {
    if (t == DType::f32) return _mm256_loadu_ps(static_cast<const float*>(p));
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    if (t == DType::bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
  static F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float hmax(F v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static bool any_nonfinite(F v) {
    return _mm256_movemask_ps(_mm256_cmp_ps(abs(v), _mm256_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ)) != 0;
  }
  static I to_int(F v) { return _mm256_cvtps_epi32(v); }
  static I clamp_i(I v, int32_t lo_, int32_t hi_) {
    return _mm256_max_epi32(_mm256_min_epi32(v, _mm256_set1_epi32(hi_)), _mm256_set1_epi32(lo_));
  }
  static I srai(I v, int s) { return _mm256_srai_epi32(v, s); }
  static I low_digit(I v) {
    return _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(v, _mm256_set1_epi32(128)), _mm256_set1_epi32(255)),
                            _mm256_set1_epi32(128));
  }
  static I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
  static void store_s8(int8_t* p, I v, int n) {
    // values are in [-128, 127]: saturating packs are exact
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i b = _mm_packs_epi16(w, w);
    if (n >= 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b);
    } else {
      alignas(16) int8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b);
      std::memcpy(p, tmp, static_cast<size_t>(n));
    }
  }
  static int32_t hsum_i(I v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }

  static void store(void* y, DType t, F v, int n) {
    if (t == DType::f32) {
      if (n >= 8) _mm256_storeu_ps(static_cast<float*>(y), v);
      else _mm256_maskstore_ps(static_cast<float*>(y), first_n(n), v);
      return;
    }
    __m128i h;
    if (t == DType::bf16) {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i r = _mm256_srli_epi32(
          _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                           _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))),
          16);
      const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i w = _mm256_blendv_epi8(r, qnan, isnan);
      // 8 x u32 (< 65536) -> 8 x u16
      h = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (n >= 8) {
      _mm_storeu_si128(static_cast<__m128i*>(y), h);
    } else {
      alignas(16) uint16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      std::memcpy(y, tmp, static_cast<size_t>(n) * 2);
    }
  }
};
#endif  // AVX2

}  // namespace
}  // namespace slmkern
