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

namespace slmkern {

// Hugging Face's RMSNorm on one fp32 row, with the residual add before it, bit for bit the aten ops
//   h = a + b;  var = h.pow(2).mean(-1);  x = w * (h * rsqrt(var + eps))
// The mean's sum follows aten's float sum of a contiguous row (ATen/native/cpu/SumKernel.cpp: vectors of
// `lanes` floats, 4 interleaved accumulators, a cascade every 16 steps, the lanes added last in order), then
// one division by n. slmkern.decoder checks this against the aten ops at run time (random rows, every width
// it will see) and uses it only where they agree, so a torch with another summation order falls back to aten.
// h_out may be null (no residual output), b may be null (no add).
void add_rms_norm_f32(const float* a, const float* b, int64_t n, const float* w, float eps, float* h_out,
                      float* x_out, int lanes) {
  constexpr int kIlp = 4, kLevels = 4, kMaxLanes = 16;
  float* h = h_out;
  // h (the residual sum) is needed twice; without h_out keep it in x_out and overwrite in place at the end
  if (!h) h = x_out;
  for (int64_t i = 0; i < n; ++i) h[i] = b ? a[i] + b[i] : a[i];

  const int64_t vec_size = n / lanes;             // whole vectors
  const int64_t size_ilp = vec_size / kIlp;       // rows of kIlp vectors
  const int64_t level_power = 4;                  // max(4, ceil_log2(size_ilp) / 4): 4 below 2^16 rows
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  float acc[kLevels][kIlp][kMaxLanes] = {};
  auto sq = [&](int64_t idx) { const float v = h[idx]; return v * v; };
  int64_t i = 0;
  for (; i + level_step <= size_ilp;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < lanes; ++l) acc[0][k][l] += sq((i * kIlp + k) * lanes + l);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < lanes; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size_ilp; ++i)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < lanes; ++l) acc[0][k][l] += sq((i * kIlp + k) * lanes + l);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < lanes; ++l) acc[0][k][l] += acc[j][k][l];
  // row_sum: leftover whole vectors into partial 0, then partials 1..3 into 0
  for (int64_t v = size_ilp * kIlp; v < vec_size; ++v)
    for (int l = 0; l < lanes; ++l) acc[0][0][l] += sq(v * lanes + l);
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < lanes; ++l) acc[0][0][l] += acc[0][k][l];
  // vectorized_inner_sum: scalar tail first, then the lanes in order
  float total = 0.f;
  for (int64_t k = vec_size * lanes; k < n; ++k) total += sq(k);
  for (int l = 0; l < lanes; ++l) total += acc[0][0][l];

  const float var = total / static_cast<float>(n);
  const float r = 1.f / __builtin_sqrtf(var + eps);
  for (int64_t k = 0; k < n; ++k) x_out[k] = w[k] * (h[k] * r);
}

}  // namespace slmkern
