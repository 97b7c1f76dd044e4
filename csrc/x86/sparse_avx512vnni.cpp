// sparse_linear with AVX-512 (F/BW/VL/DQ + VNNI + VBMI2): y[M, N] = x[M, K] @ W^T, W in the
// bitmask packed layout (slmkern/bitmask.h).
//
// int8 values (bit-exact with sparse_linear_ref / w8a8_linear): x rows quantized to
// u8 = q + 128; per 64 columns of a weight row, the 64-bit mask drives vpexpandb of an
// unaligned 64-byte load at the row's value cursor (the packed buffer ends with 64 pad
// bytes, so the load never leaves it) into a dense s8 operand, vpdpbusd against the 64
// x bytes, cursor += popcnt(mask). The +128 shift is removed with the per-row value sum.
// Several weight rows (and x rows) run at once so the vpdpbusd chains overlap.
//
// float values, few x rows: the same with vexpandps per 16 columns and fma; zero columns
// are multiplied too, so inf/NaN in x propagate like a dense matmul.
// float values, more x rows: x transposed into an L2 tile xT[k][m]; every nonzero
// (k, v) of a weight row is one broadcast-fma over up to 64 rows of x. Work scales with
// nnz, not K. It skips zero weights, so rows of x holding inf/NaN are recomputed
// afterwards with the expand path (dense semantics).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "slmkern/bitmask.h"
#include "slmkern/threadpool.h"
#include "w8a8_quant_avx512.h"

namespace slmkern {
namespace {

#define SLMK_INLINE inline __attribute__((always_inline))

// A 64-byte load the compiler may not fold into vpexpandb / vexpandps: the memory-operand
// forms of the expands are several times slower on Zen 4 than load + register expand.
SLMK_INLINE __m512i load_unfolded(const void* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm("" : "+v"(v));
  return v;
}

thread_local ScratchBuf tl_sparse_scratch;
thread_local ScratchBuf tl_sparse_xt;

template <class F>
void for_row_chunks(const SparseLinearArgs& a, const int64_t* offsets, int64_t per_row, F&& f) {
  const int64_t parts = a.n_threads <= 1 ? 1 : 4 * static_cast<int64_t>(a.n_threads);
  parallel_for(parts, a.n_threads, [&](int64_t p) {
    const int64_t r0 = sparse_split_row(offsets, a.N, per_row, p, parts);
    const int64_t r1 = sparse_split_row(offsets, a.N, per_row, p + 1, parts);
    if (r0 < r1) f(r0, r1);
  });
}

struct Ctx {
  SparsePacked w;
  int64_t Kw, N;
  const uint8_t* xq;  // s8: u8 rows, stride ldq (>= Kw * 64)
  const float* xf;    // f32: rows, stride ldq, zero-padded to Kw * 64
  int64_t ldq;
  const float* sx;
  const float* scales;
  const float* bias;
  void* y;
  int64_t ldy;
  DType dt;
};

// ---------------------------------------------------------------- int8 values
template <int NR, int MT>
__attribute__((noinline)) void s8_block(const Ctx& c, int64_t n, int64_t m0) {
  __m512i acc[NR][MT];
  const int8_t* cur[NR];
  const uint64_t* mk[NR];
  const int8_t* vals = static_cast<const int8_t*>(c.w.values);
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_si512();
    cur[r] = vals + c.w.offsets[n + r];
    mk[r] = c.w.masks + (n + r) * c.Kw;
  }
  const uint8_t* xq = c.xq + m0 * c.ldq;
  for (int64_t b = 0; b < c.Kw; ++b) {
    __m512i xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_si512(xq + i * c.ldq + b * 64);
    for (int r = 0; r < NR; ++r) {
      const uint64_t m = mk[r][b];
      const __m512i v = _mm512_maskz_expand_epi8(m, load_unfolded(cur[r]));
      cur[r] += _mm_popcnt_u64(m);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], xv[i], v);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const int32_t corr = 128 * c.w.rowsum[n + r];
    const float ws = c.scales[n + r];
    for (int i = 0; i < MT; ++i) {
      const int32_t s = _mm512_reduce_add_epi32(acc[r][i]) - corr;
      const float sc = c.sx[m0 + i] * ws;
      float y = static_cast<float>(s) * sc;
      if (c.bias) y = y + c.bias[n + r];
      store_from_f32(c.y, c.dt, (m0 + i) * c.ldy + n + r, y);
    }
  }
}

