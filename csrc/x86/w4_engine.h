// The int4-weight GEMM engine behind every SIMD w4a16 / w4a8 variant,
// templated on the vector traits of w4_simd.h (included once per ISA, internal
// linkage).
//
// Both ops become an integer GEMM of unsigned nibbles u (0..15) with signed
// 8-bit activation digits, exact in int32 per group, then an fp32 epilogue:
//
//   w4a8  (D = 1): the digit is qx from the quantize_rows_s8 spec; rowscale = sx.
//   w4a16 (D = 3): x is written as a per-row 24-bit fixed-point integer
//                  X = rint(x * 127*65536 / amax) = 65536*d0 + 256*d1 + d2 with
//                  balanced digits d in [-128, 127]; rowscale = amax / (127*65536).
//                  Each x is represented to within ~amax * 2^-23 and the integer
//                  sums are exact, so |error| <~ 2^-23 * amax * sum_k |W[n,k]|:
//                  the size of an fp32 dot product's rounding error (tests bound
//                  both by 1e-5 * sum |x||W|; measured ~5e-8 vs ~1e-7 for fp32).
//                  Elements far below the row's amax keep less *relative*
//                  precision than fp32 would give them, never more absolute
//                  error. Speed: 3 vpdpbusd per 4 k x 16 channels instead of
//                  4 nibble->fp32 conversions + 4 FMAs per k (~6 vs ~15 cycles
//                  per 64-byte block on Zen 4), which keeps M = 1 memory-bound.
//                  Rows with NaN/inf are recomputed in plain fp32 (IEEE results).
//
// Per group q of tile t, for real row m (digit rows combined in fp32):
//   B  = sum_d 256^(D-1-d) * (acc_d - 8*asum_d)        symmetric (z = 8, exact ints)
//   y += s * B
// or, with zero points,
//   B  = sum_d 256^(D-1-d) * acc_d,  AS = sum_k X (or asum)
//   y += s * B - sz * AS
// (fp32 rounding then scales with |s*B| + |sz*AS|, not with their difference: a row whose
// codes all equal its zero point gets a few ulps of those terms, never exactly 0.)
// and finally y = rowscale * y + bias.
//
// Work split: tasks = (chunk of tiles) x (chunk of row blocks); a task walks its
// row blocks, and for each one its tiles, so a chunk of tiles is re-read from
// L2 by every row block. The micro-kernel holds RM rows x D digits x 16
// channels of int32 accumulators plus RM x 16 fp32 accumulators in registers.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "slmkern/int4.h"
#include "slmkern/threadpool.h"
#include "w4_simd.h"

