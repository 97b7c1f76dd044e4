// W8A8 linear with AVX2 (no VNNI): y[M, N] = x[M, K] @ W^T, int8 x int8 -> int32.
//   x (M, K) f32/bf16/f16 (row stride ldx), W int8 packed layout (common.h), y (M, N) x's dtype.
// Bit-exact with w8a8_linear_ref: the same per-row quantization, exact int32
// dot products, and the same three fp32 roundings in the epilogue.
//
// Exact s8 x s8 without VNNI: both sides lie in [-127, 127], so
// vpmaddubsw(|a|, sign(w, a)) forms a*w per byte and adds pairs without
// saturating (2 * 127 * 127 = 32258 < 32767); vpmaddwd with ones widens the
// pairs to int32. A 64-byte tile row (16 channels x 4 k) is two ymm operands.
//
// Activations "int7" (ActQuant::u7): codes q in [0, 127] are unsigned already, so
// vpmaddubsw(q, w) is exact without the vpsignb (2 * 127 * 127 again): 3 vector ops
// per 32 MACs instead of 4, and one broadcast per row instead of two. The zero point
// comes back out in the epilogue: acc - zero[m] * colsum[n] = sum_k (q - zero) * w.
#include <immintrin.h>

#include <algorithm>
#include <utility>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"
#include "w8a8_quant_avx2.h"

namespace slmkern {
// Rows per cache chunk of the AVX2 w8a8 GEMM (0: all rows at once, the layout before chunking); a tuning
// knob for benchmarks (_C._set_w8a8_row_chunk), defined here.
int64_t g_w8a8_row_chunk = 64;
namespace {

constexpr int kMaxMR = 4;  // rows per register block: 4 rows x 2 halves = 8 accumulators

struct Gemm {
  const int8_t* qa;     // quantized rows (s8), row stride lda
  const uint8_t* qabs;  // |qa|, same stride: a broadcast load instead of a vpabsb per row and step (+10%);
                        // with u7 activations, the codes q themselves (qa is unused)
  const int32_t* zero;  // u7: per-row zero points
  const int32_t* colsum;  // u7: packed column sums (Np entries)
  bool gelu;              // the gelu epilogue
  int64_t lda;
  const float* sx;      // row scales
  const int8_t* w;      // packed tiles
  int64_t tstride;      // bytes per 16-channel tile column = 16 * Kp
  int64_t ksteps;       // Kp / 4
  const float* w_scale;
  const float* bias;
  int64_t N;
  void* y;
  int64_t ldy;
  DType dt;
};

#define SLMK_INLINE inline __attribute__((always_inline))

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// f(integral_constant<0>) ... f(integral_constant<N-1>): accumulator indices are
// compile-time constants, so GCC keeps the arrays in registers.
template <class F, int... I>
SLMK_INLINE void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
SLMK_INLINE void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// a * w summed over each group of 4 bytes, as int32 (exact, see the top comment).
SLMK_INLINE __m256i dot4(__m256i abs_a, __m256i a, __m256i w, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(w, a)), ones);
}

