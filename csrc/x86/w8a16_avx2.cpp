// W8A16 linear, AVX2/FMA/F16C: y[M, N] = (x[M, K] @ float(W)^T) * w_scale + bias,
// x and y in f32/bf16/f16, W in the int8 packed layout of slmkern/common.h, fp32 accumulation.
//
// One 64-byte tile row holds 16 channels x 4 consecutive k; each 8-byte piece
// (channels 2v, 2v+1 x k 0..3) sign-extends and converts to one ymm, which an FMA
// with the broadcast x chunk [x_k0..x_k3] x2 accumulates into 4 partial sums per
// channel. With 16 ymm registers a micro-kernel covers 4 channels x 5 rows
// (10 accumulators + 5 x chunks; each weight vector converted once for 5 rows),
// or 16 channels x 1 row for M = 1; partial sums are added once, after the K loop.
#include <immintrin.h>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"
#include "w8a16_plan.h"

namespace slmkern {
namespace {

constexpr int kMR = 5;  // rows per micro-kernel: 10 accumulators + 5 x chunks + 1 weight
// Software prefetch along the weight stream (the hardware prefetcher alone
// falls behind). One pass over a whole tile (M = 1): 4 KB ahead, into L1.
// Quad passes: the first of the four touches every line of the tile at
// ~13 B/cycle, more than DRAM gives one core, so it pulls the next tile into
// L2 while the four passes over this one run.
constexpr int64_t kPrefetchBytes = 4096;

// a[j] lanes 0-3 / 4-7 = partial sums of channels 2j / 2j+1  ->  lane c = channel c.
inline __m256 reduce_partials(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  // Two in-lane hadds leave channels {0,2,4,6} in the low and {1,3,5,7} in the
  // high 128 bits; one permute interleaves them.
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline __m256 load_weights(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 broadcast_x(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }

inline __m256 broadcast_x_tail(const float* p, int ktail) {
  const __m128i km = _mm_cmpgt_epi32(_mm_set1_epi32(ktail), _mm_setr_epi32(0, 1, 2, 3));
  const __m128 v = _mm_maskload_ps(p, km);  // masked-off lanes are not read
  return _mm256_insertf128_ps(_mm256_castps128_ps256(v), v, 1);
}

// a0 / a1 lanes 0-3 = partials of channels 0 / 2, lanes 4-7 = channels 1 / 3  ->  4 sums.
inline __m128 reduce_partials4(__m256 a0, __m256 a1) {
  const __m256 h = _mm256_hadd_ps(a0, a1);     // lo: c0 c0 c2 c2, hi: c1 c1 c3 c3
  const __m256 g = _mm256_hadd_ps(h, h);       // lo: c0 c2 .. .., hi: c1 c3 .. ..
  return _mm_unpacklo_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1));
}

// Channels n0 + 4*q0 + [0, 4*NQ) of one tile (NQ = 1, 2 or 4 quads of 4) for R rows:
// res[r * 16 + 4*q0 + c] = sum_k x[r, k] * W[n0 + 4*q0 + c, k].
template <int R, int NQ>
inline void block_dot(const float* x, int64_t ldx, int64_t kfull, int ktail, const int8_t* w, int q0,
                      int64_t next_block, float* res) {
  constexpr int V = 2 * NQ;  // ymm weight vectors per tile row
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  w += q0 * 16;
  for (int64_t kb = 0; kb < kfull; ++kb) {
    const int8_t* wr = w + kb * 64;
    if (NQ == 4) _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes), _MM_HINT_T0);
    else if (q0 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + next_block), _MM_HINT_T1);
    __m256 xb[R];
    for (int r = 0; r < R; ++r) xb[r] = broadcast_x(x + r * ldx + kb * 4);
    for (int v = 0; v < V; ++v) {
      const __m256 wv = load_weights(wr + 8 * v);
      for (int r = 0; r < R; ++r) acc[r][v] = _mm256_fmadd_ps(wv, xb[r], acc[r][v]);
    }
  }
  if (ktail) {
    const int8_t* wr = w + kfull * 64;
    __m256 xb[R];
    for (int r = 0; r < R; ++r) xb[r] = broadcast_x_tail(x + r * ldx + kfull * 4, ktail);
    for (int v = 0; v < V; ++v) {
      const __m256 wv = load_weights(wr + 8 * v);
      for (int r = 0; r < R; ++r) acc[r][v] = _mm256_fmadd_ps(wv, xb[r], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = res + r * 16 + 4 * q0;
    if (NQ == 1) {
      _mm_storeu_ps(o, reduce_partials4(acc[r][0], acc[r][1]));
    } else {
      for (int h = 0; h < NQ / 2; ++h)
        _mm256_storeu_ps(o + 8 * h, reduce_partials(acc[r][4 * h], acc[r][4 * h + 1], acc[r][4 * h + 2],
                                                    acc[r][4 * h + 3]));
    }
  }
}

// fp32 -> bf16, round to nearest even, NaN -> quiet NaN (as f32_to_bf16).
inline __m128i f32_to_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i qnan = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
  const __m256i sel = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i b = _mm256_blendv_epi8(r, qnan, sel);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08));
}