namespace slmkern {
namespace {

constexpr float kFixedPointMax24 = 8323072.f;  // 127 * 65536: |X| bound of w4a16's fixed point

inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// --------------------------------------------------------------------------
// Activation prep: row m -> D digit rows (group-padded to gp) + group sums.
// --------------------------------------------------------------------------
struct RowOut {
  int8_t* dig;     // [D][Kp]
  int32_t* gsum;   // [G][D] sum of each digit over the group
  int64_t* xsum;   // [G] sum of X over the group (w4a16 only)
  float rowscale;
  bool bad;        // NaN or inf in the row (w4a16 recomputes it in fp32)
};

template <class V>
inline typename V::F load_x_tail(const uint8_t* p, DType t, int n) {
  alignas(64) float tmp[V::L];
  for (int i = 0; i < V::L; ++i) tmp[i] = i < n ? x_at(p, t, i) : 0.f;
  return V::loadf(tmp, 0);
}

// amax and finiteness of K elements of x starting at p.
template <class V>
inline float row_amax(const uint8_t* p, DType t, int64_t K, bool& finite) {
  using F = typename V::F;
  const int64_t esz = dtype_size(t);
  F m = V::zero_f();
  bool bad = false;
  int64_t k = 0;
  for (; k + V::L <= K; k += V::L) {
    const F v = V::load_x(p + k * esz, t);
    bad |= V::any_nonfinite(v);
    m = V::max(m, V::abs(v));
  }
  if (k < K) {
    const F v = load_x_tail<V>(p + k * esz, t, static_cast<int>(K - k));
    bad |= V::any_nonfinite(v);
    m = V::max(m, V::abs(v));
  }
  finite = !bad;
  return V::hmax(m);
}

template <class V, int D>
void quant_row(const uint8_t* xrow, DType t, const Int4Layout& W, RowOut& o) {
  using F = typename V::F;
  using I = typename V::I;
  const int64_t Kp = W.G * W.gp, esz = dtype_size(t);
  std::memset(o.dig, 0, static_cast<size_t>(D * Kp));
  std::memset(o.gsum, 0, sizeof(int32_t) * static_cast<size_t>(W.G * D));
  if (o.xsum) std::memset(o.xsum, 0, sizeof(int64_t) * static_cast<size_t>(W.G));
  bool finite = true;
  const float amax = row_amax<V>(xrow, t, W.K, finite);
  o.bad = !finite;
  if (!finite || amax < kActZeroThreshold) {  // digits stay 0
    o.rowscale = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
    return;
  }
  // Same fp32 operations as quantize_rows_s8_ref for D = 1 (bit-exact qx).
  const float top = D == 1 ? 127.f : kFixedPointMax24;
  const float inv = top / amax;
  const F vinv = V::set1(inv);
  const int32_t lim = static_cast<int32_t>(top);
  for (int64_t q = 0; q < W.G; ++q) {
    // Lane sums stay in int32: |digit| <= 128 and at most g/L terms per lane.
    I s0 = V::zero_i(), s1 = V::zero_i(), s2 = V::zero_i();
    int64_t xs = 0;
    for (int64_t kk = 0; kk < W.g; kk += V::L) {
      const int n = static_cast<int>(std::min<int64_t>(V::L, W.g - kk));
      const uint8_t* px = xrow + (q * W.g + kk) * esz;
      const F v = n == V::L ? V::load_x(px, t) : load_x_tail<V>(px, t, n);
      const I X = V::clamp_i(V::to_int(V::mul(v, vinv)), -lim, lim);
      int8_t* dst = o.dig + q * W.gp + kk;
      if (D == 1) {
        V::store_s8(dst, X, n);
        s0 = V::add_i(s0, X);
      } else {
        xs += V::hsum_i(X);  // up to 2^23 per lane: reduce every step
        const I d2 = V::low_digit(X);
        const I x1 = V::srai(V::sub_i(X, d2), 8);
        const I d1 = V::low_digit(x1);
        const I d0 = V::srai(V::sub_i(x1, d1), 8);
        V::store_s8(dst, d0, n);
        V::store_s8(dst + Kp, d1, n);
        V::store_s8(dst + 2 * Kp, d2, n);
        s0 = V::add_i(s0, d0);
        s1 = V::add_i(s1, d1);
        s2 = V::add_i(s2, d2);
      }
    }
    o.gsum[q * D] = V::hsum_i(s0);
    if (D == 3) {
      o.gsum[q * D + 1] = V::hsum_i(s1);
      o.gsum[q * D + 2] = V::hsum_i(s2);
      o.xsum[q] = xs;
    }
  }
  o.rowscale = amax / top;
}

// Row blocks: rows [m0, m0 + rows) share one activation block laid out
// [Kp/4][rows][D][4] (every broadcast of a micro-kernel step at a constant
// offset from one pointer), sums [G][rows][D] (int32) or [G][rows]
// (fp32 AS, weights with zero points). The int32 sums are stored as -8*asum:
// the micro-kernel starts its accumulators there.
struct Prepared {
  std::vector<int8_t> q;
  std::vector<int32_t> as8;  // -8 * asum (symmetric weights)
  std::vector<float> asf;
  std::vector<float> rowscale;
  std::vector<uint8_t> bad;
  std::vector<int64_t> rb_start;  // row block b = rows [rb_start[b], rb_start[b+1])
};

template <class V, int D>
void prepare(const Int4LinearArgs& a, const Int4Layout& W, int rm_max, Prepared& P) {
  const int64_t M = a.M, Kp = W.G * W.gp;
  const int64_t nrb = (M + rm_max - 1) / rm_max;
  P.rb_start.resize(static_cast<size_t>(nrb + 1));
  for (int64_t b = 0; b <= nrb; ++b) P.rb_start[b] = M * b / nrb;  // balanced block sizes
  P.q.assign(static_cast<size_t>(M * Kp * D), 0);
  if (W.asym) P.asf.assign(static_cast<size_t>(M * W.G), 0.f);
  else P.as8.assign(static_cast<size_t>(M * W.G * D), 0);
  P.rowscale.assign(static_cast<size_t>(M), 0.f);
  P.bad.assign(static_cast<size_t>(M), 0);
  const int64_t esz = dtype_size(a.dtype);
  parallel_for(nrb, a.n_threads, [&](int64_t b) {
    const int64_t m0 = P.rb_start[b], rows = P.rb_start[b + 1] - m0;
    std::vector<int8_t> dig(static_cast<size_t>(D * Kp));
    std::vector<int32_t> gsum(static_cast<size_t>(W.G * D));
    std::vector<int64_t> xsum(D == 3 ? static_cast<size_t>(W.G) : 0);
    int8_t* qb = P.q.data() + m0 * Kp * D;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      RowOut o{dig.data(), gsum.data(), D == 3 ? xsum.data() : nullptr, 0.f, false};
      quant_row<V, D>(static_cast<const uint8_t*>(a.x) + m * a.ldx * esz, a.dtype, W, o);
      P.rowscale[m] = o.rowscale;
      P.bad[m] = o.bad;
      if (rows * D == 1) {
        std::memcpy(qb, dig.data(), static_cast<size_t>(Kp));
      } else {
        for (int d = 0; d < D; ++d) {
          const int8_t* src = dig.data() + d * Kp;
          for (int64_t c = 0; c < Kp / 4; ++c)
            std::memcpy(qb + ((c * rows + r) * D + d) * 4, src + 4 * c, 4);
        }
      }
      for (int64_t q = 0; q < W.G; ++q) {
        if (W.asym) {
          P.asf[m0 * W.G + q * rows + r] =
              D == 1 ? static_cast<float>(gsum[q]) : static_cast<float>(xsum[q]);
        } else {
          for (int d = 0; d < D; ++d) P.as8[(m0 * W.G + q * rows + r) * D + d] = -8 * gsum[q * D + d];
        }
      }
    }
  });
}

// --------------------------------------------------------------------------
// Micro-kernel: RM rows x D digits x one 16-channel tile, all of K.
// --------------------------------------------------------------------------
struct TileCtx {
  int64_t G, nblk, gp, group_bytes;
  DType dtype;
  int64_t ldy;
};

template <class V, int RM, int D, bool ASYM>
void tile_kernel(const TileCtx& c, const uint8_t* tile, const int8_t* qa, const int32_t* as8, const float* asf,
                 const float* rowscale, const float* bias, uint8_t* y, int ncount) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr int R = RM * D, H = V::H;
  // vpdpbusd has a few cycles of latency: give few-row kernels more chains.
  constexpr int NACC = V::kChain ? (R >= 4 ? 1 : (R >= 2 ? 2 : 4)) : 1;
  // Every accumulator lives in a register: int32 ones plus RM x H fp32 ones,
  // with ~5 registers left for the block, its two nibble operands and constants.
  static_assert((NACC * R + RM) * H + 5 <= V::kRegs, "micro-kernel accumulators would spill");
  F yacc[RM][H];
#pragma GCC unroll 32
  for (int r = 0; r < RM; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) yacc[r][h] = V::zero_f();

