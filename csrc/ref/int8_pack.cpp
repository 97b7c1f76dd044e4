// Portable pieces every ISA shares: the int8 weight packer, half-precision
// conversions and the activation-quantization spec.
#include <algorithm>
#include <cmath>
#include <limits>

#include "slmkern/common.h"

namespace slmkern {

void int8_pack(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int8_t* out) {
  const int64_t Np = int8_padded_n(N), Kp = int8_padded_k(K);
  int32_t* colsum = reinterpret_cast<int32_t*>(out + Np * Kp);
  for (int64_t nb = 0; nb < Np / kInt8NB; ++nb) {
    int8_t* tile = out + nb * kInt8NB * Kp;
    for (int64_t kb = 0; kb < Kp / kInt8KB; ++kb) {
      for (int64_t i = 0; i < kInt8NB; ++i) {
        const int64_t n = nb * kInt8NB + i;
        for (int64_t j = 0; j < kInt8KB; ++j) {
          const int64_t k = kb * kInt8KB + j;
          tile[(kb * kInt8NB + i) * kInt8KB + j] = (n < N && k < K) ? w[n * ldw + k] : 0;
        }
      }
    }
  }
  for (int64_t n = 0; n < Np; ++n) {
    int32_t s = 0;
    if (n < N)
      for (int64_t k = 0; k < K; ++k) s += w[n * ldw + k];
    colsum[n] = s;
  }
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return sign | 0x7e00u;            // NaN
  if (au >= 0x477ff000u) return sign | 0x7c00u;           // overflow (after rounding) -> inf
  if (au < 0x38800000u) {                                  // result is subnormal or zero
    if (au < 0x33000000u) return sign;                     // below half of the smallest subnormal
    const uint32_t e = au >> 23, man = (au & 0x7fffffu) | 0x800000u;
    // value = man * 2^(e-150); the subnormal unit is 2^-24, so q = man >> (126 - e)
    const uint32_t s = static_cast<uint32_t>(126 - static_cast<int32_t>(e));  // right shift amount
    uint32_t q = man >> s;
    const uint32_t rem = man & ((1u << s) - 1), half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  // normal: rebias and round the 13 dropped mantissa bits to nearest even
  uint32_t v = au - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return sign | static_cast<uint16_t>(v >> 13);
}

void quantize_rows_s8_ref(const void* x, DType t, int64_t M, int64_t K, int64_t ldx,
                          int8_t* q, int64_t ldq, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::fabs(load_as_f32(x, t, m * ldx + k));
      if (!(v <= std::numeric_limits<float>::max())) finite = false;  // NaN or inf
      else amax = std::max(amax, v);
    }
    int8_t* qr = q + m * ldq;
    if (!finite || amax < kActZeroThreshold) {
      std::fill(qr, qr + K, int8_t(0));
      scale[m] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = 127.f / amax;
    for (int64_t k = 0; k < K; ++k) {
      float r = std::nearbyint(load_as_f32(x, t, m * ldx + k) * inv);
      r = std::min(127.f, std::max(-127.f, r));
      qr[k] = static_cast<int8_t>(r);
    }
    scale[m] = amax / 127.f;
  }
}

void quantize_rows_u7_ref(const void* x, DType t, int64_t M, int64_t K, int64_t ldx,
                          uint8_t* q, int64_t ldq, float* scale, int32_t* zero) {
  for (int64_t m = 0; m < M; ++m) {
    float lo = 0.f, hi = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = load_as_f32(x, t, m * ldx + k);
      if (!(std::fabs(v) <= std::numeric_limits<float>::max())) finite = false;  // NaN or inf
      else lo = std::min(lo, v), hi = std::max(hi, v);
    }
    const float range = hi - lo;
    if (!(range <= std::numeric_limits<float>::max())) finite = false;  // hi - lo overflowed
    uint8_t* qr = q + m * ldq;
    zero[m] = 0;
    if (!finite || range < kActZeroThreshold) {
      std::fill(qr, qr + K, uint8_t(0));
      scale[m] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = 127.f / range;
    const float z = std::min(127.f, std::max(0.f, std::nearbyint(-lo * inv)));
    for (int64_t k = 0; k < K; ++k) {
      float r = std::nearbyint(load_as_f32(x, t, m * ldx + k) * inv) + z;  // integers: the sum is exact
      r = std::min(127.f, std::max(0.f, r));
      qr[k] = static_cast<uint8_t>(r);
    }
    zero[m] = static_cast<int32_t>(z);
    scale[m] = range / 127.f;
  }
}

}  // namespace slmkern