template <int NR>
void s8_rows(const Ctx& c, int64_t n, int64_t M) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) s8_block<NR, 4>(c, n, m);
  switch (M - m) {
    case 3: s8_block<NR, 3>(c, n, m); break;
    case 2: s8_block<NR, 2>(c, n, m); break;
    case 1: s8_block<NR, 1>(c, n, m); break;
    default: break;
  }
}

int64_t row_indices(const Ctx& c, int64_t n, int32_t* idx);

// ---------------------------------------------------------------- int8 values, nonzero broadcast
// x transposed to xT8[k][m] (u8 = q + 128, W rows of x per tile). Four nonzeros (k0..k3, w0..w3)
// of a weight row at a time: two levels of byte/word unpacks interleave xT8[k0..k3] into dwords
// [x(m,k0), x(m,k1), x(m,k2), x(m,k3)], and one vpdpbusd with the broadcast w0..w3 adds the four
// products for every m. The unpacks work per 128-bit lane, so dword 4L + i of accumulator j
// holds row m = 16L + 4j + i. Work scales with nnz, not K.
struct Z {  // 64 rows per tile
  using T = __m512i;
  static constexpr int W = 64;
  static SLMK_INLINE T load(const uint8_t* p) { return _mm512_load_si512(p); }
  static SLMK_INLINE T zero() { return _mm512_setzero_si512(); }
  static SLMK_INLINE T set1(int32_t v) { return _mm512_set1_epi32(v); }
  static SLMK_INLINE T lo8(T a, T b) { return _mm512_unpacklo_epi8(a, b); }
  static SLMK_INLINE T hi8(T a, T b) { return _mm512_unpackhi_epi8(a, b); }
  static SLMK_INLINE T lo16(T a, T b) { return _mm512_unpacklo_epi16(a, b); }
  static SLMK_INLINE T hi16(T a, T b) { return _mm512_unpackhi_epi16(a, b); }
  static SLMK_INLINE T dp(T acc, T x, T w) { return _mm512_dpbusd_epi32(acc, x, w); }
  static SLMK_INLINE T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static SLMK_INLINE void store(int32_t* p, T v) { _mm512_storeu_si512(p, v); }
};
struct X {  // 16 rows per tile
  using T = __m128i;
  static constexpr int W = 16;
  static SLMK_INLINE T load(const uint8_t* p) { return _mm_load_si128(reinterpret_cast<const __m128i*>(p)); }
  static SLMK_INLINE T zero() { return _mm_setzero_si128(); }
  static SLMK_INLINE T set1(int32_t v) { return _mm_set1_epi32(v); }
  static SLMK_INLINE T lo8(T a, T b) { return _mm_unpacklo_epi8(a, b); }
  static SLMK_INLINE T hi8(T a, T b) { return _mm_unpackhi_epi8(a, b); }
  static SLMK_INLINE T lo16(T a, T b) { return _mm_unpacklo_epi16(a, b); }
  static SLMK_INLINE T hi16(T a, T b) { return _mm_unpackhi_epi16(a, b); }
  static SLMK_INLINE T dp(T acc, T x, T w) { return _mm_dpbusd_epi32(acc, x, w); }
  static SLMK_INLINE T add(T a, T b) { return _mm_add_epi32(a, b); }
  static SLMK_INLINE void store(int32_t* p, T v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
};

// idx/w4: the row's nonzero columns and values, padded with (column 0, value 0) to a multiple of 4.
template <class V>
__attribute__((noinline)) void s8_nz_row(const Ctx& c, const uint8_t* xT, int64_t n, int64_t m0, int64_t rows,
                                         const int32_t* idx, const int32_t* w4, int64_t groups) {
  using T = typename V::T;
  constexpr int W = V::W;
  T a[2][4];
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) a[h][j] = V::zero();
  // two accumulator sets (even / odd groups) so the vpdpbusd chains overlap
#define SLMK_S8_STEP(H, G)                                                                              \
  {                                                                                                    \
    const int32_t* k = idx + 4 * (G);                                                                  \
    const T x0 = V::load(xT + static_cast<int64_t>(k[0]) * W), x1 = V::load(xT + static_cast<int64_t>(k[1]) * W); \
    const T x2 = V::load(xT + static_cast<int64_t>(k[2]) * W), x3 = V::load(xT + static_cast<int64_t>(k[3]) * W); \
    const T l01 = V::lo8(x0, x1), h01 = V::hi8(x0, x1), l23 = V::lo8(x2, x3), h23 = V::hi8(x2, x3);       \
    const T w = V::set1(w4[G]);                                                                        \
    a[H][0] = V::dp(a[H][0], V::lo16(l01, l23), w);                                                    \
    a[H][1] = V::dp(a[H][1], V::hi16(l01, l23), w);                                                    \
    a[H][2] = V::dp(a[H][2], V::lo16(h01, h23), w);                                                    \
    a[H][3] = V::dp(a[H][3], V::hi16(h01, h23), w);                                                    \
  }
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    SLMK_S8_STEP(0, g)
    SLMK_S8_STEP(1, g + 1)
  }
  if (g < groups) SLMK_S8_STEP(0, g)