  const int64_t qstride = c.gp * R;
  for (int64_t q = 0; q < c.G; ++q) {
    const uint8_t* grp = tile + q * c.group_bytes;
    const int8_t* qp = qa + q * qstride;
    I acc[NACC][R][H];
    // Symmetric weights: start from -8*asum, so acc ends as sum q*(u - 8).
#pragma GCC unroll 4
    for (int s = 0; s < NACC; ++s)
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) acc[s][r][h] = (!ASYM && s == 0) ? V::set1_i(as8[q * R + r]) : V::zero_i();

    auto block = [&](int64_t b, int s) __attribute__((always_inline)) {
      const uint8_t* wb = grp + b * kInt4BlockBytes;
      const int8_t* ql = qp + 2 * b * R * 4;
      const int8_t* qh = ql + R * 4;
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) {
        const I blk = V::load_block(wb, h);
        const I l = V::lo(blk), hh = V::hi(blk);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) acc[s][r][h] = V::dot2(acc[s][r][h], l, hh, ql + r * 4, qh + r * 4);
      }
    };
    int64_t b = 0;
    for (; b + NACC <= c.nblk; b += NACC) {
#pragma GCC unroll 4
      for (int s = 0; s < NACC; ++s) block(b + s, s);
    }
    for (; b < c.nblk; ++b) block(b, 0);

