// 2:4 linear with float values (f32/bf16/f16) on AVX-512F: y = x @ W^T + bias, fp32 accumulation.
//
// No decompression: per 16 kept values of a row, one 32-bit meta word gives their in-group
// columns (vpbroadcastd, vpsrlvd by 0,2,..,30, and 3, + the group bases 0,0,4,4,..,28,28),
// and vpermt2ps picks the matching 16 activations out of a 32-column x window held in two
// registers; one FMA then does 16 useful multiply-adds. The index vector of a weight row is
// built once per window and reused for up to 4 x rows, and a row tile (4 weight rows) is one
// sequential stream of the packed layout, so M = 1 reads exactly the compressed bytes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "slmkern/sparse24.h"
#include "slmkern/threadpool.h"
#include "w8a8_quant_avx512.h"

namespace slmkern {
namespace {

thread_local ScratchBuf t_xs;

template <S24Values V>
inline __m512 load_vals16(const uint8_t* p) {
  if constexpr (V == S24Values::f32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (V == S24Values::bf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// acc[m][r] over every chunk of one row tile for MR x rows (xs rows of stride Kp).
template <S24Values V, int MR>
inline void tile_kernel(const uint8_t* tile, int64_t C, const float* xs, int64_t Kp, float out[4][4]) {
  constexpr int64_t vs = V == S24Values::f32 ? 4 : 2;
  constexpr int64_t bb = kS24TileN * kS24ChunkV * vs + kS24TileN * kS24ChunkMeta;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t* blk = tile + c * bb;
    const uint8_t* meta = blk + kS24TileN * kS24ChunkV * vs;
    _mm_prefetch(reinterpret_cast<const char*>(blk + 8 * bb), _MM_HINT_T0);
    for (int s = 0; s < 4; ++s) {
      __m512i idx[4];
      __m512 w[4];
      for (int r = 0; r < 4; ++r) {
        // base has bits 0-1 clear, so (t & 3) + base == (t & 3) | base: one vpternlogd
        int mw;
        std::memcpy(&mw, meta + r * kS24ChunkMeta + 4 * s, 4);
        const __m512i t = _mm512_srlv_epi32(_mm512_set1_epi32(mw), shifts);
        idx[r] = _mm512_ternarylogic_epi32(t, three, base, 0xEA);  // (A & B) | C
        w[r] = load_vals16<V>(blk + (r * kS24ChunkV + 16 * s) * vs);
      }
      for (int m = 0; m < MR; ++m) {
        const float* xw = xs + m * Kp + c * kS24ChunkK + 32 * s;
        const __m512 xa = _mm512_loadu_ps(xw), xb = _mm512_loadu_ps(xw + 16);
        for (int r = 0; r < 4; ++r)
          acc[m][r] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xa, idx[r], xb), w[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <S24Values V>
void run(const Sparse24Args& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp = s24_padded_k(K), C = Kp / kS24ChunkK;
  const int64_t T = s24_padded_n(N) / kS24TileN, tb = s24_tile_bytes(K, V);
  float* xs = reinterpret_cast<float*>(t_xs.get(static_cast<size_t>(M * Kp * 4 + M)));
  uint8_t* bad = reinterpret_cast<uint8_t*>(xs + M * Kp);
  for (int64_t m = 0; m < M; ++m) {
    float* xr = xs + m * Kp;
    __mmask16 nonfinite = 0;
    for (int64_t k = 0; k < Kp; k += 16) {
      const __mmask16 msk = k < K ? tail_mask16(K - k) : 0;
      const __m512 v = load16_f32(a.x, a.dtype, m * a.ldx + k, msk);
      nonfinite |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
      _mm512_storeu_ps(xr + k, v);
    }
    bad[m] = nonfinite != 0;
  }
  // Tasks of a few row tiles (~96 KB of weights): their weights stay in L2 while every
  // block of 4 x rows runs over them.
  const int64_t tg = std::max<int64_t>(1, (96 << 10) / tb), n_tasks = ceil_div(T, tg);
  parallel_for(n_tasks, a.n_threads, [&](int64_t task) {
    const int64_t t0 = task * tg, t1 = std::min(T, t0 + tg);
    for (int64_t t = t0; t < t1; ++t) {  // a row tile's weights stay in L1 across the x-row blocks
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
        float out[4][4];
        const uint8_t* tile = a.w_packed + t * tb;
        const float* x0 = xs + m0 * Kp;
        switch (mr) {
          case 1: tile_kernel<V, 1>(tile, C, x0, Kp, out); break;
          case 2: tile_kernel<V, 2>(tile, C, x0, Kp, out); break;
          case 3: tile_kernel<V, 3>(tile, C, x0, Kp, out); break;
          default: tile_kernel<V, 4>(tile, C, x0, Kp, out); break;
        }
        for (int m = 0; m < mr; ++m)
          for (int r = 0; r < 4; ++r) {
            const int64_t n = t * kS24TileN + r;
            if (n >= N) break;
            float v = out[m][r];
            if (a.bias) v = v + a.bias[n];
            store_from_f32(a.y, a.dtype, (m0 + m) * a.ldy + n, v);
          }
      }
    }
  });
  for (int64_t m = 0; m < M; ++m)
    if (bad[m]) sparse24_f_dense_row(a, xs + m * Kp, m);
}

}  // namespace

void sparse24_f_linear_avx512(const Sparse24Args& a) {
  switch (a.values) {
    case S24Values::f32: run<S24Values::f32>(a); break;
    case S24Values::bf16: run<S24Values::bf16>(a); break;
    default: run<S24Values::f16>(a); break;
  }
}

}  // namespace slmkern