#undef SLMK_S8_STEP
  alignas(64) int32_t acc[4][W / 4];
  for (int j = 0; j < 4; ++j) V::store(acc[j], V::add(a[0][j], a[1][j]));
  const int32_t corr = 128 * c.w.rowsum[n];
  const float ws = c.scales[n];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t L = r / 16, j = (r / 4) % 4, i = r % 4;  // row r = 16L + 4j + i
    const int32_t s = acc[j][4 * L + i] - corr;
    const float sc = c.sx[m0 + r] * ws;
    float y = static_cast<float>(s) * sc;
    if (c.bias) y = y + c.bias[n];
    store_from_f32(c.y, c.dt, (m0 + r) * c.ldy + n, y);
  }
}

// ---------------------------------------------------------------- float values, expand
template <int NR, int MT>
__attribute__((noinline)) void f32_block(const Ctx& c, int64_t n, int64_t m0) {
  __m512 acc[NR][MT];
  const float* cur[NR];
  const uint64_t* mk[NR];
  const float* vals = static_cast<const float*>(c.w.values);
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
    cur[r] = vals + c.w.offsets[n + r];
    mk[r] = c.w.masks + (n + r) * c.Kw;
  }
  const float* xf = c.xf + m0 * c.ldq;
  for (int64_t b = 0; b < c.Kw; ++b) {
    uint64_t m[NR];
    for (int r = 0; r < NR; ++r) m[r] = mk[r][b];
    for (int j = 0; j < 4; ++j) {
      __m512 xv[MT];
      for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_ps(xf + i * c.ldq + b * 64 + 16 * j);
      for (int r = 0; r < NR; ++r) {
        const __mmask16 h = static_cast<__mmask16>(m[r] >> (16 * j));
        const __m512 v = _mm512_maskz_expand_ps(h, _mm512_castsi512_ps(load_unfolded(cur[r])));
        cur[r] += _mm_popcnt_u32(h);
        for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_fmadd_ps(v, xv[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) {
      float y = _mm512_reduce_add_ps(acc[r][i]);
      if (c.bias) y = y + c.bias[n + r];
      store_from_f32(c.y, c.dt, (m0 + i) * c.ldy + n + r, y);
    }
}

template <int NR>
void f32_rows(const Ctx& c, int64_t n, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) f32_block<NR, 2>(c, n, m);
  if (m < m1) f32_block<NR, 1>(c, n, m);
}

// ---------------------------------------------------------------- float values, nonzero broadcast
// xT: [tiles][Kw*64][64] fp32, tile t holds x rows 64t .. 64t+63 (zeros beyond M).
template <int J>
__attribute__((noinline)) void f32_nz_row(const Ctx& c, const float* xT, int64_t n, int64_t m0, int64_t rows,
                                          const int32_t* idx, int64_t cnt) {
  const float* v = static_cast<const float*>(c.w.values) + c.w.offsets[n];
  __m512 a0[J], a1[J];
  for (int j = 0; j < J; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= cnt; i += 2) {
    const float* x0 = xT + static_cast<int64_t>(idx[i]) * 64;
    const float* x1 = xT + static_cast<int64_t>(idx[i + 1]) * 64;
    const __m512 w0 = _mm512_set1_ps(v[i]), w1 = _mm512_set1_ps(v[i + 1]);
    for (int j = 0; j < J; ++j) {
      a0[j] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * j), a0[j]);
      a1[j] = _mm512_fmadd_ps(w1, _mm512_load_ps(x1 + 16 * j), a1[j]);
    }
  }
  if (i < cnt) {
    const float* x0 = xT + static_cast<int64_t>(idx[i]) * 64;
    const __m512 w0 = _mm512_set1_ps(v[i]);
    for (int j = 0; j < J; ++j) a0[j] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * j), a0[j]);
  }
  alignas(64) float out[64];
  for (int j = 0; j < J; ++j) _mm512_store_ps(out + 16 * j, _mm512_add_ps(a0[j], a1[j]));
  const float b = c.bias ? c.bias[n] : 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    float y = out[r];
    if (c.bias) y = y + b;
    store_from_f32(c.y, c.dt, (m0 + r) * c.ldy + n, y);
  }
}

