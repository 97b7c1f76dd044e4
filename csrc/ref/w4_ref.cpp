// The int4 packer and the scalar int4 kernels: the C++ spec of w4a16_linear
// and w4a8_linear that every SIMD variant is tested against. Both read the
// packed layout of slmkern/int4.h, so they check the packer too.
#include <cstring>
#include <vector>

#include "slmkern/int4.h"
#include "slmkern/threadpool.h"

namespace slmkern {
namespace {

inline float load_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

inline void store_f32(uint8_t* p, float f) { std::memcpy(p, &f, 4); }

// Code u[n, k] and (s, sz) of channel i of tile t, read back from the blob.
struct PackedReader {
  const Int4Layout& L;
  const uint8_t* blob;

  const uint8_t* group(int64_t t, int64_t q) const { return blob + t * L.tile_bytes + q * L.group_bytes; }
  int code(int64_t t, int64_t i, int64_t k) const {
    const int64_t q = k / L.g, kk = k % L.g, b = kk / kInt4KB, j = kk % kInt4KB;
    const uint8_t byte = group(t, q)[b * kInt4BlockBytes + i * 4 + (j & 3)];
    return j < 4 ? (byte & 0xf) : (byte >> 4);
  }
  float scale(int64_t t, int64_t q, int64_t i) const {
    return load_f32(group(t, q) + L.nblk * kInt4BlockBytes + i * 4);
  }
  float scale_zero(int64_t t, int64_t q, int64_t i) const {
    if (!L.asym) return 8.f * scale(t, q, i);
    return load_f32(group(t, q) + L.nblk * kInt4BlockBytes + kInt4BlockBytes + i * 4);
  }
};

}  // namespace

void int4_pack(const uint8_t* w, int64_t N, int64_t K, int64_t ldw, const float* scales,
               const void* zeros, Int4Zeros zt, int64_t g, uint8_t* out) {
  const Int4Layout L = int4_layout(N, K, g, zt != Int4Zeros::none);
  std::memset(out, 0, static_cast<size_t>(L.total));
  for (int64_t t = 0; t < L.NT; ++t) {
    for (int64_t q = 0; q < L.G; ++q) {
      uint8_t* grp = out + t * L.tile_bytes + q * L.group_bytes;
      for (int64_t i = 0; i < kInt4NB; ++i) {
        const int64_t n = t * kInt4NB + i;
        if (n >= N) continue;
        for (int64_t kk = 0; kk < g; ++kk) {
          const int64_t k = q * g + kk;
          const uint8_t byte = w[n * ldw + k / 2];
          const uint8_t u = (k & 1) ? (byte >> 4) : (byte & 0xf);
          const int64_t b = kk / kInt4KB, j = kk % kInt4KB;
          grp[b * kInt4BlockBytes + i * 4 + (j & 3)] |= static_cast<uint8_t>(j < 4 ? u : u << 4);
        }
        const float s = scales[n * L.G + q];
        store_f32(grp + L.nblk * kInt4BlockBytes + i * 4, s);
        if (zt != Int4Zeros::none) {
          const float z = zt == Int4Zeros::u8 ? static_cast<float>(static_cast<const uint8_t*>(zeros)[n * L.G + q])
                                              : static_cast<const float*>(zeros)[n * L.G + q];
          store_f32(grp + L.nblk * kInt4BlockBytes + kInt4BlockBytes + i * 4, s * z);
        }
      }
    }
  }
}

// W[n, k] = u*s - sz in fp32 (for symmetric weights (u - 8)*s, one rounding),
// then a plain fp32 dot product.
void w4a16_linear_ref(const Int4LinearArgs& a) {
  const Int4Layout L = int4_layout(a.N, a.K, a.group_size, a.asym);
  const PackedReader R{L, a.w_packed};
  const int64_t M = a.M, K = a.K;
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = load_as_f32(a.x, a.dtype, m * a.ldx + k);
  parallel_for(L.NT, a.n_threads, [&](int64_t t) {
    std::vector<float> wrow(static_cast<size_t>(K));
    for (int64_t i = 0; i < kInt4NB; ++i) {
      const int64_t n = t * kInt4NB + i;
      if (n >= a.N) break;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t q = k / L.g;
        const int u = R.code(t, i, k);
        wrow[k] = a.asym ? static_cast<float>(u) * R.scale(t, q, i) - R.scale_zero(t, q, i)
                         : static_cast<float>(u - 8) * R.scale(t, q, i);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xf.data() + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * wrow[k];
        if (a.bias) acc = acc + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, acc);
      }
    }
  });
}

void w4a8_linear_ref(const Int4LinearArgs& a) {
  const Int4Layout L = int4_layout(a.N, a.K, a.group_size, a.asym);
  const PackedReader R{L, a.w_packed};
  const int64_t M = a.M, K = a.K;
  std::vector<int8_t> qx(static_cast<size_t>(M * K));
  std::vector<float> sx(static_cast<size_t>(M));
  quantize_rows_s8_ref(a.x, a.dtype, M, K, a.ldx, qx.data(), K, sx.data());
  std::vector<int32_t> asum(static_cast<size_t>(M * L.G), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) asum[m * L.G + k / L.g] += qx[m * K + k];
  parallel_for(L.NT, a.n_threads, [&](int64_t t) {
    for (int64_t i = 0; i < kInt4NB; ++i) {
      const int64_t n = t * kInt4NB + i;
      if (n >= a.N) break;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = qx.data() + m * K;
        float sum = 0.f;
        for (int64_t q = 0; q < L.G; ++q) {
          int32_t acc = 0;
          for (int64_t k = q * L.g; k < (q + 1) * L.g; ++k) acc += int32_t(xr[k]) * R.code(t, i, k);
          const float term = R.scale(t, q, i) * static_cast<float>(acc) -
                             R.scale_zero(t, q, i) * static_cast<float>(asum[m * L.G + q]);
          sum += term;
        }
        float v = sx[m] * sum;
        if (a.bias) v = v + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, v);
      }
    }
  });
}

}  // namespace slmkern