// MR rows x one tile (16 channels) over the whole K, then the epilogue writes y.
// m: first row in qa/sx; ym: the same row in y; nb: the tile. U7: u7 activations.
template <int MR, bool U7>
__attribute__((noinline)) void block(const Gemm& g, int64_t m, int64_t ym, int64_t nb) {
  __m256i c[MR][2];
  unroll<MR>([&](auto r) __attribute__((always_inline)) {
    c[r][0] = _mm256_setzero_si256();
    c[r][1] = _mm256_setzero_si256();
  });
  const int8_t* a = g.qa + m * g.lda;
  const uint8_t* aa = g.qabs + m * g.lda;
  const int8_t* w = g.w + nb * g.tstride;
  const int64_t lda = g.lda;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < g.ksteps; ++k) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 64 + 32));
    unroll<MR>([&](auto r) __attribute__((always_inline)) {
      const __m256i ab = _mm256_set1_epi32(load_i32(aa + r * lda + k * 4));
      if constexpr (U7) {
        c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ab, w0), ones));
        c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ab, w1), ones));
      } else {
        const __m256i av = _mm256_set1_epi32(load_i32(a + r * lda + k * 4));
        c[r][0] = _mm256_add_epi32(c[r][0], dot4(ab, av, w0, ones));
        c[r][1] = _mm256_add_epi32(c[r][1], dot4(ab, av, w1, ones));
      }
    });
  }
  // Epilogue, in the spec's order: t = sx * w_scale; v = float(acc) * t; v = v + bias.
  unroll<2>([&](auto h) __attribute__((always_inline)) {
    const int64_t n = nb * 16 + h * 8;
    if (n >= g.N) return;
    const int64_t cnt = std::min<int64_t>(8, g.N - n);
    alignas(32) float wsb[8] = {}, bsb[8] = {};
    std::memcpy(wsb, g.w_scale + n, static_cast<size_t>(cnt) * 4);  // w_scale/bias are only N long
    if (g.bias) std::memcpy(bsb, g.bias + n, static_cast<size_t>(cnt) * 4);
    const __m256 ws = _mm256_load_ps(wsb), bs = _mm256_load_ps(bsb);
    __m256i cs = _mm256_setzero_si256();
    if constexpr (U7) cs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.colsum + n));  // Np long
    unroll<MR>([&](auto r) __attribute__((always_inline)) {
      const __m256 s = _mm256_mul_ps(_mm256_set1_ps(g.sx[m + r]), ws);
      __m256i acc = c[r][h];
      if constexpr (U7) acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(g.zero[m + r]), cs));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), s);
      if (g.bias) v = _mm256_add_ps(v, bs);
      if (g.gelu) v = gelu8(v);
      store8(g.y, g.dt, (ym + r) * g.ldy + n, v, cnt);
    });
  });
}

using BlockFn = void (*)(const Gemm&, int64_t, int64_t, int64_t);

template <bool U7>
BlockFn pick(int mr) {
  switch (mr) {
    case 1: return block<1, U7>;
    case 2: return block<2, U7>;
    case 3: return block<3, U7>;
    default: return block<4, U7>;
  }
}

// All row blocks of rows [m0, m1) against tiles [nb0, nb1), a chunk of rows at a time: the chunk's
// quantized rows (2 x g_w8a8_row_chunk x lda bytes, <= 100 KB for K <= 768) stay in L2 while every tile of the
// task walks them, and a tile's column (16 * Kp bytes) stays in L1 while the chunk's row blocks read it.
// Without the chunks a large M streamed all its rows from L3 once per tile (MiniLM at batch 32: 3.7 MB per
// 16 channels). Each output is the same block<> over the whole K whatever the order: the bits do not change.
template <bool U7>
void panel(const Gemm& g, int64_t m0, int64_t m1, int64_t ym0, int64_t nb0, int64_t nb1) {
  const int64_t chunk = g_w8a8_row_chunk > 0 ? g_w8a8_row_chunk : m1 - m0;
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = std::min(m1, c0 + chunk);
    const int64_t rows = c1 - c0;
    const int64_t nblk = ceil_div(rows, kMaxMR);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      for (int64_t i = 0; i < nblk; ++i) {  // rows split evenly into blocks of at most kMaxMR
        const int64_t r0 = rows * i / nblk, r1 = rows * (i + 1) / nblk;
        pick<U7>(static_cast<int>(r1 - r0))(g, c0 + r0, ym0 + c0 + r0, nb);
      }
    }
  }
}

// Below ~5 us of work a second thread does not pay for its wake-up and join.
constexpr double kMinParallelCycles = 16000;

thread_local ScratchBuf tl_scratch;

}  // namespace

void quantize_rows_u7_avx2(const void* x, DType t, int64_t rows, int64_t K, int64_t ldx, uint8_t* q,
                           int64_t lda, float* sx, int32_t* zero, bool recenter) {
  quantize_rows_u7_impl(x, t, rows, K, ldx, q, lda, sx, zero, recenter);
}