// The row's nonzero columns, in order: vpcompressd of the column numbers per 16 mask bits
// (register form + a full store: idx has 16 spare entries), no data-dependent branches.
int64_t row_indices(const Ctx& c, int64_t n, int32_t* idx) {
  int64_t cnt = 0;
  const uint64_t* mk = c.w.masks + n * c.Kw;
  const __m512i step = _mm512_set1_epi32(16);
  __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = 0; b < c.Kw; ++b) {
    const uint64_t m = mk[b];
    for (int j = 0; j < 4; ++j) {
      const __mmask16 h = static_cast<__mmask16>(m >> (16 * j));
      _mm512_storeu_si512(idx + cnt, _mm512_maskz_compress_epi32(h, col));
      cnt += _mm_popcnt_u32(h);
      col = _mm512_add_epi32(col, step);
    }
  }
  return cnt;
}

// Path choice by a cost model fitted on Zen 4 (single thread, K = 2048, N = 8192; times per
// weight row in units of Kw = K/64 words, both paths scale with K). d = nnz / (N K).
//   float expand   : 1.5 + 0.63 M
//   float broadcast: per 64-row tile, 1.2 + 5.8 d + J (0.7 + 10.5 d), J = ceil(rows / 16)
//   int8 expand    : 0.3 + 0.7 d + 0.17 M
//   int8 broadcast : per 16-row tile (M <= 16) 1.9 + 9.5 d, per 64-row tile 3.6 + 12.7 d
inline bool f32_broadcast_wins(int64_t M, double d) {
  double bc = 0.0;
  for (int64_t m0 = 0; m0 < M; m0 += 64) {
    const int64_t J = (std::min<int64_t>(64, M - m0) + 15) / 16;
    bc += 1.2 + 5.8 * d + static_cast<double>(J) * (0.7 + 10.5 * d);
  }
  return bc < 1.5 + 0.63 * static_cast<double>(M);
}
inline bool s8_broadcast_wins(int64_t M, double d, bool narrow, int64_t tiles) {
  const double bc = static_cast<double>(tiles) * (narrow ? 1.9 + 9.5 * d : 3.6 + 12.7 * d);
  return bc < 0.3 + 0.7 * d + 0.17 * static_cast<double>(M);
}

