// 2:4 linear with int8 values on AVX-512 VNNI + VBMI: w8a8 math, bit-exact with
// sparse24_i8_linear_ref (and so with w8a8_linear on the decompressed weight).
//
// Packed layout: int8 version 2 (csrc/include/slmkern/sparse24.h). One zmm of values holds 16
// rows x one window of 8 dense columns: dword r = the 4 kept values of row r. Activations are
// quantized per row (quantize_rows_s8's spec) to u8 = q + 128; the window's 8 activation bytes
// are broadcast to every qword (vpbroadcastq) and vpshufb picks, for each kept value, its own
// activation byte: so one vpdpbusd does 16 rows x 4 kept values = 16 rows x 8 dense columns,
// half the multiplies of the dense w8a8 kernel (which needs 2 vpdpbusd for the same 8 columns).
// The vpshufb index of a window is built from the rows' meta bytes once per register block:
// vpmultishiftqb pulls bits 2j..2j+7 of row r's meta byte into byte j of dword r (the pack puts
// two rows' meta, for all 4 windows of a block, in each qword), and 3, | the group bases
// 0,0,4,4. The +128 shift comes back out through the packed per-row sums of kept values.
// Output lanes are rows, so the epilogue is the dense kernel's: no horizontal reductions.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "slmkern/sparse24.h"
#include "slmkern/threadpool.h"
#include "w8a8_quant_avx512.h"

namespace slmkern {
namespace {

thread_local ScratchBuf t_qa;

// Register blocks: few x rows (M <= 4, bandwidth-bound) take 4 tiles at a time (M = 1: 8; more
// weight streams per thread measured 2 < 3 < 4 <= 8 tiles); more rows take 2 tiles x up to 8
// rows: 16 accumulators, and each window's indices and weights serve 8 rows.
constexpr int kSmallM = 4;
constexpr int kMaxMR = 8;

struct Gemm {
  const uint8_t* qa;  // quantized rows (u8, q + 128), row stride lda, Kp columns
  int64_t lda;
  const float* sx;
  const uint8_t* w;   // packed tiles
  int64_t tb;         // bytes per 16-row tile
  int64_t S;          // 32-column blocks
  const int32_t* rowsum;
  const float* scales;
  const float* bias;
  int64_t N;
  void* y;
  int64_t ldy;
  DType dt;
};

#define SLMK_INLINE inline __attribute__((always_inline))

// The first row block over a panel streams it from DRAM. Per 80 bytes it issues 4 vector ops
// (multishift, ternlog, vpshufb, vpdpbusd) where the dense kernel issues 1.25, so the out-of-order
// window alone covers too few lines in flight: each of its tile streams prefetches (to L2) the
// block 32 blocks (10 KB) ahead. Measured at M = 1 (one thread, loaded machine): 650 -> 570 us;
// 24..96 blocks ahead all gave about the same.
constexpr int64_t kPfBlocks = 32;

// vpshufb index of window wi of a tile from its block's 64 meta bytes: byte j of dword r =
// 4 * (j / 2) + ((meta byte of row r >> 2j) & 3).
SLMK_INLINE __m512i window_index(__m512i mt, int wi) {
  const __m512i ctrl = _mm512_set1_epi64(0x0E0C0A0806040200LL + 0x1010101010101010LL * wi);
  return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, mt), _mm512_set1_epi8(3),
                                   _mm512_set1_epi32(0x04040000), 0xEA);
}

// Index modes: with several row blocks per panel, the first builds each window's indices and
// stores them to ib[((t * S + s) * 4 + w) * 64] (kStore), the others load them (kLoad, L1/L2)
// instead of rebuilding them; a lone block builds them in registers only (kBuild).
enum IndexMode : int { kBuild = 0, kStore = 1, kLoad = 2 };

// int32 dot products of MR activation rows with NT row tiles over all S blocks: acc[r][t] lane i
// = row 16(nb + t) + i. Per window and tile: one index (built or loaded), per row one
// broadcast, per row and tile one vpshufb + one vpdpbusd.
// Prefetch modes: kAhead, the panel's first row block prefetches its own tiles kPfBlocks ahead;
// kNext, the last of several row blocks prefetches the same block of the next panel (it follows
// the panel in memory), so the next panel's first block finds it in L2.
enum PrefetchMode : int { kNone = 0, kAhead = 1, kNext = 2 };

