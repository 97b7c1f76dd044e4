// Scalar 2:4 linear kernels: the C++ spec every SIMD variant is tested against, plus the
// packer of the CPU layout (csrc/include/slmkern/sparse24.h) and the dense-emulation of
// non-finite x rows that every float variant shares.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "slmkern/sparse24.h"
#include "slmkern/threadpool.h"

namespace slmkern {
namespace {

// Value i of row r in chunk block `blk`, as fp32 (float values) or int (int8 values).
inline float value_f(const uint8_t* blk, S24Values v, int64_t r, int64_t i) {
  const int64_t j = r * kS24ChunkV + i;
  switch (v) {
    case S24Values::f32: { float f; std::memcpy(&f, blk + 4 * j, 4); return f; }
    case S24Values::bf16: { uint16_t h; std::memcpy(&h, blk + 2 * j, 2); return bf16_to_f32(h); }
    default: { uint16_t h; std::memcpy(&h, blk + 2 * j, 2); return f16_to_f32(h); }
  }
}

// Dense column (within the chunk) of kept value i of row r.
inline int64_t kept_col(const uint8_t* meta, int64_t r, int64_t i) {
  const uint8_t b = meta[r * kS24ChunkMeta + i / 4];
  return 4 * (i / 2) + ((b >> (2 * (i % 4))) & 3);
}

// x rows as fp32, zero padded to Kp; returns per-row "has a NaN/inf".
std::vector<uint8_t> rows_to_f32(const Sparse24Args& a, int64_t Kp, std::vector<float>& xs) {
  xs.assign(static_cast<size_t>(a.M * Kp), 0.f);
  std::vector<uint8_t> bad(static_cast<size_t>(a.M), 0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t k = 0; k < a.K; ++k) {
      const float f = load_as_f32(a.x, a.dtype, m * a.ldx + k);
      xs[m * Kp + k] = f;
      if (!std::isfinite(f)) bad[m] = 1;
    }
  return bad;
}


// int8 layout (version 2): offsets in a block of kept value j of window w of row r, and of its meta byte.
inline int64_t i8_value_off(int64_t r, int64_t w, int64_t j) { return 64 * w + 4 * r + j; }
inline int64_t i8_meta_off(int64_t r, int64_t w) { return 4 * kS24I8TileN * 4 + 8 * (r / 2) + 2 * w + (r % 2); }

void pack_i8(const int8_t* vals, const uint8_t* meta, int64_t N, int64_t K, uint8_t* out) {
  const int64_t H = K / 2, MB = ceil_div(K, 8), S = s24i8_padded_k(K) / kS24I8BlockK;
  const int64_t T = s24i8_padded_n(N) / kS24I8TileN;
  std::memset(out, 0, static_cast<size_t>(s24_packed_bytes(N, K, S24Values::i8)));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = n / kS24I8TileN, r = n % kS24I8TileN;
    uint8_t* tile = out + t * S * kS24I8Block;
    for (int64_t i = 0; i < H; ++i)  // canonical value i: block i/16, window (i/4)%4, slot i%4
      tile[(i / 16) * kS24I8Block + i8_value_off(r, (i / 4) % 4, i % 4)] = static_cast<uint8_t>(vals[n * H + i]);
    for (int64_t b = 0; b < MB; ++b) tile[(b / 4) * kS24I8Block + i8_meta_off(r, b % 4)] = meta[n * MB + b];
  }
  int32_t* rs = reinterpret_cast<int32_t*>(out + T * S * kS24I8Block);
  for (int64_t n = 0; n < N; ++n) {
    int32_t sum = 0;
    for (int64_t i = 0; i < H; ++i) sum += vals[n * H + i];
    rs[n] = sum;
  }
}

}  // namespace

void sparse24_pack(const void* values, const uint8_t* meta, int64_t N, int64_t K, S24Values v, uint8_t* out) {
  if (v == S24Values::i8) {
    pack_i8(static_cast<const int8_t*>(values), meta, N, K, out);
    return;
  }
  const int64_t vs = s24_value_size(v), H = K / 2, MB = ceil_div(K, 8);
  const int64_t C = s24_padded_k(K) / kS24ChunkK, T = s24_padded_n(N) / kS24TileN, bb = s24_block_bytes(v);
  const uint8_t* vals = static_cast<const uint8_t*>(values);
  std::memset(out, 0, static_cast<size_t>(s24_packed_bytes(N, K, v)));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      uint8_t* blk = out + (t * C + c) * bb;
      uint8_t* mblk = blk + kS24TileN * kS24ChunkV * vs;
      for (int64_t r = 0; r < kS24TileN; ++r) {
        const int64_t n = t * kS24TileN + r;
        if (n >= N) break;
        const int64_t i0 = c * kS24ChunkV, i1 = std::min(H, i0 + kS24ChunkV);
        if (i1 > i0) std::memcpy(blk + r * kS24ChunkV * vs, vals + (n * H + i0) * vs, static_cast<size_t>((i1 - i0) * vs));
        const int64_t b0 = c * kS24ChunkMeta, b1 = std::min(MB, b0 + kS24ChunkMeta);
        if (b1 > b0) std::memcpy(mblk + r * kS24ChunkMeta, meta + n * MB + b0, static_cast<size_t>(b1 - b0));
      }
    }
}

