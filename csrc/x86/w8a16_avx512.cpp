// W8A16 linear, AVX-512 (F/BW/VL/DQ): y[M, N] = (x[M, K] @ float(W)^T) * w_scale + bias,
// x and y in f32/bf16/f16, W in the int8 packed layout of slmkern/common.h, fp32 accumulation.
//
// One 64-byte tile row holds 16 channels x 4 consecutive k. Each 16-byte quarter
// (channels 4q..4q+3 x k 0..3) sign-extends and converts to one zmm, which an FMA
// with the 128-bit-broadcast x chunk [x_k0..x_k3] x4 accumulates into 4 partial
// sums per channel. A block of 16 channels x MR rows therefore keeps 4*MR
// accumulators and converts each weight vector once for MR rows; the 4 partial
// sums of each channel are added once, after the K loop.
#include <immintrin.h>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"
#include "w8a16_plan.h"

namespace slmkern {
namespace {

constexpr int kMR = 6;  // rows per micro-kernel: 24 accumulators + 4 weights + x fit in 32 zmm
// Software prefetch distance along the weight stream (the next block follows
// contiguously). The hardware prefetcher alone leaves a 6-row micro-kernel
// ~25% short when weights come from DRAM: it consumes 64 B per ~24 cycles,
// too slowly to trigger deep prefetch.
constexpr int64_t kPrefetchBytes = 4096;

// a[q] lane 4i+j = partial sum j of channel 4q+i  ->  lane c = channel c (sum over j).
inline __m512 reduce_partials(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // Pairwise in-lane adds ("hadd") leave, in 128-bit lane i, the sums of
  // channels {i, 4+i, 8+i, 12+i}; one permute puts channel c at lane c.
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_ps(a0, a1, 0x88), _mm512_shuffle_ps(a0, a1, 0xDD));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_ps(a2, a3, 0x88), _mm512_shuffle_ps(a2, a3, 0xDD));
  const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(h01, h23, 0x88), _mm512_shuffle_ps(h01, h23, 0xDD));
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, h);
}

inline __m512 load_weights(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Channels [n0, n0 + 16) of R rows: out[r] lane c = sum_k x[r, k] * W[n0 + c, k].
// x rows are fp32 with stride ldx; the last chunk (ktail = K % 4 values, if any)
// is read with a masked load so nothing past a row is touched.
template <int R>
inline void block_dot(const float* x, int64_t ldx, int64_t kfull, int ktail, const int8_t* w,
                      __m512* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kfull; ++kb) {
    const int8_t* wr = w + kb * 64;
    _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes), _MM_HINT_T0);
    const __m512 w0 = load_weights(wr), w1 = load_weights(wr + 16);
    const __m512 w2 = load_weights(wr + 32), w3 = load_weights(wr + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + r * ldx + kb * 4));
      acc[r][0] = _mm512_fmadd_ps(w0, xb, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xb, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(w2, xb, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(w3, xb, acc[r][3]);
    }
  }
  if (ktail) {
    const int8_t* wr = w + kfull * 64;
    const __m512 w0 = load_weights(wr), w1 = load_weights(wr + 16);
    const __m512 w2 = load_weights(wr + 32), w3 = load_weights(wr + 48);
    const __mmask8 km = static_cast<__mmask8>((1u << ktail) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(km, x + r * ldx + kfull * 4));
      acc[r][0] = _mm512_fmadd_ps(w0, xb, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xb, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(w2, xb, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(w3, xb, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = reduce_partials(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
}

// fp32 -> bf16, round to nearest even, NaN -> quiet NaN (as f32_to_bf16).
inline __m256i f32_to_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// y[n0 + c] = v[c] * scale[n0 + c] + bias[n0 + c] for c < nvalid, in the output dtype.
inline void store_row(const Int8LinearArgs& a, int64_t m, int64_t n0, int nvalid, __m512 v) {
  const __mmask16 nm = static_cast<__mmask16>(nvalid >= 16 ? 0xffff : (1u << nvalid) - 1);
  v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(nm, a.w_scale + n0));
  if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(nm, a.bias + n0));
  const int64_t off = m * a.ldy + n0;
  switch (a.dtype) {
    case DType::f32:
      _mm512_mask_storeu_ps(static_cast<float*>(a.y) + off, nm, v);
      break;
    case DType::bf16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + off, nm, f32_to_bf16_16(v));
      break;
    default:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + off, nm,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

template <int R>
inline void rows_block(const Int8LinearArgs& a, const float* xf, int64_t ldx, int64_t kfull, int ktail,
                       int64_t m0, int64_t nb) {
  __m512 out[R];
  const int64_t Kp = int8_padded_k(a.K);
  block_dot<R>(xf + m0 * ldx, ldx, kfull, ktail, a.w_packed + nb * kInt8NB * Kp, out);
  const int64_t n0 = nb * kInt8NB;
  const int nvalid = static_cast<int>(std::min<int64_t>(kInt8NB, a.N - n0));
  for (int r = 0; r < R; ++r) store_row(a, m0 + r, n0, nvalid, out[r]);
}

void rows_any(const Int8LinearArgs& a, const float* xf, int64_t ldx, int64_t kfull, int ktail,
              int64_t m0, int64_t rows, int64_t nb) {
  switch (rows) {
    case 1: rows_block<1>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 2: rows_block<2>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 3: rows_block<3>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 4: rows_block<4>(a, xf, ldx, kfull, ktail, m0, nb); break;
    case 5: rows_block<5>(a, xf, ldx, kfull, ktail, m0, nb); break;
    default: rows_block<6>(a, xf, ldx, kfull, ktail, m0, nb); break;
  }
}

// bf16/f16 rows -> fp32 rows of length Kp, zero-padded past K.
void convert_x(const Int8LinearArgs& a, float* dst, int64_t Kp) {
  const uint16_t* src = static_cast<const uint16_t*>(a.x);
  for (int64_t m = 0; m < a.M; ++m) {
    const uint16_t* s = src + m * a.ldx;
    float* d = dst + m * Kp;
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t left = a.K - k;
      const __mmask16 km = static_cast<__mmask16>(left >= 16 ? 0xffff : left > 0 ? (1u << left) - 1 : 0);
      const __m256i h = _mm256_maskz_loadu_epi16(km, s + k);
      const __m512 f = a.dtype == DType::bf16
                           ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                           : _mm512_cvtph_ps(h);
      const __mmask16 dm = static_cast<__mmask16>(Kp - k >= 16 ? 0xffff : (1u << (Kp - k)) - 1);
      _mm512_mask_storeu_ps(d + k, dm, f);
    }
  }
}

}  // namespace

void w8a16_linear_avx512(const Int8LinearArgs& a) {
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