template <int MR, int NT, int PF, int IM>
SLMK_INLINE void dot_block(const uint8_t* a, int64_t lda, const uint8_t* w, int64_t tb, int64_t S,
                           uint8_t* ib, __m512i (&acc)[MR][NT]) {
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t s = 0; s < S; ++s) {
    if (PF == kAhead && s + kPfBlocks < S)
      for (int t = 0; t < NT; ++t)
        for (int l = 0; l < kS24I8Block / 64; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(w + t * tb + kPfBlocks * kS24I8Block + 64 * l), _MM_HINT_T1);
    if (PF == kNext)
      for (int t = 0; t < NT; ++t)
        for (int l = 0; l < kS24I8Block / 64; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(w + (NT + t) * tb + 64 * l), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int wi = 0; wi < 4; ++wi) {
      __m512i idx[NT], wv[NT];
      for (int t = 0; t < NT; ++t) {
        const uint8_t* blk = w + t * tb;
        uint8_t* it = IM == kBuild ? nullptr : ib + ((t * S) * 4 + wi) * 64;
        if (IM == kLoad) {
          idx[t] = _mm512_load_si512(it);
        } else {
          idx[t] = window_index(_mm512_loadu_si512(blk + 256), wi);
          if (IM == kStore) _mm512_store_si512(it, idx[t]);
        }
        wv[t] = _mm512_loadu_si512(blk + 64 * wi);
      }
      for (int r = 0; r < MR; ++r) {
        int64_t xq;
        std::memcpy(&xq, a + r * lda + 8 * wi, 8);
        const __m512i xb = _mm512_set1_epi64(xq);
        for (int t = 0; t < NT; ++t)
          acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], _mm512_shuffle_epi8(xb, idx[t]), wv[t]);
      }
    }
    w += kS24I8Block;
    a += kS24I8BlockK;
    if (IM != kBuild) ib += 4 * 64;
  }
}

// MR rows (m: first row) x NT tiles (nb: first tile) over the whole K, then the epilogue.
template <int MR, int NT, int PF, int IM>
__attribute__((noinline)) void block(const Gemm& g, int64_t m, int64_t nb, uint8_t* ib) {
  __m512i acc[MR][NT];
  dot_block<MR, NT, PF, IM>(g.qa + m * g.lda, g.lda, g.w + nb * g.tb, g.tb, g.S, ib, acc);
  // Epilogue, in the spec's order: t = sx * scale; v = float(acc) * t; v = v + bias.
  for (int t = 0; t < NT; ++t) {
    const int64_t n = (nb + t) * kS24I8TileN;
    if (n >= g.N) break;
    const __mmask16 msk = tail_mask16(g.N - n);
    const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(g.rowsum + n), 7);
    const __m512 ws = _mm512_maskz_loadu_ps(msk, g.scales + n);
    const __m512 bs = g.bias ? _mm512_maskz_loadu_ps(msk, g.bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(g.sx[m + r]), ws);
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], comp)), sc);
      if (g.bias) v = _mm512_add_ps(v, bs);
      store16(g.y, g.dt, (m + r) * g.ldy + n, v, msk);
    }
  }
}

using BlockFn = void (*)(const Gemm&, int64_t, int64_t, uint8_t*);

template <int MR, bool PF>
BlockFn pick_small(int nt) {  // M <= 4: up to 4 tiles (M = 1: 8), indices built in registers
  constexpr int P = PF ? kAhead : kNone;
  if (MR == 1 && nt > 4)
    return nt == 8 ? block<1, 8, P, kBuild> : nt == 7 ? block<1, 7, P, kBuild>
         : nt == 6 ? block<1, 6, P, kBuild> : block<1, 5, P, kBuild>;
  return nt == 4 ? block<MR, 4, P, kBuild> : nt == 3 ? block<MR, 3, P, kBuild>
       : nt == 2 ? block<MR, 2, P, kBuild> : block<MR, 1, P, kBuild>;
}
template <int MR>
BlockFn pick_large(int nt, bool first, bool shared, bool next) {  // M > 4: up to 2 tiles
  if (!shared) return nt == 2 ? block<MR, 2, kAhead, kBuild> : block<MR, 1, kAhead, kBuild>;  // one block
  if (first) return nt == 2 ? block<MR, 2, kAhead, kStore> : block<MR, 1, kAhead, kStore>;
  if (next) return block<MR, 2, kNext, kLoad>;
  return nt == 2 ? block<MR, 2, kNone, kLoad> : block<MR, 1, kNone, kLoad>;
}
// first: the panel's first row block (it streams the weights from DRAM unless the block before
// prefetched them); shared: several row blocks share the panel's indices through ib; next: this
// (last) block prefetches the next panel, a full one of the same run.
BlockFn pick(int mr, int nt, bool small, bool first, bool shared, bool next) {
  if (small) {
    switch (mr) {
      case 1: return first ? pick_small<1, true>(nt) : pick_small<1, false>(nt);
      case 2: return first ? pick_small<2, true>(nt) : pick_small<2, false>(nt);
      case 3: return first ? pick_small<3, true>(nt) : pick_small<3, false>(nt);
      default: return first ? pick_small<4, true>(nt) : pick_small<4, false>(nt);
    }
  }
  switch (mr) {
    case 1: return pick_large<1>(nt, first, shared, next);
    case 2: return pick_large<2>(nt, first, shared, next);
    case 3: return pick_large<3>(nt, first, shared, next);
    case 4: return pick_large<4>(nt, first, shared, next);
    case 5: return pick_large<5>(nt, first, shared, next);
    case 6: return pick_large<6>(nt, first, shared, next);
    case 7: return pick_large<7>(nt, first, shared, next);
    default: return pick_large<8>(nt, first, shared, next);
  }
}