// 0: choose by cost, 1: always expand, 2: always broadcast (tests and tuning: sparse_force_path)
std::atomic<int> g_force_path{0};

void f32_linear(const SparseLinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kw = sparse_words(K), Kp = Kw * 64;
  Ctx c{};
  c.w = sparse_view(a.w_packed, N, K, a.kind);
  c.Kw = Kw; c.N = N; c.ldq = Kp; c.bias = a.bias; c.y = a.y; c.ldy = a.ldy; c.dt = a.dtype;
  const int force = g_force_path.load(std::memory_order_relaxed);
  const double d = static_cast<double>(a.nnz) / (static_cast<double>(N) * static_cast<double>(K));
  const bool broadcast = force ? force == 2 : f32_broadcast_wins(M, d);
  const int64_t tiles = broadcast ? ceil_div(M, 64) : 0;
  const size_t xf_bytes = static_cast<size_t>(M * Kp * 4);
  const size_t xt_bytes = static_cast<size_t>(tiles * Kp * 64 * 4);
  uint8_t* buf = tl_sparse_scratch.get(xf_bytes + xt_bytes + 64);
  float* xf = reinterpret_cast<float*>(buf);
  float* xT = reinterpret_cast<float*>(buf + (xf_bytes + 63) / 64 * 64);
  std::vector<int64_t> bad;  // rows of x with inf/NaN: dense semantics need the expand path
  for (int64_t m = 0; m < M; ++m) {
    float* r = xf + m * Kp;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      r[k] = load_as_f32(a.x, a.dtype, m * a.ldx + k);
      finite = finite && std::isfinite(r[k]);
    }
    std::fill(r + K, r + Kp, 0.f);
    if (!finite) bad.push_back(m);
  }
  c.xf = xf;
  if (!broadcast) {
    for_row_chunks(a, c.w.offsets, Kw * 4, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) f32_rows<4>(c, n, 0, M);
      for (; n < n1; ++n) f32_rows<1>(c, n, 0, M);
    });
    return;
  }
  for (int64_t t = 0; t < tiles; ++t) {
    float* T = xT + t * Kp * 64;
    const int64_t m0 = t * 64, rows = std::min<int64_t>(64, M - m0);
    std::fill(T, T + Kp * 64, 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = xf + (m0 + r) * Kp;
      for (int64_t k = 0; k < K; ++k) T[k * 64 + r] = src[k];
    }
  }
  for_row_chunks(a, c.w.offsets, Kw * 2, [&](int64_t n0, int64_t n1) {
    std::vector<int32_t> idx(static_cast<size_t>(Kp) + 16);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t cnt = row_indices(c, n, idx.data());
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * 64, rows = std::min<int64_t>(64, M - m0);
        const float* T = xT + t * Kp * 64;
        switch ((rows + 15) / 16) {
          case 1: f32_nz_row<1>(c, T, n, m0, rows, idx.data(), cnt); break;
          case 2: f32_nz_row<2>(c, T, n, m0, rows, idx.data(), cnt); break;
          case 3: f32_nz_row<3>(c, T, n, m0, rows, idx.data(), cnt); break;
          default: f32_nz_row<4>(c, T, n, m0, rows, idx.data(), cnt); break;
        }
      }
    }
  });
  for (int64_t m : bad)
    for_row_chunks(a, c.w.offsets, Kw * 4, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) f32_block<1, 1>(c, n, m);
    });
}

