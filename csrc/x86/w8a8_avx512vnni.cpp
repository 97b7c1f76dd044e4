// W8A8 linear with AVX-512 VNNI: y[M, N] = x[M, K] @ W^T, int8 x int8 -> int32.
//   x (M, K) f32/bf16/f16 (row stride ldx), W int8 packed layout (common.h), y (M, N) x's dtype.
// Bit-exact with w8a8_linear_ref: the same per-row quantization, exact int32
// dot products, and the same three fp32 roundings in the epilogue.
//
// vpdpbusd multiplies u8 by s8, so activations are stored as q + 128 and the
// shift is taken back out with the packed column sums: acc - 128 * colsum[n].
// One 64-byte tile row is 16 channels x 4 k, exactly one vpdpbusd operand; a
// 4-byte broadcast of one activation row feeds all of them.
#include <immintrin.h>

#include <algorithm>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"
#include "w8a8_quant_avx512.h"

namespace slmkern {
namespace {

constexpr int kMaxMR = 6;  // rows per register block: 6 rows x 4 tiles = 24 accumulators

struct Gemm {
  const uint8_t* qa;    // quantized rows (u8, q + 128), row stride lda
  int64_t lda;
  const float* sx;      // row scales
  const int8_t* w;      // packed tiles
  int64_t tstride;      // bytes per 16-channel tile column = 16 * Kp
  int64_t ksteps;       // Kp / 4
  const int32_t* colsum;
  const float* w_scale;
  const float* bias;
  int64_t N;
  void* y;
  int64_t ldy;
  DType dt;
};

#define SLMK_INLINE inline __attribute__((always_inline))

// One k4 step of row r: broadcast its 4 activation bytes, one vpdpbusd per tile.
// The accumulator of (row r, tile t) is zmm(8 + 4r + t); the tiles are in zmm0..3.
#define SLMK_ROW(r, addr, b, c0, c1, c2, c3)                                      \
  ".if %c[mr] > " #r "\n vpbroadcastd " addr ", %%zmm" #b "\n"                    \
  " vpdpbusd %%zmm0, %%zmm" #b ", %%zmm" #c0 "\n"                                 \
  " .if %c[nt] > 1\n vpdpbusd %%zmm1, %%zmm" #b ", %%zmm" #c1 "\n .endif\n"       \
  " .if %c[nt] > 2\n vpdpbusd %%zmm2, %%zmm" #b ", %%zmm" #c2 "\n .endif\n"       \
  " .if %c[nt] > 3\n vpdpbusd %%zmm3, %%zmm" #b ", %%zmm" #c3 "\n .endif\n"       \
  ".endif\n"
#define SLMK_STORE1(r, t, c)                                                      \
  ".if %c[mr] > " #r "\n .if %c[nt] > " #t "\n"                                   \
  " vmovdqu64 %%zmm" #c ", " #r "*256+" #t "*64(%[out])\n .endif\n.endif\n"
#define SLMK_STORE(r, c0, c1, c2, c3) \
  SLMK_STORE1(r, 0, c0) SLMK_STORE1(r, 1, c1) SLMK_STORE1(r, 2, c2) SLMK_STORE1(r, 3, c3)

// int32 dot products of MR (<= 6) activation rows with NT (<= 4) tiles over all
// ksteps (>= 1) into out[r][t][16] (row stride 4 tiles). Per k4 step: NT 64-byte
// weight loads, MR 4-byte broadcasts, MR * NT vpdpbusd, and PF (0, 1, 2 or 4)
// prefetches of consecutive lines from pf, which then advances pfd <= 64 * PF
// bytes: pf walks the next panel's weights, so DRAM streams while this panel
// computes. Written in assembly so the 24 accumulators stay in registers
// whatever the compiler does (GCC under -flto spilled a third of them from the
// intrinsics version: -25% speed).
template <int MR, int NT, int PF>
SLMK_INLINE void dot_block(const uint8_t* a, int64_t lda, const int8_t* w, int64_t ts, int64_t ksteps,
                           int32_t* out, const int8_t* pf, int64_t pfd) {
  static_assert(MR >= 1 && MR <= 6 && NT >= 1 && NT <= 4, "register block is at most 6 x 4");
  static_assert(PF == 0 || PF == 1 || PF == 2 || PF == 4, "prefetch 0, 1, 2 or 4 lines per step");
  const uint8_t* a3 = a + 3 * lda;
  const int8_t* w3 = w + 3 * ts;
  asm volatile(
      ".irp i, 8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
      " vpxord %%xmm\\i, %%xmm\\i, %%xmm\\i\n"
      ".endr\n"
      ".p2align 5\n"
      "1:\n"
      " vmovdqu64 (%[w]), %%zmm0\n"
      " .if %c[nt] > 1\n vmovdqu64 (%[w],%[ts]), %%zmm1\n .endif\n"
      " .if %c[nt] > 2\n vmovdqu64 (%[w],%[ts],2), %%zmm2\n .endif\n"
      " .if %c[nt] > 3\n vmovdqu64 (%[w3]), %%zmm3\n .endif\n"
      // a slow trickle (1 line per step) may land in L1; faster prefetch goes
      // to L2 only, or it evicts the panel lines this block is streaming
      " .if %c[npf] == 1\n prefetcht0 (%[pf])\n .endif\n"
      " .if %c[npf] > 1\n prefetcht1 (%[pf])\n prefetcht1 64(%[pf])\n .endif\n"
      " .if %c[npf] > 2\n prefetcht1 128(%[pf])\n prefetcht1 192(%[pf])\n .endif\n"
      " .if %c[npf] > 0\n add %[pfd], %[pf]\n .endif\n"
      SLMK_ROW(0, "(%[a])", 4, 8, 9, 10, 11)
      SLMK_ROW(1, "(%[a],%[lda])", 5, 12, 13, 14, 15)
      SLMK_ROW(2, "(%[a],%[lda],2)", 4, 16, 17, 18, 19)
      SLMK_ROW(3, "(%[a3])", 5, 20, 21, 22, 23)
      SLMK_ROW(4, "(%[a3],%[lda])", 4, 24, 25, 26, 27)
      SLMK_ROW(5, "(%[a3],%[lda],2)", 5, 28, 29, 30, 31)
      " add $64, %[w]\n add $64, %[w3]\n add $4, %[a]\n add $4, %[a3]\n"
      " dec %[k]\n jnz 1b\n"
      SLMK_STORE(0, 8, 9, 10, 11) SLMK_STORE(1, 12, 13, 14, 15) SLMK_STORE(2, 16, 17, 18, 19)
      SLMK_STORE(3, 20, 21, 22, 23) SLMK_STORE(4, 24, 25, 26, 27) SLMK_STORE(5, 28, 29, 30, 31)
      : [w] "+r"(w), [w3] "+r"(w3), [a] "+r"(a), [a3] "+r"(a3), [k] "+r"(ksteps), [pf] "+r"(pf)
      : [ts] "r"(ts), [lda] "r"(lda), [out] "r"(out), [pfd] "r"(pfd), [mr] "i"(MR), [nt] "i"(NT), [npf] "i"(PF)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
        "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

// MR rows x NT tiles (16 channels each) over the whole K, then the epilogue
// writes y. m: first row in qa/sx; ym: the same row in y; nb: first tile.
template <int MR, int NT, int PF>
__attribute__((noinline)) void block(const Gemm& g, int64_t m, int64_t ym, int64_t nb, const int8_t* pf,
                                     int64_t pfd) {
  alignas(64) int32_t acc[6][4][16];
  dot_block<MR, NT, PF>(g.qa + m * g.lda, g.lda, g.w + nb * g.tstride, g.tstride, g.ksteps, &acc[0][0][0], pf,
                        pfd);
  // Epilogue, in the spec's order: t = sx * w_scale; v = float(acc) * t; v = v + bias.
  for (int t = 0; t < NT; ++t) {
    const int64_t n = (nb + t) * 16;
    if (n >= g.N) break;
    const __mmask16 msk = tail_mask16(g.N - n);
    const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(g.colsum + n), 7);
    const __m512 ws = _mm512_maskz_loadu_ps(msk, g.w_scale + n);
    const __m512 bs = g.bias ? _mm512_maskz_loadu_ps(msk, g.bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(g.sx[m + r]), ws);
      const __m512i c = _mm512_sub_epi32(_mm512_load_si512(acc[r][t]), comp);
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(c), s);
      if (g.bias) v = _mm512_add_ps(v, bs);
      store16(g.y, g.dt, (ym + r) * g.ldy + n, v, msk);
    }
  }
}

using BlockFn = void (*)(const Gemm&, int64_t, int64_t, int64_t, const int8_t*, int64_t);

constexpr int kNT = 4;  // tiles per panel: 64 channels

template <int MR>
BlockFn pick_mr(int nt, int pf) {
  if (nt == 4)
    return pf == 4 ? block<MR, 4, 4> : pf == 2 ? block<MR, 4, 2> : pf == 1 ? block<MR, 4, 1> : block<MR, 4, 0>;
  return nt == 1 ? block<MR, 1, 0> : nt == 2 ? block<MR, 2, 0> : block<MR, 3, 0>;
}

// pf (lines per k4 step) is honoured for full panels (nt == 4) only.
BlockFn pick(int mr, int nt, int pf) {
  switch (mr) {
    case 1: return pick_mr<1>(nt, pf);
    case 2: return pick_mr<2>(nt, pf);
    case 3: return pick_mr<3>(nt, pf);
    case 4: return pick_mr<4>(nt, pf);
    case 5: return pick_mr<5>(nt, pf);
    default: return pick_mr<6>(nt, pf);
  }
}

// Rows [m0, m1) (y rows ym0 + ...) against the panels [p0, p1), in order. Rows
// go in even blocks of at most kMaxMR (128 = 18 x 6 + 4 x 5) and every block
// re-reads the panel (4 tiles, 64 KB per 1024 k) from L2. With several blocks
// per panel (compute-bound), they prefetch the next panel of the run, spread
// evenly over all of them, so the DRAM stream overlaps the dot products: -3..5%
// at M = 128. With one block per panel (M <= 6, bandwidth-bound) software
// prefetch only competes with the hardware prefetcher's streams: none then.
void panels(const Gemm& g, int64_t m0, int64_t m1, int64_t ym0, int64_t p0, int64_t p1, int64_t ntiles) {
  const int64_t rows = m1 - m0;
  const int64_t nblk = ceil_div(rows, kMaxMR);
  const int64_t pbytes = kNT * g.tstride;
  // bytes of the next panel each block covers per k4 step, and lines to touch for them
  const int64_t pfd = ceil_div(pbytes, nblk * g.ksteps);
  const int lines = nblk == 1 ? 0 : pfd <= 64 ? 1 : pfd <= 128 ? 2 : 4;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t nb = p * kNT;
    const int nt = static_cast<int>(std::min<int64_t>(kNT, ntiles - nb));
    const bool next = p + 1 < p1 && (p + 2) * kNT <= ntiles;  // a full next panel in this run
    const int8_t* pf = g.w + (nb + kNT) * g.tstride;
    for (int64_t i = 0; i < nblk; ++i) {
      const int64_t r0 = rows * i / nblk, r1 = rows * (i + 1) / nblk;
      const int8_t* pfi = pf + i * g.ksteps * pfd;
      const int npf = next && pfi < pf + pbytes ? lines : 0;
      pick(static_cast<int>(r1 - r0), nt, npf)(g, m0 + r0, ym0 + m0 + r0, nb, pfi, pfd);
    }
  }
}

