// 2:4 linear on AVX2 (float values and int8 values). Simpler than the AVX-512 kernels.
// Float values (layout version 1): each weight row is expanded on the fly, in registers, to
// dense 8-column vectors through a 256-entry table indexed by one meta byte (two groups):
// vpermps of the 4 kept values (lanes 4..7 zero) by the byte's lane table.
// int8 values (layout version 2, 16-row tiles of 8-column windows): the window's 8 activations
// as int16 are broadcast to both 128-bit lanes and vpshufb, with a control built from the rows'
// meta bytes (a 256-entry table of 8-byte controls), picks each kept value's activation; vpmaddwd
// with the kept values widened to int16 is exact. Each control feeds up to 2 x rows. int8 values
// follow w8a8's math bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "slmkern/sparse24.h"
#include "slmkern/threadpool.h"

namespace slmkern {
namespace {

struct Tables {
  alignas(32) int32_t fidx[256][8];   // float lanes: kept value 0..3, or 4 (a zero lane)
  alignas(16) uint8_t lo[256][16];    // int16 lanes of kept values 0..3 (pshufb bytes; 0x80 = 0)
  alignas(16) uint8_t hi[256][16];    // the same for kept values 4..7
  uint64_t ctl[256];                  // int8 (v2): pshufb bytes of the 4 kept values' int16 activations
  Tables() {
    for (int b = 0; b < 256; ++b) {
      uint64_t c = 0;
      for (int j = 0; j < 4; ++j) {
        const int col = 4 * (j / 2) + ((b >> (2 * j)) & 3);
        c |= static_cast<uint64_t>(2 * col) << (16 * j) | static_cast<uint64_t>(2 * col + 1) << (16 * j + 8);
      }
      ctl[b] = c;
    }
    for (int b = 0; b < 256; ++b) {
      for (int l = 0; l < 8; ++l) fidx[b][l] = 4;
      for (int l = 0; l < 16; ++l) lo[b][l] = hi[b][l] = 0x80;
      const int cols[4] = {b & 3, (b >> 2) & 3, 4 + ((b >> 4) & 3), 4 + ((b >> 6) & 3)};
      for (int j = 0; j < 4; ++j) {
        fidx[b][cols[j]] = j;
        lo[b][2 * cols[j]] = static_cast<uint8_t>(2 * j);
        lo[b][2 * cols[j] + 1] = static_cast<uint8_t>(2 * j + 1);
        hi[b][2 * cols[j]] = static_cast<uint8_t>(2 * j + 8);
        hi[b][2 * cols[j] + 1] = static_cast<uint8_t>(2 * j + 9);
      }
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline __m128 load_vals4(const uint8_t* p, S24Values v) {
  if (v == S24Values::f32) return _mm_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if (v == S24Values::bf16) return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  return _mm_cvtph_ps(h);
}

template <int MR>
void f_tile(const uint8_t* tile, int64_t C, S24Values v, const float* xs, int64_t Kp, float out[2][4]) {
  const Tables& tb = tables();
  const int64_t vs = s24_value_size(v), bb = s24_block_bytes(v);
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t* blk = tile + c * bb;
    const uint8_t* meta = blk + kS24TileN * kS24ChunkV * vs;
    for (int s = 0; s < 16; ++s) {  // 8 dense columns = one meta byte = 4 kept values
      __m256 wd[4];
      for (int r = 0; r < 4; ++r) {
        const __m256i li = _mm256_load_si256(reinterpret_cast<const __m256i*>(tb.fidx[meta[r * kS24ChunkMeta + s]]));
        const __m256 v4 = _mm256_zextps128_ps256(load_vals4(blk + (r * kS24ChunkV + 4 * s) * vs, v));
        wd[r] = _mm256_permutevar8x32_ps(v4, li);
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(xs + m * Kp + c * kS24ChunkK + 8 * s);
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_fmadd_ps(wd[r], xv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      out[m][r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    }
}

// int8 (layout v2): one 16-row tile, MR x rows (int16, stride Kp), over all S blocks.
template <int MR>
void i_tile(const uint8_t* tile, int64_t S, const int16_t* xs, int64_t Kp, int32_t out[2][16]) {
  const Tables& tb = tables();
  __m256i acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int g = 0; g < 4; ++g) acc[m][g] = _mm256_setzero_si256();
  for (int64_t s = 0; s < S; ++s) {
    const uint8_t* blk = tile + s * kS24I8Block;
    const uint8_t* meta = blk + 256;
    for (int w = 0; w < 4; ++w) {
      __m256i xb[MR];
      for (int m = 0; m < MR; ++m)
        xb[m] = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + m * Kp + kS24I8BlockK * s + 8 * w)));
      for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3: meta bytes at 8(r/2) + 2w + (r%2)
        const uint8_t* mb = meta + 16 * g + 2 * w;
        const __m256i ctl = _mm256_setr_epi64x(static_cast<long long>(tb.ctl[mb[0]]), static_cast<long long>(tb.ctl[mb[1]]),
                                               static_cast<long long>(tb.ctl[mb[8]]), static_cast<long long>(tb.ctl[mb[9]]));
        const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 64 * w + 16 * g)));
        for (int m = 0; m < MR; ++m)
          acc[m][g] = _mm256_add_epi32(acc[m][g], _mm256_madd_epi16(_mm256_shuffle_epi8(xb[m], ctl), w16));
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int g = 0; g < 4; ++g) {
      alignas(32) int32_t v[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(v), acc[m][g]);
      for (int i = 0; i < 4; ++i) out[m][4 * g + i] = v[2 * i] + v[2 * i + 1];
    }
}

// Tasks of a few row tiles (~96 KB of weights), each run over every pair of x rows.
template <class TileFn, class Epi>
void run_tiles(const Sparse24Args& a, int64_t tb, TileFn tile_fn, Epi epi) {
  const int64_t T = s24_padded_n(a.N) / kS24TileN;
  const int64_t tg = std::max<int64_t>(1, (96 << 10) / tb), n_tasks = ceil_div(T, tg);
  parallel_for(n_tasks, a.n_threads, [&](int64_t task) {
    const int64_t t0 = task * tg, t1 = std::min(T, t0 + tg);
    for (int64_t m0 = 0; m0 < a.M; m0 += 2) {
      const int mr = a.M - m0 >= 2 ? 2 : 1;
      for (int64_t t = t0; t < t1; ++t) tile_fn(t, m0, mr, epi);
    }
  });
}

}  // namespace

void sparse24_f_linear_avx2(const Sparse24Args& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp = s24_padded_k(K), C = Kp / kS24ChunkK;
  const int64_t tb = s24_tile_bytes(K, a.values);
  std::vector<float> xs(static_cast<size_t>(M * Kp), 0.f);
  std::vector<uint8_t> bad(static_cast<size_t>(M), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float f = load_as_f32(a.x, a.dtype, m * a.ldx + k);
      xs[m * Kp + k] = f;
      bad[m] |= !std::isfinite(f);
    }
  auto epi = [&](int64_t t, int64_t m0, int mr, float out[2][4]) {
    for (int m = 0; m < mr; ++m)
      for (int r = 0; r < 4; ++r) {
        const int64_t n = t * kS24TileN + r;
        if (n >= N) break;
        float v = out[m][r];
        if (a.bias) v = v + a.bias[n];
        store_from_f32(a.y, a.dtype, (m0 + m) * a.ldy + n, v);
      }
  };
  run_tiles(a, tb, [&](int64_t t, int64_t m0, int mr, decltype(epi)& e) {
    float out[2][4];
    const uint8_t* tile = a.w_packed + t * tb;
    if (mr == 2) f_tile<2>(tile, C, a.values, xs.data() + m0 * Kp, Kp, out);
    else f_tile<1>(tile, C, a.values, xs.data() + m0 * Kp, Kp, out);
    e(t, m0, mr, out);
  }, epi);
  for (int64_t m = 0; m < M; ++m)
    if (bad[m]) sparse24_f_dense_row(a, xs.data() + m * Kp, m);
}

void sparse24_i8_linear_avx2(const Sparse24Args& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp = s24i8_padded_k(K), S = Kp / kS24I8BlockK;
  const int64_t tb = s24i8_tile_bytes(K), T = s24i8_padded_n(N) / kS24I8TileN;
  std::vector<int8_t> q(static_cast<size_t>(M * Kp), 0);
  std::vector<int16_t> xs(static_cast<size_t>(M * Kp), 0);
  std::vector<float> sx(static_cast<size_t>(M));
  quantize_rows_s8_ref(a.x, a.dtype, M, K, a.ldx, q.data(), Kp, sx.data());
  for (size_t i = 0; i < q.size(); ++i) xs[i] = q[i];
  // Tasks of a few row tiles (~96 KB of weights), each run over every pair of x rows.
  const int64_t tg = std::max<int64_t>(1, (96 << 10) / tb), n_tasks = ceil_div(T, tg);
  parallel_for(n_tasks, a.n_threads, [&](int64_t task) {
    const int64_t t0 = task * tg, t1 = std::min(T, t0 + tg);
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      const int mr = M - m0 >= 2 ? 2 : 1;
      for (int64_t t = t0; t < t1; ++t) {
        int32_t out[2][16];
        const uint8_t* tile = a.w_packed + t * tb;
        if (mr == 2) i_tile<2>(tile, S, xs.data() + m0 * Kp, Kp, out);
        else i_tile<1>(tile, S, xs.data() + m0 * Kp, Kp, out);
        for (int m = 0; m < mr; ++m)
          for (int r = 0; r < 16; ++r) {
            const int64_t n = t * kS24I8TileN + r;
            if (n >= N) break;
            const float sc = sx[m0 + m] * a.scales[n];
            float v = static_cast<float>(out[m][r]) * sc;
            if (a.bias) v = v + a.bias[n];
            store_from_f32(a.y, a.dtype, (m0 + m) * a.ldy + n, v);
          }
      }
    }
  });
}

}  // namespace slmkern