void s8_linear(const SparseLinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kw = sparse_words(K), Kp = Kw * 64;
  Ctx c{};
  c.w = sparse_view(a.w_packed, N, K, a.kind);
  c.Kw = Kw; c.N = N; c.ldq = Kp; c.scales = a.scales; c.bias = a.bias; c.y = a.y; c.ldy = a.ldy;
  c.dt = a.dtype;
  uint8_t* buf = tl_sparse_scratch.get(static_cast<size_t>(M * Kp + M * 4 + 128));
  uint8_t* xq = buf;
  float* sx = reinterpret_cast<float*>(buf + (M * Kp + 63) / 64 * 64);
  // quantize_rows_u8_avx512 fills up to ceil(K/4)*4; the rest of each row only ever meets
  // zero weights, but must be initialised memory.
  quantize_rows_u8_avx512(a.x, a.dtype, M, K, a.ldx, xq, Kp, sx);
  const int64_t Kp4 = int8_padded_k(K);
  for (int64_t m = 0; m < M; ++m) std::memset(xq + m * Kp + Kp4, 128, static_cast<size_t>(Kp - Kp4));
  c.xq = xq; c.sx = sx;
  const int force = g_force_path.load(std::memory_order_relaxed);
  const bool narrow = M <= 16;
  const int64_t TW = narrow ? 16 : 64, tiles = ceil_div(M, TW);
  const double d = static_cast<double>(a.nnz) / (static_cast<double>(N) * static_cast<double>(K));
  const bool broadcast = force ? force == 2 : s8_broadcast_wins(M, d, narrow, tiles);
  if (!broadcast) {
    for_row_chunks(a, c.w.offsets, Kw * 8, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) s8_rows<4>(c, n, M);
      for (; n < n1; ++n) s8_rows<1>(c, n, M);
    });
    return;
  }
  // xT8[t][k][TW]: column k of rows TW*t .. TW*t + TW-1 as u8 (128 = q of 0 past M)
  uint8_t* xT = tl_sparse_xt.get(static_cast<size_t>(tiles * K * TW + 64));
  std::memset(xT, 128, static_cast<size_t>(tiles * K * TW));
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* T = xT + (m / TW) * K * TW + (m % TW);
    const uint8_t* src = xq + m * Kp;
    for (int64_t k = 0; k < K; ++k) T[k * TW] = src[k];
  }
  const int8_t* vals = static_cast<const int8_t*>(c.w.values);
  for_row_chunks(a, c.w.offsets, 4, [&](int64_t n0, int64_t n1) {
    std::vector<int32_t> idx(static_cast<size_t>(Kp) + 16), w4(static_cast<size_t>(Kp / 4) + 1);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t cnt = row_indices(c, n, idx.data());
      const int64_t groups = (cnt + 3) / 4;
      const int8_t* v = vals + c.w.offsets[n];
      int8_t* wb = reinterpret_cast<int8_t*>(w4.data());
      std::memcpy(wb, v, static_cast<size_t>(cnt));
      for (int64_t i = cnt; i < groups * 4; ++i) {
        idx[static_cast<size_t>(i)] = 0;
        wb[i] = 0;
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * TW, rows = std::min<int64_t>(TW, M - m0);
        const uint8_t* T = xT + t * K * TW;
        if (narrow) s8_nz_row<X>(c, T, n, m0, rows, idx.data(), w4.data(), groups);
        else s8_nz_row<Z>(c, T, n, m0, rows, idx.data(), w4.data(), groups);
      }
    }
  });
}

}  // namespace

void sparse_force_path(int path) { g_force_path.store(path < 0 || path > 2 ? 0 : path); }

void sparse_linear_avx512vnni(const SparseLinearArgs& a) {
  if (a.M <= 0) return;
  if (a.kind == SparseValues::s8) s8_linear(a);
  else f32_linear(a);
}

}  // namespace slmkern