// Below ~5 us of work a second thread does not pay for its wake-up and join.
constexpr double kMinParallelCycles = 16000;

thread_local ScratchBuf tl_scratch;

}  // namespace

void w8a8_linear_avx512vnni(const Int8LinearArgs& a) {
  // The gelu epilogue is fused in the AVX2 kernel only (same bits; slmkern.nn fuses GELU into a linear
  // only where the active w8a8 variant is avx2 or ref, so models do not take this slower path).
  if (a.epi == Epilogue::gelu) return w8a8_linear_avx2(a);
  const int64_t M = a.M, K = a.K, N = a.N;
  const int64_t Kp = int8_padded_k(K), Np = int8_padded_n(N), ntiles = Np / kInt8NB;
  // Row stride of the quantized buffer: a multiple of 64 plus one line, so the
  // MR broadcast rows do not all fall into the same L1 sets.
  const int64_t lda = ceil_div(Kp, 64) * 64 + 64;
  // Rows per chunk: bounds the scratch (~8 MB) for huge batches.
  const int64_t mc = std::min<int64_t>(M, std::max<int64_t>(kMaxMR, (int64_t{8} << 20) / lda));
  uint8_t* buf = tl_scratch.get(static_cast<size_t>(mc * lda + mc * 4 + 64));
  float* sx = reinterpret_cast<float*>(buf + mc * lda);
  // u7 activations arrive recentered, q - zero + 128: the same u8 operand as s8 + 128, so the GEMM and
  // its 128 * colsum correction are shared (the quantizer is the AVX2 one: this machine has AVX2).
  const bool u7 = a.act == ActQuant::u7;

  Gemm g;
  g.qa = buf;
  g.lda = lda;
  g.sx = sx;
  g.w = a.w_packed;
  g.tstride = Kp * kInt8NB;
  g.ksteps = Kp / kInt8KB;
  g.colsum = int8_colsum(a.w_packed, N, K);
  g.w_scale = a.w_scale;
  g.bias = a.bias;
  g.N = N;
  g.y = a.y;
  g.ldy = a.ldy;
  g.dt = a.dtype;

  const int64_t npanels = ceil_div(ntiles, kNT);
  const size_t esz = a.dtype == DType::f32 ? 4 : 2;
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows = std::min(mc, M - m0);
    const void* x = static_cast<const char*>(a.x) + m0 * a.ldx * esz;
    // Small problems run on the caller alone: waking helpers costs more than they
    // save. Estimated single-core cycles: 64 MACs per cycle (one vpdpbusd), or the
    // weights streaming at ~8 bytes per cycle, whichever is larger.
    const double cycles = std::max(static_cast<double>(rows) * Kp * Np / 64, static_cast<double>(Kp) * Np / 8);
    const int nthr = cycles < kMinParallelCycles ? 1 : a.n_threads;
    if (nthr > 1 && rows >= 2 * nthr && rows * K >= (1 << 14)) {  // ~4 us and up: split rows
      parallel_chunks(rows, nthr, 1, [&](int64_t r0, int64_t r1) {
        const void* xr = static_cast<const char*>(x) + r0 * a.ldx * esz;
        if (u7) quantize_rows_u7_avx2(xr, a.dtype, r1 - r0, K, a.ldx, buf + r0 * lda, lda, sx + r0, nullptr, true);
        else quantize_rows_u8_avx512(xr, a.dtype, r1 - r0, K, a.ldx, buf + r0 * lda, lda, sx + r0);
      });
    } else if (u7) {
      quantize_rows_u7_avx2(x, a.dtype, rows, K, a.ldx, buf, lda, sx, nullptr, true);
    } else {
      quantize_rows_u8_avx512(x, a.dtype, rows, K, a.ldx, buf, lda, sx);
    }
    // Tasks: a run of consecutive panels x a slice of rows, claimed dynamically.
    // Compute-bound (several row blocks per panel): 4 runs per thread, long
    // enough for the next-panel prefetch to pay. Bandwidth-bound (M <= 6): 16
    // per thread, so a helper that starts late leaves a short tail. Rows are
    // split only when there are too few panels.
    const int64_t nruns = std::min<int64_t>(npanels, (rows <= kMaxMR ? 16 : 4) * nthr);
    int64_t mslices = 1;
    while (nruns * mslices < 4 * nthr && rows / (mslices * 2) >= kMaxMR) mslices *= 2;
    parallel_for(nruns * mslices, nthr, [&](int64_t task) {
      const int64_t run = task / mslices, s = task % mslices;
      const int64_t r0 = rows * s / mslices, r1 = rows * (s + 1) / mslices;
      panels(g, r0, r1, m0, npanels * run / nruns, npanels * (run + 1) / nruns, ntiles);
    });
  }
}

}  // namespace slmkern