thread_local ScratchBuf t_idx;

// Rows [m0, m1) against panels [p0, p1) of pnt tiles: every row block re-reads the panel
// (40 KB per tile and 2048 k) from L2.
void panels(const Gemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t ntiles, int pnt, int maxmr) {
  const int64_t rows = m1 - m0, nblk = ceil_div(rows, maxmr);
  const bool small = maxmr == kSmallM, use_ib = !small && nblk >= 2;
  uint8_t* ib = use_ib ? t_idx.get(static_cast<size_t>(pnt * g.S * 4 * 64)) : nullptr;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t nb = p * pnt;
    const int nt = static_cast<int>(std::min<int64_t>(pnt, ntiles - nb));
    const bool next = p + 1 < p1 && (p + 2) * pnt <= ntiles && nt == 2;
    for (int64_t i = 0; i < nblk; ++i) {
      const int64_t r0 = rows * i / nblk, r1 = rows * (i + 1) / nblk;
      pick(static_cast<int>(r1 - r0), nt, small, i == 0, use_ib, next && i == nblk - 1)(g, m0 + r0, nb, ib);
    }
  }
}

constexpr double kMinParallelCycles = 16000;

}  // namespace

void sparse24_i8_linear_avx512vbmi(const Sparse24Args& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  if (M == 0) return;
  const int64_t Kp = s24i8_padded_k(K), Np = s24i8_padded_n(N), ntiles = Np / kS24I8TileN;
  const int64_t lda = ceil_div(Kp, 64) * 64 + 64;  // + one line: rows off the same L1 sets
  uint8_t* buf = t_qa.get(static_cast<size_t>(M * lda + 4 * M + 64));
  float* sx = reinterpret_cast<float*>(buf + M * lda);
  const double cycles = std::max(static_cast<double>(M) * Kp * Np / 128, static_cast<double>(Kp) * Np / 10);
  const int nthr = cycles < kMinParallelCycles ? 1 : a.n_threads;
  const int64_t k4 = int8_padded_k(K);
  const size_t esz = a.dtype == DType::f32 ? 4 : 2;
  auto quant = [&](int64_t r0, int64_t r1) {
    quantize_rows_u8_avx512(static_cast<const char*>(a.x) + r0 * a.ldx * esz, a.dtype, r1 - r0, K, a.ldx,
                            buf + r0 * lda, lda, sx + r0);
    if (Kp > k4)
      for (int64_t m = r0; m < r1; ++m) std::memset(buf + m * lda + k4, 128, static_cast<size_t>(Kp - k4));
  };
  if (nthr > 1 && M >= 2 * nthr && M * K >= (1 << 14)) parallel_chunks(M, nthr, 1, quant);
  else quant(0, M);

  Gemm g;
  g.qa = buf; g.lda = lda; g.sx = sx;
  g.w = a.w_packed; g.tb = s24i8_tile_bytes(K); g.S = Kp / kS24I8BlockK;
  g.rowsum = s24_rowsum(a.w_packed, N, K);
  g.scales = a.scales; g.bias = a.bias; g.N = N;
  g.y = a.y; g.ldy = a.ldy; g.dt = a.dtype;

  // Tasks: a run of consecutive panels x a slice of rows, claimed dynamically (as w8a8).
  const int pnt = M == 1 ? 8 : M <= kSmallM ? 4 : 2, maxmr = M <= kSmallM ? kSmallM : kMaxMR;
  const int64_t npanels = ceil_div(ntiles, int64_t{pnt});
  const int64_t nruns = std::min<int64_t>(npanels, (M <= maxmr ? 16 : 4) * nthr);
  int64_t mslices = 1;
  while (nruns * mslices < 4 * nthr && M / (mslices * 2) >= maxmr) mslices *= 2;
  parallel_for(nruns * mslices, nthr, [&](int64_t task) {
    const int64_t run = task / mslices, s = task % mslices;
    panels(g, M * s / mslices, M * (s + 1) / mslices, npanels * run / nruns, npanels * (run + 1) / nruns, ntiles,
           pnt, maxmr);
  });
}

}  // namespace slmkern