void w8a8_linear_avx2(const Int8LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  const int64_t Kp = int8_padded_k(K), Np = int8_padded_n(N), ntiles = Np / kInt8NB;
  // Row stride of the quantized buffer: a multiple of 64 plus one line, so the
  // broadcast rows do not all fall into the same L1 sets.
  const int64_t lda = ceil_div(Kp, 64) * 64 + 64;
  // Rows per chunk: bounds the scratch (~8 MB) for huge batches.
  const int64_t mc = std::min<int64_t>(M, std::max<int64_t>(kMaxMR, (int64_t{8} << 20) / lda));
  const bool u7 = a.act == ActQuant::u7;
  uint8_t* buf = tl_scratch.get(static_cast<size_t>(2 * mc * lda + mc * 8 + 64));
  int8_t* qa = reinterpret_cast<int8_t*>(buf);
  uint8_t* qabs = buf + mc * lda;
  float* sx = reinterpret_cast<float*>(buf + 2 * mc * lda);
  int32_t* zero = reinterpret_cast<int32_t*>(buf + 2 * mc * lda + mc * 4);

  Gemm g;
  g.qa = qa;
  g.qabs = qabs;
  g.zero = zero;
  g.colsum = int8_colsum(a.w_packed, N, K);
  g.gelu = a.epi == Epilogue::gelu;
  g.lda = lda;
  g.sx = sx;
  g.w = a.w_packed;
  g.tstride = Kp * kInt8NB;
  g.ksteps = Kp / kInt8KB;
  g.w_scale = a.w_scale;
  g.bias = a.bias;
  g.N = N;
  g.ldy = a.ldy;
  g.dt = a.dtype;
  g.y = a.y;

  // Tiles per task: 4 at small M (balance); at large M more, so each chunk of rows is reused by more tiles
  // (rows are then split across tasks instead, below).
  const int64_t kTilesPerTask = M >= 256 && g_w8a8_row_chunk > 0 ? 16 : 4;
  const int64_t ngroups = ceil_div(ntiles, kTilesPerTask);
  const size_t esz = a.dtype == DType::f32 ? 4 : 2;
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows = std::min(mc, M - m0);
    const void* x = static_cast<const char*>(a.x) + m0 * a.ldx * esz;
    // Small problems run on the caller alone: waking helpers costs more than they
    // save. Estimated single-core cycles: ~16 MACs per cycle, or the
    // weights streaming at ~8 bytes per cycle, whichever is larger.
    const double cycles = std::max(static_cast<double>(rows) * Kp * Np / 16, static_cast<double>(Kp) * Np / 8);
    const int nthr = cycles < kMinParallelCycles ? 1 : a.n_threads;
    if (nthr > 1 && rows >= 2 * nthr && rows * K >= (1 << 14)) {  // ~4 us and up: split rows
      parallel_chunks(rows, nthr, 1, [&](int64_t r0, int64_t r1) {
        const void* xr = static_cast<const char*>(x) + r0 * a.ldx * esz;
        if (u7)
          quantize_rows_u7_impl(xr, a.dtype, r1 - r0, K, a.ldx, qabs + r0 * lda, lda, sx + r0, zero + r0, false);
        else
          quantize_rows_s8_avx2(xr, a.dtype, r1 - r0, K, a.ldx, qa + r0 * lda, qabs + r0 * lda, lda, sx + r0);
      });
    } else if (u7) {
      quantize_rows_u7_impl(x, a.dtype, rows, K, a.ldx, qabs, lda, sx, zero, false);
    } else {
      quantize_rows_s8_avx2(x, a.dtype, rows, K, a.ldx, qa, qabs, lda, sx);
    }
    // Tasks: a group of tiles x a slice of rows. Split rows only when there are
    // too few tile groups to keep every thread busy.
    int64_t mslices = 1;
    while (ngroups * mslices < 4 * nthr && rows / (mslices * 2) >= kMaxMR) mslices *= 2;
    parallel_for(ngroups * mslices, nthr, [&](int64_t task) {
      const int64_t p = task / mslices, s = task % mslices;
      const int64_t r0 = rows * s / mslices, r1 = rows * (s + 1) / mslices;
      const int64_t nb0 = p * kTilesPerTask, nb1 = std::min(ntiles, nb0 + kTilesPerTask);
      if (u7) panel<true>(g, r0, r1, m0, nb0, nb1);
      else panel<false>(g, r0, r1, m0, nb0, nb1);
    });
  }
}

}  // namespace slmkern
