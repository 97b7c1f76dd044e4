// Batch-1 decoder helpers for slmkern.decoder.LeanDecoder (fp32): the rotary embedding of q and k and the
// KV-cache write in one call, bit for bit the aten ops Hugging Face runs,
//   q_out = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[D/2:], x[:D/2]),
// each product rounded on its own and then added (aten's mul, mul, add). This file is built with the
// baseline ISA only, so the compiler has no FMA to contract a*b + c*d into (which would change the bits).
#include <cstdint>

namespace slmkern {

// qkv: [M, (H + 2*Hkv) * D] rows (the fused q/k/v projection's output, row stride ld_qkv);
// cos, sin: [M, D]; q_out: [H, M, D] contiguous; k_cache, v_cache: [Hkv, L, D] with head stride
// cache_head_stride, written at positions [pos, pos + M).
void rope_qkv_f32(const float* qkv, int64_t ld_qkv, int64_t M, int64_t H, int64_t Hkv, int64_t D,
                  const float* cos, const float* sin, float* q_out, float* k_cache, float* v_cache,
                  int64_t cache_head_stride, int64_t pos) {
  const int64_t half = D / 2;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = qkv + m * ld_qkv;
    const float* c = cos + m * D;
    const float* s = sin + m * D;
    for (int64_t h = 0; h < H + Hkv; ++h) {
      const float* x = row + h * D;
      float* out = h < H ? q_out + (h * M + m) * D : k_cache + (h - H) * cache_head_stride + (pos + m) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float rot = d < half ? -x[d + half] : x[d - half];
        const float a = x[d] * c[d];
        const float b = rot * s[d];
        out[d] = a + b;
      }
    }
    const float* v = row + (H + Hkv) * D;
    for (int64_t h = 0; h < Hkv; ++h) {
      float* out = v_cache + h * cache_head_stride + (pos + m) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = v[h * D + d];
    }
  }
}

}  // namespace slmkern