// y[n0 + c] = v[c] * scale[n0 + c] + bias[n0 + c] for c < nvalid (1..8), in the output dtype.
inline void store_row(const Int8LinearArgs& a, int64_t m, int64_t n0, int nvalid, __m256 v) {
  const __m256i nm = _mm256_cmpgt_epi32(_mm256_set1_epi32(nvalid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  v = _mm256_mul_ps(v, _mm256_maskload_ps(a.w_scale + n0, nm));
  if (a.bias) v = _mm256_add_ps(v, _mm256_maskload_ps(a.bias + n0, nm));
  const int64_t off = m * a.ldy + n0;
  if (a.dtype == DType::f32) {
    _mm256_maskstore_ps(static_cast<float*>(a.y) + off, nm, v);
    return;
  }
  const __m128i h = a.dtype == DType::bf16 ? f32_to_bf16_8(v)
                                           : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  uint16_t* dst = static_cast<uint16_t*>(a.y) + off;
  if (nvalid >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(dst, tmp, static_cast<size_t>(nvalid) * 2);
  }
}

// Rows [m0, m0 + rows) x channels [16 nb, 16 nb + 16) of y. One row: the whole
// tile at once (memory-bound). More rows: one quad (4 channels) at a time, so
// 2*kMR accumulators + kMR broadcast x chunks fit in 16 registers and each
// converted weight vector feeds kMR rows.
template <int R>
inline void rows_block(const Int8LinearArgs& a, const float* xf, int64_t ldx, int64_t kfull, int ktail,
                       int64_t m0, int64_t nb) {
  alignas(32) float res[R * 16];
  const int64_t Kp = int8_padded_k(a.K);
  const int64_t n0 = nb * kInt8NB;
  const int8_t* w = a.w_packed + nb * kInt8NB * Kp;
  const float* x = xf + m0 * ldx;
  if (R == 1) {
    block_dot<1, 4>(x, ldx, kfull, ktail, w, 0, kInt8NB * Kp, res);
  } else {
    for (int q = 0; q < 4; ++q) {
      if (n0 + 4 * q < a.N) {
        block_dot<R, 1>(x, ldx, kfull, ktail, w, q, kInt8NB * Kp, res);
      } else {  // only padding channels left: nothing to compute, but no garbage in res either
        for (int r = 0; r < R; ++r) _mm_storeu_ps(res + r * 16 + 4 * q, _mm_setzero_ps());
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t nvalid = std::min<int64_t>(8, a.N - n0 - 8 * h);
    if (nvalid <= 0) break;
    for (int r = 0; r < R; ++r)
      store_row(a, m0 + r, n0 + 8 * h, static_cast<int>(nvalid), _mm256_load_ps(res + r * 16 + 8 * h));
  }
}

void rows_any(const Int8LinearArgs& a, const float* xf, int64_t ldx, int64_t kfull, int ktail,
              int64_t m0, int64_t rows, int64_t nb) {
  switch (rows) {
    case 1: rows_block<1>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 2: rows_block<2>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 3: rows_block<3>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 4: rows_block<4>(a, xf, ldx, kfull, ktail, m0, nb); break;
    default: rows_block<kMR>(a, xf, ldx, kfull, ktail, m0, nb); break;
  }
}

// bf16/f16 rows -> fp32 rows of length Kp, zero-padded past K.
void convert_x(const Int8LinearArgs& a, float* dst, int64_t Kp) {
  const uint16_t* src = static_cast<const uint16_t*>(a.x);
  const bool bf16 = a.dtype == DType::bf16;
  for (int64_t m = 0; m < a.M; ++m) {
    const uint16_t* s = src + m * a.ldx;
    float* d = dst + m * Kp;
    int64_t k = 0;
    for (; k + 8 <= a.K; k += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k));
      const __m256 f = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                            : _mm256_cvtph_ps(h);
      _mm256_storeu_ps(d + k, f);
    }
    for (; k < a.K; ++k) d[k] = load_as_f32(s, a.dtype, k);
    for (; k < Kp; ++k) d[k] = 0.f;
  }
}

}  // namespace

void w8a16_linear_avx2(const Int8LinearArgs& a) {
  if (a.M <= 0) return;
  const int64_t K = a.K, Kp = int8_padded_k(K);
  const float* xf;
  int64_t ldx, kfull;
  int ktail;
  W8a16FloatBuf oneoff;
  if (a.dtype == DType::f32) {
    xf = static_cast<const float*>(a.x);
    ldx = a.ldx;
    kfull = K / kInt8KB;
    ktail = static_cast<int>(K % kInt8KB);
  } else {
    float* buf = w8a16_scratch(static_cast<size_t>(a.M * Kp), oneoff);
    convert_x(a, buf, Kp);
    xf = buf;
    ldx = Kp;
    kfull = Kp / kInt8KB;
    ktail = 0;
  }
  const W8a16Plan p = w8a16_plan(a.M, a.N, K, a.n_threads, kMR);
  parallel_for(p.n_tasks(), a.n_threads, [&](int64_t t) {
    const int64_t nt = t / p.n_mtasks, mt = t % p.n_mtasks;
    const int64_t nb0 = nt * p.blocks_per_task, nb1 = std::min(p.n_blocks, nb0 + p.blocks_per_task);
    const int64_t m0 = mt * p.rows_per_task, m1 = std::min(a.M, m0 + p.rows_per_task);
    // Rows outer: a row block of x stays in L1/L2 while the task's weight
    // slice (kept <= ~256 KB by the plan) is re-read from L2 for each block.
    for (int64_t m = m0; m < m1;) {
      const int64_t rows = w8a16_row_block(m1 - m, kMR);
      for (int64_t nb = nb0; nb < nb1; ++nb) rows_any(a, xf, ldx, kfull, ktail, m, rows, nb);
      m += rows;
    }
  });
}

}  // namespace slmkern