void sparse24_f_dense_row(const Sparse24Args& a, const float* xrow, int64_t m) {
  const int64_t C = s24_padded_k(a.K) / kS24ChunkK, bb = s24_block_bytes(a.values);
  const int64_t vbytes = kS24TileN * kS24ChunkV * s24_value_size(a.values);
  std::vector<float> w(static_cast<size_t>(C * kS24ChunkK));
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t t = n / kS24TileN, r = n % kS24TileN;
    std::fill(w.begin(), w.end(), 0.f);
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* blk = a.w_packed + (t * C + c) * bb;
      for (int64_t i = 0; i < kS24ChunkV; ++i)
        w[c * kS24ChunkK + kept_col(blk + vbytes, r, i)] = value_f(blk, a.values, r, i);
    }
    float acc = 0.f;  // every k, zeros included: 0 * inf = NaN exactly where F.linear has it
    for (int64_t k = 0; k < a.K; ++k) acc += xrow[k] * w[k];
    if (a.bias) acc = acc + a.bias[n];
    store_from_f32(a.y, a.dtype, m * a.ldy + n, acc);
  }
}

void sparse24_f_linear_ref(const Sparse24Args& a) {
  const int64_t Kp = s24_padded_k(a.K), C = Kp / kS24ChunkK, bb = s24_block_bytes(a.values);
  const int64_t vbytes = kS24TileN * kS24ChunkV * s24_value_size(a.values);
  std::vector<float> xs;
  const std::vector<uint8_t> bad = rows_to_f32(a, Kp, xs);
  parallel_chunks(a.N, a.n_threads, kS24TileN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n / kS24TileN, r = n % kS24TileN;
      for (int64_t m = 0; m < a.M; ++m) {
        if (bad[m]) continue;
        const float* xr = xs.data() + m * Kp;
        float acc = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const uint8_t* blk = a.w_packed + (t * C + c) * bb;
          for (int64_t i = 0; i < kS24ChunkV; ++i)
            acc += value_f(blk, a.values, r, i) * xr[c * kS24ChunkK + kept_col(blk + vbytes, r, i)];
        }
        if (a.bias) acc = acc + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, acc);
      }
    }
  });
  for (int64_t m = 0; m < a.M; ++m)
    if (bad[m]) sparse24_f_dense_row(a, xs.data() + m * Kp, m);
}

void sparse24_i8_linear_ref(const Sparse24Args& a) {
  const int64_t Kp = s24i8_padded_k(a.K), S = Kp / kS24I8BlockK, tb = s24i8_tile_bytes(a.K);
  std::vector<int8_t> qx(static_cast<size_t>(a.M * Kp), 0);
  std::vector<float> sx(static_cast<size_t>(a.M));
  quantize_rows_s8_ref(a.x, a.dtype, a.M, a.K, a.ldx, qx.data(), Kp, sx.data());
  parallel_chunks(a.N, a.n_threads, kS24I8TileN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n / kS24I8TileN, r = n % kS24I8TileN;
      for (int64_t m = 0; m < a.M; ++m) {
        const int8_t* xr = qx.data() + m * Kp;
        int32_t acc = 0;
        for (int64_t s = 0; s < S; ++s) {
          const uint8_t* blk = a.w_packed + t * tb + s * kS24I8Block;
          for (int64_t w = 0; w < 4; ++w) {
            const uint8_t mb = blk[i8_meta_off(r, w)];
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t col = kS24I8BlockK * s + 8 * w + 4 * (j / 2) + ((mb >> (2 * j)) & 3);
              acc += int32_t(static_cast<int8_t>(blk[i8_value_off(r, w, j)])) * int32_t(xr[col]);
            }
          }
        }
        const float sc = sx[m] * a.scales[n];
        float v = static_cast<float>(acc) * sc;
        if (a.bias) v = v + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, v);
      }
    }
  });
}

}  // namespace slmkern