#pragma GCC unroll 4
    for (int s = 1; s < NACC; ++s)
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) acc[0][r][h] = V::add_i(acc[0][r][h], acc[s][r][h]);

    const float* sp = reinterpret_cast<const float*>(grp + c.nblk * kInt4BlockBytes);
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      const F s = V::loadf(sp, h);
      F sz = V::zero_f();
      if (ASYM) sz = V::loadf(sp + kInt4NB, h);
#pragma GCC unroll 32
      for (int rm = 0; rm < RM; ++rm) {
        F B = V::cvt(acc[0][rm * D][h]);
#pragma GCC unroll 3
        for (int d = 1; d < D; ++d) B = V::fma(B, V::set1(256.f), V::cvt(acc[0][rm * D + d][h]));
        yacc[rm][h] = V::fma(s, B, yacc[rm][h]);
        if (ASYM) yacc[rm][h] = V::fnma(sz, V::set1(asf[q * RM + rm]), yacc[rm][h]);
      }
    }
  }

  const int64_t esz = dtype_size(c.dtype);
#pragma GCC unroll 32
  for (int rm = 0; rm < RM; ++rm) {
    const F rs = V::set1(rowscale[rm]);
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      const int n = ncount - h * V::L;
      if (n <= 0) break;
      F v = V::mul(yacc[rm][h], rs);
      if (bias) v = V::add(v, n >= V::L ? V::loadf(bias, h) : V::loadf_n(bias, h, n));
      V::store(y + (rm * c.ldy + h * V::L) * esz, c.dtype, v, std::min(n, V::L));
    }
  }
}

using TileFn = void (*)(const TileCtx&, const uint8_t*, const int8_t*, const int32_t*, const float*,
                        const float*, const float*, uint8_t*, int);

template <class V, int D, bool ASYM, int... Is>
const TileFn* tile_table(std::integer_sequence<int, Is...>) {
  static const TileFn t[] = {&tile_kernel<V, Is + 1, D, ASYM>...};
  return t;
}

// --------------------------------------------------------------------------
// Rows with NaN/inf in w4a16: plain fp32 dot products (IEEE inf/NaN results).
// --------------------------------------------------------------------------
inline void recompute_rows_fp32(const Int4LinearArgs& a, const Int4Layout& W, const std::vector<int64_t>& rows) {
  const int64_t K = a.K, esz = dtype_size(a.dtype);
  std::vector<float> xf(rows.size() * static_cast<size_t>(K));
  for (size_t i = 0; i < rows.size(); ++i)
    for (int64_t k = 0; k < K; ++k) xf[i * K + k] = x_at(a.x, a.dtype, rows[i] * a.ldx + k);
  parallel_for(W.NT, a.n_threads, [&](int64_t t) {
    std::vector<float> wrow(static_cast<size_t>(K));
    for (int64_t i = 0; i < kInt4NB && t * kInt4NB + i < a.N; ++i) {
      const int64_t n = t * kInt4NB + i;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t q = k / W.g, kk = k % W.g;
        const uint8_t* grp = a.w_packed + t * W.tile_bytes + q * W.group_bytes;
        const uint8_t byte = grp[(kk / 8) * kInt4BlockBytes + i * 4 + (kk & 3)];
        const int u = (kk & 7) < 4 ? (byte & 0xf) : (byte >> 4);
        float s, sz;
        std::memcpy(&s, grp + W.nblk * kInt4BlockBytes + i * 4, 4);
        if (W.asym) std::memcpy(&sz, grp + W.nblk * kInt4BlockBytes + kInt4BlockBytes + i * 4, 4);
        wrow[k] = W.asym ? static_cast<float>(u) * s - sz : static_cast<float>(u - 8) * s;
      }
      for (size_t j = 0; j < rows.size(); ++j) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xf[j * K + k] * wrow[k];
        if (a.bias) acc = acc + a.bias[n];
        y_store(a.y, a.dtype, rows[j] * a.ldy + n, acc);
      }
    }
  });
  (void)esz;
}

