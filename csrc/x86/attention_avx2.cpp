// slmkern::attention with AVX2 + FMA, fp32 (contract in slmkern/attention.h).
//
// One task = one (batch, head) and up to kAttnRowsPerTask query rows. It packs the keys it needs as
// K^T panels of 16 keys ([S/16][D][16]) and the values as panels of 16 dims ([D/16][S][16]), zero-padded,
// so both products run the same register block: MR query rows x 16 columns, 2 x MR ymm accumulators
// (12 of 16 registers at MR = 6), one broadcast per row and two loads per step.
//   scores  = Q[rows, :] K^T   (steps over D)   -> scaled, masked, then a max-subtracted exp in place
//   out     = P[rows, :] V     (steps over the visible keys), times 1 / row sum at the store.
// Scores of one row block live in a [MR][S] scratch (6 x 128 floats at MiniLM's shapes: L1-resident).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "slmkern/attention.h"
#include "slmkern/threadpool.h"

namespace slmkern {
namespace {

#define SLMK_INLINE inline __attribute__((always_inline))

constexpr int kMR = 6;
constexpr int64_t kNR = 16;

// exp(x) for x <= 0 (scores minus the row max); x < -87.3 (and -inf) give exactly 0, NaN stays NaN.
// Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for e^r, 2^n through the exponent bits.
SLMK_INLINE __m256 exp_neg(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);  // x >= -87.3 or NaN
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);                               // a NaN x stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 e = _mm256_set1_ps(1.9875691500e-4f);
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.3981999507e-3f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(8.3334519073e-3f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(4.1665795894e-2f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.6666665459e-1f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(5.0000001201e-1f));
  e = _mm256_fmadd_ps(_mm256_mul_ps(e, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(y, keep);
}

// For each row r < MR: sum_t A[r][t] * Bp[t][0..16] over t in [0, T), A rows at a_row[r] (stride 1 in t),
// Bp a panel of 16 floats per step; then store(r, low 8, high 8). The accumulators are locals of this
// inlined function, so they stay in registers (passing them out by reference made GCC spill them on every step).
template <int MR, class Store>
SLMK_INLINE void block(const float* const* a_row, const float* bp, int64_t T, Store&& store) {
  __m256 acc[MR][2];
  const float* ar[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    ar[r] = a_row[r];
  }
  for (int64_t t = 0; t < T; ++t) {
    const __m256 b0 = _mm256_loadu_ps(bp + t * kNR), b1 = _mm256_loadu_ps(bp + t * kNR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ar[r] + t);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) store(r, acc[r][0], acc[r][1]);
}

// r[t][u] <- r[u][t] for an 8 x 8 block of floats.
SLMK_INLINE void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

struct Scratch {
  std::vector<float> kt, vp, p;
};

// Rows [i0, i0 + MR) of one (b, h): scores, softmax, output.
template <int MR>
void rows(const AttentionArgs& a, const float* qh, const float* mh, float* oh, const float* kt,
          const float* vp, int64_t ldv, float* p, int64_t ldp, int64_t i0) {
  const int64_t S = a.S, D = a.D;
  const int64_t s_blk = a.causal ? std::min(S, i0 + MR) : S;  // keys any row of the block sees
  const int64_t n_panels = (s_blk + kNR - 1) / kNR;
  const float* q_row[kMR];
  float* p_row[kMR];
  for (int r = 0; r < MR; ++r) {
    q_row[r] = qh + (i0 + r) * a.q_sl;
    p_row[r] = p + r * ldp;
  }
  const __m256 vscale = _mm256_set1_ps(a.scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vninf = _mm256_set1_ps(ninf);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t n_row[kMR];  // keys row r sees
  const float* m_row[kMR];
  __m256 vmax[kMR];
  for (int r = 0; r < MR; ++r) {
    n_row[r] = a.causal ? std::min(S, i0 + r + 1) : S;
    m_row[r] = mh ? mh + (i0 + r) * a.m_sl : nullptr;
    vmax[r] = vninf;
  }
  // 8 scores of row r at columns [j, j + 8): scale, mask, -inf at and past the row's limit; tracks the max.
  // The mask row is read only below the limit (a masked load on the boundary vector).
  auto finish8 = [&](int r, int64_t j, __m256 acc) -> __m256 {
    __m256 sv = _mm256_mul_ps(acc, vscale);
    const int64_t left = n_row[r] - j;
    if (left >= 8) {
      if (m_row[r]) sv = _mm256_add_ps(sv, _mm256_loadu_ps(m_row[r] + j));
    } else {
      const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left < 0 ? 0 : left)), iota);
      if (m_row[r] && left > 0) sv = _mm256_add_ps(sv, _mm256_maskload_ps(m_row[r] + j, in));
      sv = _mm256_blendv_ps(vninf, sv, _mm256_castsi256_ps(in));
    }
    vmax[r] = _mm256_max_ps(sv, vmax[r]);  // a lost NaN still reaches the output through exp and the sum
    return sv;
  };
  // scores: Q K^T. q_row steps over d (stride 1), K^T panels [D][16].
  for (int64_t pn = 0; pn < n_panels; ++pn) {
    block<MR>(q_row, kt + pn * D * kNR, D, [&](int r, __m256 lo, __m256 hi) {
      const int64_t j = pn * kNR;
      _mm256_storeu_ps(p_row[r] + j, finish8(r, j, lo));
      _mm256_storeu_ps(p_row[r] + j + 8, finish8(r, j + 8, hi));
    });
  }
  // softmax (unnormalised) in place; columns past a row's limit were -inf and become 0
  float inv[kMR];
  for (int r = 0; r < MR; ++r) {
    float* pr = p_row[r];
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax[r]);
    float mx = lanes[0];
    for (int l = 1; l < 8; ++l) mx = (lanes[l] > mx || lanes[l] != lanes[l]) ? lanes[l] : mx;
    if (mx == ninf) {  // every key masked: the row is 0 (torch's convention) -- unless MAXPS dropped a NaN
      bool nan = false;
      for (int64_t j = 0; j < n_panels * kNR; ++j) nan |= pr[j] != pr[j];
      for (int64_t j = 0; j < n_panels * kNR; ++j) pr[j] = nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      inv[r] = nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      continue;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_panels * kNR; j += 8) {
      const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(pr + j), vmx));
      _mm256_storeu_ps(pr + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_store_ps(lanes, vsum);
    float sum = 0.f;
    for (int l = 0; l < 8; ++l) sum += lanes[l];
    inv[r] = 1.f / sum;
  }
  // out = P V over the s_blk visible keys (later columns of a causal row are 0), V panels [S][16]
  const float* pc[kMR];
  for (int r = 0; r < MR; ++r) pc[r] = p_row[r];
  for (int64_t dp = 0; dp < D; dp += kNR) {
    const int64_t w = std::min<int64_t>(kNR, D - dp);
    block<MR>(pc, vp + dp * ldv, s_blk, [&](int r, __m256 lo, __m256 hi) {
      float* o = oh + (i0 + r) * a.Hq * D + dp;
      const __m256 s = _mm256_set1_ps(inv[r]);
      const __m256 o0 = _mm256_mul_ps(lo, s), o1 = _mm256_mul_ps(hi, s);
      if (w == kNR) {
        _mm256_storeu_ps(o, o0);
        _mm256_storeu_ps(o + 8, o1);
      } else {
        alignas(32) float tmp[kNR];
        _mm256_store_ps(tmp, o0);
        _mm256_store_ps(tmp + 8, o1);
        for (int64_t d = 0; d < w; ++d) o[d] = tmp[d];
      }
    });
  }
}

void task(const AttentionArgs& a, int64_t b, int64_t h, int64_t i_begin, int64_t i_end, Scratch& sc) {
  const int64_t S = a.S, D = a.D, g = h / (a.Hq / a.Hkv);
  const int64_t s_need = a.causal ? std::min(S, i_end) : S;
  const int64_t s_pad = (s_need + kNR - 1) / kNR * kNR, d_pad = (D + kNR - 1) / kNR * kNR;
  sc.kt.resize(static_cast<size_t>(s_pad * D));
  sc.vp.resize(static_cast<size_t>(d_pad * s_need));
  sc.p.resize(static_cast<size_t>(kMR * s_pad));
  const float* kb = a.k + b * a.k_sb + g * a.k_sh;
  const float* vb = a.v + b * a.v_sb + g * a.v_sh;
  // K^T panels: kt[pn][d][jj] = K[pn * 16 + jj][d], 0 past s_need. Whole 8 x 8 tiles go through
  // an in-register transpose; the edges one element at a time.
  float* kt = sc.kt.data();
  for (int64_t pn = 0; pn < s_pad / kNR; ++pn) {
    float* panel = kt + pn * D * kNR;
    for (int64_t j8 = 0; j8 < kNR; j8 += 8) {
      const int64_t j0 = pn * kNR + j8;
      const int64_t jn = std::max<int64_t>(0, std::min<int64_t>(8, s_need - j0));
      int64_t d = 0;
      if (jn == 8)
        for (; d + 8 <= D; d += 8) {
          __m256 r[8];
          for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(kb + (j0 + t) * a.k_sl + d);
          transpose8(r);
          for (int t = 0; t < 8; ++t) _mm256_storeu_ps(panel + (d + t) * kNR + j8, r[t]);
        }
      for (; d < D; ++d)
        for (int64_t jj = 0; jj < 8; ++jj) panel[d * kNR + j8 + jj] = jj < jn ? kb[(j0 + jj) * a.k_sl + d] : 0.f;
    }
  }
  // V panels: vp[dp / 16][j][dd] = V[j][dp + dd], 0 past D
  float* vp = sc.vp.data();
  for (int64_t dp = 0; dp < d_pad; dp += kNR) {
    float* panel = vp + dp * s_need;
    const int64_t w = std::min<int64_t>(kNR, D - dp);
    for (int64_t j = 0; j < s_need; ++j) {
      const float* vrow = vb + j * a.v_sl + dp;
      float* dst = panel + j * kNR;
      if (w == kNR) {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(vrow));
        _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(vrow + 8));
      } else {
        for (int64_t dd = 0; dd < kNR; ++dd) dst[dd] = dd < w ? vrow[dd] : 0.f;
      }
    }
  }
  const float* qh = a.q + b * a.q_sb + h * a.q_sh;
  const float* mh = a.mask ? a.mask + b * a.m_sb + h * a.m_sh : nullptr;
  float* oh = a.out + (b * a.L * a.Hq + h) * D;
  float* p = sc.p.data();
  int64_t i = i_begin;
  for (; i + kMR <= i_end; i += kMR) rows<kMR>(a, qh, mh, oh, kt, vp, s_need, p, s_pad, i);
  switch (i_end - i) {
    case 5: rows<5>(a, qh, mh, oh, kt, vp, s_need, p, s_pad, i); break;
    case 4: rows<4>(a, qh, mh, oh, kt, vp, s_need, p, s_pad, i); break;
    case 3: rows<3>(a, qh, mh, oh, kt, vp, s_need, p, s_pad, i); break;
    case 2: rows<2>(a, qh, mh, oh, kt, vp, s_need, p, s_pad, i); break;
    case 1: rows<1>(a, qh, mh, oh, kt, vp, s_need, p, s_pad, i); break;
    default: break;
  }
}

}  // namespace

void attention_avx2(const AttentionArgs& a) {
  const int64_t chunks = (a.L + kAttnRowsPerTask - 1) / kAttnRowsPerTask;
  parallel_for(a.B * a.Hq * chunks, a.n_threads, [&](int64_t t) {
    thread_local Scratch sc;
    const int64_t c = t % chunks, bh = t / chunks;
    task(a, bh / a.Hq, bh % a.Hq, c * kAttnRowsPerTask, std::min(a.L, (c + 1) * kAttnRowsPerTask), sc);
  });
}

}  // namespace slmkern