// --------------------------------------------------------------------------
// Driver.
// --------------------------------------------------------------------------
// Threads worth waking: small calls (a MiniLM layer at M = 1 is ~5 us of
// work) run on the caller alone. Waking helpers would save a few us but costs
// as much, and on a busy machine a helper that is not scheduled holds the call.
inline int useful_threads(const Int4LinearArgs& a, const Int4Layout& W, int D) {
  const double dots = static_cast<double>(a.M) * D * W.NT * kInt4NB * (W.G * W.gp) / 64.0;  // vpdpbusd
  const double cycles = dots + static_cast<double>(W.total) / 16.0;  // + streaming the weights once
  return cycles < 1e4 ? 1 : std::max(1, a.n_threads);
}

template <class V, int D, int RM_MAX>
void int4_linear(const Int4LinearArgs& a0) {
  if (a0.M <= 0) return;
  const Int4Layout W = int4_layout(a0.N, a0.K, a0.group_size, a0.asym);
  Int4LinearArgs a = a0;
  a.n_threads = useful_threads(a0, W, D);
  Prepared P;
  prepare<V, D>(a, W, RM_MAX, P);

  const TileFn* fns = W.asym ? tile_table<V, D, true>(std::make_integer_sequence<int, RM_MAX>{})
                             : tile_table<V, D, false>(std::make_integer_sequence<int, RM_MAX>{});
  const TileCtx c{W.G, W.nblk, W.gp, W.group_bytes, a.dtype, a.ldy};
  const int64_t Kp = W.G * W.gp, esz = dtype_size(a.dtype);
  const int64_t nrb = static_cast<int64_t>(P.rb_start.size()) - 1;
  const int threads = a.n_threads;

  // Tiles per task: with one row block there is no reuse, only balance to
  // care about; with several, a chunk of tiles should stay in L2 while every
  // row block walks it. Many small tasks keep the last one short, so no
  // thread idles long at the end (tasks are claimed dynamically).
  const int64_t want = (nrb == 1 ? 8 : 32) * threads;
  int64_t tpc = (W.NT + want - 1) / want;
  if (nrb > 1) tpc = std::max<int64_t>(1, std::min<int64_t>(tpc, (256 << 10) / W.tile_bytes));
  const int64_t ntc = (W.NT + tpc - 1) / tpc;
  const int64_t nrc = std::min<int64_t>(nrb, std::max<int64_t>(1, (4 * threads + ntc - 1) / ntc));

  parallel_for(ntc * nrc, threads, [&](int64_t task) {
    const int64_t tc = task % ntc, rc = task / ntc;
    const int64_t t0 = tc * tpc, t1 = std::min(W.NT, t0 + tpc);
    const int64_t b0 = nrb * rc / nrc, b1 = nrb * (rc + 1) / nrc;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = P.rb_start[b], rows = P.rb_start[b + 1] - m0;
      const int8_t* qa = P.q.data() + m0 * Kp * D;
      const int32_t* as8 = W.asym ? nullptr : P.as8.data() + m0 * W.G * D;
      const float* asf = W.asym ? P.asf.data() + m0 * W.G : nullptr;
      const TileFn fn = fns[rows - 1];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kInt4NB;
        fn(c, a.w_packed + t * W.tile_bytes, qa, as8, asf, P.rowscale.data() + m0,
           a.bias ? a.bias + n0 : nullptr, static_cast<uint8_t*>(a.y) + (m0 * a.ldy + n0) * esz,
           static_cast<int>(std::min<int64_t>(kInt4NB, a.N - n0)));
      }
    }
  });

  if (D == 3) {
    std::vector<int64_t> bad;
    for (int64_t m = 0; m < a.M; ++m)
      if (P.bad[m]) bad.push_back(m);
    if (!bad.empty()) recompute_rows_fp32(a, W, bad);
  }
}

}  // namespace
}  // namespace slmkern
