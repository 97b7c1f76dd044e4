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
#include <cmath>
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

// Per-thread lists for the 8 rows of a block (block_blocks / block_indices fill them): p[r] and
// q[r] hold `na` int32 each, v[r] `nv` bytes; every list starts 64-byte aligned.
struct RowLists {
  std::vector<uint8_t> buf;
  int32_t* p[8];
  int32_t* q[8];
  uint8_t* v[8];
  int64_t cnt[8];
  RowLists(int64_t na, int64_t nv) {
    const int64_t sa = (na * 4 + 63) / 64 * 64, sv = (nv + 63) / 64 * 64;
    buf.resize(static_cast<size_t>(8 * (2 * sa + sv) + 64));
    uint8_t* at = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int r = 0; r < 8; ++r, at += 2 * sa + sv) {
      p[r] = reinterpret_cast<int32_t*>(at);
      q[r] = reinterpret_cast<int32_t*>(at + sa);
      v[r] = at + 2 * sa;
    }
  }
};

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
// Rows 8j + R0 .. 8j + R0 + NR - 1 (NR = 4: half a block) x MT x rows from m0. The block's value
// stream holds every row of a word back to back, so the rows outside the window are stepped over
// by their popcounts.
template <int R0, int NR, int MT>
__attribute__((noinline)) void s8_block(const Ctx& c, int64_t j, int64_t m0) {
  __m512i acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_si512();
  const uint64_t* mk = c.w.masks + j * c.Kw * 8;
  const int8_t* cur = static_cast<const int8_t*>(c.w.values) + c.w.boffsets[j];
  const uint8_t* xq = c.xq + m0 * c.ldq;
  for (int64_t b = 0; b < c.Kw; ++b, mk += 8) {
    __m512i xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_si512(xq + i * c.ldq + b * 64);
    for (int r = 0; r < R0; ++r) cur += _mm_popcnt_u64(mk[r]);
    for (int r = 0; r < NR; ++r) {
      const uint64_t m = mk[R0 + r];
      const __m512i v = _mm512_maskz_expand_epi8(m, load_unfolded(cur));
      cur += _mm_popcnt_u64(m);
      for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], xv[i], v);
    }
    for (int r = R0 + NR; r < 8; ++r) cur += _mm_popcnt_u64(mk[r]);
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t n = 8 * j + R0 + r;
    if (n >= c.N) break;
    const int32_t corr = 128 * c.w.rowsum[n];
    const float ws = c.scales[n];
    for (int i = 0; i < MT; ++i) {
      const int32_t s = _mm512_reduce_add_epi32(acc[r][i]) - corr;
      const float sc = c.sx[m0 + i] * ws;
      float y = static_cast<float>(s) * sc;
      if (c.bias) y = y + c.bias[n];
      store_from_f32(c.y, c.dt, (m0 + i) * c.ldy + n, y);
    }
  }
}

template <int R0>
void s8_half(const Ctx& c, int64_t j, int64_t M) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) s8_block<R0, 4, 4>(c, j, m);
  switch (M - m) {
    case 3: s8_block<R0, 4, 3>(c, j, m); break;
    case 2: s8_block<R0, 4, 2>(c, j, m); break;
    case 1: s8_block<R0, 4, 1>(c, j, m); break;
    default: break;
  }
}

// 8 accumulators -> one __m256i of their 8 horizontal sums (in order).
SLMK_INLINE __m256i hsum8_epi32(const __m512i a[8]) {
  __m512i p[4];
  for (int i = 0; i < 4; ++i)  // lane: [a2i_0+a2i_2, a2i+1_0+.., a2i_1+a2i_3, a2i+1_1+..]
    p[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]),
                            _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
  // lane: partial sums of rows 4h..4h+3
  const __m512i q0 = _mm512_add_epi32(_mm512_unpacklo_epi64(p[0], p[1]), _mm512_unpackhi_epi64(p[0], p[1]));
  const __m512i q1 = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2], p[3]), _mm512_unpackhi_epi64(p[2], p[3]));
  // lanes: [q0 L0+L1, q0 L2+L3, q1 L0+L1, q1 L2+L3]
  const __m512i t = _mm512_add_epi32(_mm512_shuffle_i32x4(q0, q1, 0x88), _mm512_shuffle_i32x4(q0, q1, 0xdd));
  const __m512i u = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, 0xb1));  // lanes 0, 2: the sums
  return _mm512_castsi512_si256(_mm512_shuffle_i32x4(u, u, 0x08));
}

// y[m, n..n+7] from the 8 int32 sums: (acc - 128 rowsum) * (sx[m] * scale[n]) + bias[n], the
// scalar epilogue's three fp32 roundings, lane by lane.
SLMK_INLINE void s8_store8(const Ctx& c, int64_t n, int64_t m, __m256i acc) {
  const __m256i corr = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.w.rowsum + n)), 7);
  const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(c.sx[m]), _mm256_loadu_ps(c.scales + n));
  __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, corr)), sc);
  if (c.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(c.bias + n));
  if (c.dt == DType::f32) {
    _mm256_storeu_ps(static_cast<float*>(c.y) + m * c.ldy + n, y);
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, y);
    for (int r = 0; r < 8; ++r) store_from_f32(c.y, c.dt, m * c.ldy + n + r, t[r]);
  }
}

// Block j (8 weight rows) x MT x rows, one pass over its masks and values: each expand feeds MT
// vpdpbusd. One value cursor walks the block's stream (bitmask.h), one 64-byte mask line per word.
template <int MT>
__attribute__((noinline)) void s8_block8(const Ctx& c, int64_t j, int64_t m0) {
  constexpr int NR = 8;
  __m512i acc[MT][NR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) acc[i][r] = _mm512_setzero_si512();
  const uint64_t* mk = c.w.masks + j * c.Kw * 8;
  const int8_t* cur = static_cast<const int8_t*>(c.w.values) + c.w.boffsets[j];
  const int64_t Kw = c.Kw;
  const uint8_t* xq = c.xq + m0 * c.ldq;
  for (int64_t b = 0; b < Kw; ++b, mk += 8) {
    __m512i xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_si512(xq + i * c.ldq + b * 64);
    // Both streams run straight on into the next block (and at the end into the rowsum / values
    // sections or the 64 pad bytes; prefetches never fault): ~32 mask lines and ~16-32 value
    // lines ahead at 90% sparsity. Session 4, (2048, 8192) 90% M=1 rotated, two threads: beat
    // prefetching the next block by its row ranges (153-154 vs 162-166 us raw).
    _mm_prefetch(reinterpret_cast<const char*>(mk) + 2048, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(cur) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(cur) + 1088, _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) {
      const uint64_t m = mk[r];
      const __m512i v = _mm512_maskz_expand_epi8(m, load_unfolded(cur));
      cur += _mm_popcnt_u64(m);
      for (int i = 0; i < MT; ++i) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], xv[i], v);
    }
  }
  const int64_t n = 8 * j;
  if (n + NR <= c.N) {
    for (int i = 0; i < MT; ++i) s8_store8(c, n, m0 + i, hsum8_epi32(acc[i]));
    return;
  }
  for (int r = 0; n + r < c.N; ++r) {  // the last, partial block: scales / bias end at N
    const int32_t corr = 128 * c.w.rowsum[n + r];
    for (int i = 0; i < MT; ++i) {
      const int32_t s = _mm512_reduce_add_epi32(acc[i][r]) - corr;
      float y = static_cast<float>(s) * (c.sx[m0 + i] * c.scales[n + r]);
      if (c.bias) y = y + c.bias[n + r];
      store_from_f32(c.y, c.dt, (m0 + i) * c.ldy + n + r, y);
    }
  }
}

// ---------------------------------------------------------------- int8 values, nonzero 4-blocks
// x rows in tiles of W (16: zmm, 8: ymm) laid out as x4[kb][W][4]: dword m of line kb holds
// x(m, 4kb .. 4kb+3) (u8 = q + 128). A weight row is reduced to its nonzero 4-column blocks
// (kb, four int8 weights w0..w3 incl. zeros): the row expanded per 64 columns (vpexpandb), the
// nonzero dwords and their line offsets compressed out (vpcompressd). Then every nonzero block
// is one vpdpbusd of line kb with the broadcast dword -> W output rows at once, no horizontal
// sums. Work ~ blocks = K/4 (1 - (1-d)^4) per row and x tile, vs K/4 for dense w8a8.
// kBlkLut[b]: the set bits of byte b as ascending indices 0..7 (8 int32; unused entries 0).
struct BlkLut {
  alignas(32) int32_t idx[256][8];
  BlkLut() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) idx[b][i] = 0;
      for (int i = 0; i < 8; ++i)
        if ((b >> i) & 1) idx[b][k++] = i;
    }
  }
};
const BlkLut& blk_lut() {
  static const BlkLut t;
  return t;
}

// The nonzero 4-column blocks of block j's 8 rows (one walk of its value stream): for row r,
// wl[r][i] = the block's four int8 weights, ol[r][i] = its x4 line offset in bytes (kb << line_shift),
// cnt[r] of them. Per 64 columns, from the mask m alone (scalar BMI2):
//   nz = one bit per nonzero nibble of m (pext of the nibble-OR), mc = m's bits inside those
//   nibbles, compacted (pext by their spread) -> one vpexpandb of the values by mc writes the
//   nonzero blocks back to back; the line offsets come from a 256-entry table per mask byte.
// wl[r], ol[r] need 16 spare entries (full-width stores).
void block_blocks(const Ctx& c, int64_t j, int line_shift, int32_t* const wl[8], int32_t* const ol[8], int64_t cnt[8]) {
  const uint64_t* mk = c.w.masks + j * c.Kw * 8;
  const int8_t* cur = static_cast<const int8_t*>(c.w.values) + c.w.boffsets[j];
  const BlkLut& lut = blk_lut();
  constexpr uint64_t kNib = 0x1111111111111111ull;
  for (int r = 0; r < 8; ++r) cnt[r] = 0;
  for (int64_t b = 0; b < c.Kw; ++b, mk += 8) {
    const __m256i base0 = _mm256_set1_epi32(static_cast<int>(b * 16)), base1 = _mm256_set1_epi32(static_cast<int>(b * 16 + 8));
    for (int r = 0; r < 8; ++r) {
      const uint64_t m = mk[r];
      uint64_t t = m | (m >> 1);
      t |= t >> 2;
      const uint32_t nz = static_cast<uint32_t>(_pext_u64(t, kNib));
      const uint64_t mc = _pext_u64(m, _pdep_u64(nz, kNib) * 0xF);
      _mm512_storeu_si512(wl[r] + cnt[r], _mm512_maskz_expand_epi8(mc, load_unfolded(cur)));
      cur += _mm_popcnt_u64(m);
      const uint32_t lo = nz & 0xff, hi = nz >> 8;
      const __m256i o0 = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[lo])), base0);
      const __m256i o1 = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[hi])), base1);
      const int64_t plo = _mm_popcnt_u32(lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ol[r] + cnt[r]), _mm256_slli_epi32(o0, line_shift));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ol[r] + cnt[r] + plo), _mm256_slli_epi32(o1, line_shift));
      cnt[r] += plo + _mm_popcnt_u32(hi);
    }
  }
}

template <int W>
struct BlkV;
template <>
struct BlkV<16> {
  using T = __m512i;
  static SLMK_INLINE T zero() { return _mm512_setzero_si512(); }
  static SLMK_INLINE T dp(T a, const uint8_t* x, int32_t w) {
    return _mm512_dpbusd_epi32(a, _mm512_load_si512(x), _mm512_set1_epi32(w));
  }
  static SLMK_INLINE T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static SLMK_INLINE void store(int32_t* p, T acc) { _mm512_store_si512(p, acc); }
};
template <>
struct BlkV<8> {
  using T = __m256i;
  static SLMK_INLINE T zero() { return _mm256_setzero_si256(); }
  static SLMK_INLINE T dp(T a, const uint8_t* x, int32_t w) {
    return _mm256_dpbusd_epi32(a, _mm256_load_si256(reinterpret_cast<const __m256i*>(x)), _mm256_set1_epi32(w));
  }
  static SLMK_INLINE T add(T a, T b) { return _mm256_add_epi32(a, b); }
  static SLMK_INLINE void store(int32_t* p, T acc) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), acc); }
};

template <int W>
__attribute__((noinline)) void s8_blk_row(const uint8_t* x4, const int32_t* wl, const int32_t* ol, int64_t cnt,
                                          int32_t* out) {
  using V = BlkV<W>;
  typename V::T a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  int64_t i = 0;
  for (; i + 4 <= cnt; i += 4) {
    a0 = V::dp(a0, x4 + ol[i], wl[i]);
    a1 = V::dp(a1, x4 + ol[i + 1], wl[i + 1]);
    a2 = V::dp(a2, x4 + ol[i + 2], wl[i + 2]);
    a3 = V::dp(a3, x4 + ol[i + 3], wl[i + 3]);
  }
  for (; i < cnt; ++i) a0 = V::dp(a0, x4 + ol[i], wl[i]);
  V::store(out, V::add(V::add(a0, a1), V::add(a2, a3)));
}

template <int ES>
void block_indices(const Ctx& c, int64_t j, int32_t* const idx[8], uint8_t* const vals[8], int64_t cnt[8]);

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
// Block j (8 weight rows) x MT x rows from m0: per word, each row's four 16-column quarters are
// expanded in turn (the value cursor walks the block's stream in order) and fma'd with x.
template <int MT>
__attribute__((noinline)) void f32_block8(const Ctx& c, int64_t j, int64_t m0) {
  constexpr int NR = 8;
  __m512 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
  const uint64_t* mk = c.w.masks + j * c.Kw * 8;
  const float* cur = static_cast<const float*>(c.w.values) + c.w.boffsets[j];
  const float* xf = c.xf + m0 * c.ldq;
  for (int64_t b = 0; b < c.Kw; ++b, mk += 8) {
    __m512 xv[4][MT];
    for (int q = 0; q < 4; ++q)
      for (int i = 0; i < MT; ++i) xv[q][i] = _mm512_loadu_ps(xf + i * c.ldq + b * 64 + 16 * q);
    for (int r = 0; r < NR; ++r) {
      const uint64_t m = mk[r];
      for (int q = 0; q < 4; ++q) {
        const __mmask16 h = static_cast<__mmask16>(m >> (16 * q));
        const __m512 v = _mm512_maskz_expand_ps(h, _mm512_castsi512_ps(load_unfolded(cur)));
        cur += _mm_popcnt_u32(h);
        for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_fmadd_ps(v, xv[q][i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t n = 8 * j + r;
    if (n >= c.N) break;
    for (int i = 0; i < MT; ++i) {
      float y = _mm512_reduce_add_ps(acc[r][i]);
      if (c.bias) y = y + c.bias[n];
      store_from_f32(c.y, c.dt, (m0 + i) * c.ldy + n, y);
    }
  }
}

// ---------------------------------------------------------------- float values, nonzero broadcast
// xT: [tiles][Kw*64][64] fp32, tile t holds x rows 64t .. 64t+63 (zeros beyond M).
template <int J>
__attribute__((noinline)) void f32_nz_row(const Ctx& c, const float* xT, int64_t n, int64_t m0, int64_t rows,
                                          const int32_t* idx, const float* v, int64_t cnt) {
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

// The nonzero columns of block j's 8 rows, in order, and their values (ES bytes each), from one
// walk of the block's stream: idx[r][i] / vals[r] (cnt[r] of each) for row r. Columns: vpcompressd
// of the column numbers per 16 mask bits (register form + a full store: idx[r] has 16 spare
// entries). Values: unmasked 64-byte moves (vals[r] has 64 spare bytes; a move's tail is
// overwritten by the row's next one). No data-dependent branches but the move count.
template <int ES>
void block_indices(const Ctx& c, int64_t j, int32_t* const idx[8], uint8_t* const vals[8], int64_t cnt[8]) {
  const uint64_t* mk = c.w.masks + j * c.Kw * 8;
  const uint8_t* cur = static_cast<const uint8_t*>(c.w.values) + c.w.boffsets[j] * ES;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int r = 0; r < 8; ++r) cnt[r] = 0;
  for (int64_t b = 0; b < c.Kw; ++b, mk += 8)
    for (int r = 0; r < 8; ++r) {
      const uint64_t m = mk[r];
      const int64_t bytes = static_cast<int64_t>(_mm_popcnt_u64(m)) * ES;
      for (int64_t o = 0; o < bytes; o += 64)
        _mm512_storeu_si512(vals[r] + cnt[r] * ES + o, _mm512_loadu_si512(cur + o));
      cur += bytes;
      for (int q = 0; q < 4; ++q) {
        const __mmask16 h = static_cast<__mmask16>(m >> (16 * q));
        const __m512i col = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(b * 64 + 16 * q)));
        _mm512_storeu_si512(idx[r] + cnt[r], _mm512_maskz_compress_epi32(h, col));
        cnt[r] += _mm_popcnt_u32(h);
      }
    }
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
// int8 values: the four paths' relative costs per 64-column mask word of the weight (N * Kw words;
// x 131 = us at (K, N) = (2048, 8192) on two threads), fitted on Zen 4 at K = 2048 (session 4, the
// interleaved layout: forced paths, sparsity 50-95%, M = 2-64, two threads, rotated weights; the
// per-row terms e / Kw from K = 384, session 3), d = nnz / (N K), M x rows:
//   1 expand      0.2 + 5 d + 0.6 M                       (one vpexpandb per word per 1-4 x rows)
//   2 broadcast   M <= 16: 6.5 + 36 d + 20 / Kw; else ceil(M/64) (12 + 52 d + 86 / Kw)
//   3 dense       5.5 + 6 d + 0.3 M                       (expansion + the w8a8 GEMM)
//   4 4-blocks    2.2 + 0.5 f + T (11.5 f + 20 / Kw), f = 1 - (1-d)^4 (nonzero 4-blocks),
//                                                          T = 1 (M <= 8) or ceil(M/16) x tiles
int s8_pick_path(int64_t M, double d, int64_t Kw) {
  const double m = static_cast<double>(M), f = 1.0 - std::pow(1.0 - d, 4), kw = static_cast<double>(Kw);
  const double c1 = 0.2 + 5.0 * d + 0.6 * m;
  const double c2 = M <= 16 ? 6.5 + 36.0 * d + 20.0 / kw
                            : static_cast<double>(ceil_div(M, 64)) * (12.0 + 52.0 * d + 86.0 / kw);
  const double c3 = 5.5 + 6.0 * d + 0.3 * m;
  const double T = M <= 8 ? 1.0 : static_cast<double>(ceil_div(M, 16));
  const double c4 = 2.2 + 0.5 * f + T * (11.5 * f + 20.0 / kw);
  int best = 1;
  double cb = c1;
  if (c2 < cb) { best = 2; cb = c2; }
  if (c3 < cb) { best = 3; cb = c3; }
  if (c4 < cb) { best = 4; cb = c4; }
  return best;
}

// 0: choose by cost; int8 values: 1 expand, 2 nonzero broadcast, 3 dense (expand + w8a8), 4 nonzero
// 4-blocks; float values: 2 broadcast, anything else expand (tests and tuning: sparse_force_path)
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
    sparse_for_row_chunks(a, c.w.boffsets, Kw * 32, [&](int64_t n0, int64_t n1) {
      for (int64_t j = n0 / 8; 8 * j < n1; ++j) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) f32_block8<2>(c, j, m);
        if (m < M) f32_block8<1>(c, j, m);
      }
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
  sparse_for_row_chunks(a, c.w.boffsets, Kw * 16, [&](int64_t n0, int64_t n1) {
    RowLists L(Kp + 16, Kp * 4 + 64);  // per row: column list, fp32 values
    for (int64_t n = n0; n < n1; ++n) {
      if (n % 8 == 0) block_indices<4>(c, n / 8, L.p, L.v, L.cnt);
      const int32_t* idx = L.p[n % 8];
      const float* v = reinterpret_cast<const float*>(L.v[n % 8]);
      const int64_t cnt = L.cnt[n % 8];
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * 64, rows = std::min<int64_t>(64, M - m0);
        const float* T = xT + t * Kp * 64;
        switch ((rows + 15) / 16) {
          case 1: f32_nz_row<1>(c, T, n, m0, rows, idx, v, cnt); break;
          case 2: f32_nz_row<2>(c, T, n, m0, rows, idx, v, cnt); break;
          case 3: f32_nz_row<3>(c, T, n, m0, rows, idx, v, cnt); break;
          default: f32_nz_row<4>(c, T, n, m0, rows, idx, v, cnt); break;
        }
      }
    }
  });
  for (int64_t m : bad)
    sparse_for_row_chunks(a, c.w.boffsets, Kw * 32, [&](int64_t n0, int64_t n1) {
      for (int64_t j = n0 / 8; 8 * j < n1; ++j) f32_block8<1>(c, j, m);
    });
}

// ---------------------------------------------------------------- int8 values, many x rows
// Large M is compute-bound on the MACs: groups of weight rows are expanded (vpexpandb) into the
// dense int8 tile layout (common.h) and run by w8a8_linear_avx512vnni, the tuned dense kernel,
// whose math is the same (quantize_rows_s8, int32 accumulate, the same epilogue): bit-exact by
// construction. The expansion costs ~1/M of the GEMM.
thread_local ScratchBuf tl_sparse_dense;

// 16 zmm rows r[i] (dword j = 4 columns) -> out[j] = dword j of every row (16x16 dword transpose).
SLMK_INLINE void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + s]: 128-bit lane L holds dwords 4L..4L+3 of rows 4q..4q+3 for column-dword 4L' + s ...
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Weight rows [n0, n0 + rows) into the int8 packed layout of a rows x K weight. n0 is a multiple
// of 16 and rows one too unless the group ends at N, so each 16-row tile is two whole blocks (rows
// past N have zero masks; a block past the last one is not read).
void expand_to_int8_tiles(const Ctx& c, int64_t n0, int64_t rows, int64_t K, int n_threads, int8_t* out) {
  const int64_t Kp4 = int8_padded_k(K), ksteps = Kp4 / kInt8KB, Np16 = int8_padded_n(rows);
  const int8_t* vals = static_cast<const int8_t*>(c.w.values);
  const int64_t Nb = sparse_blocks(c.N);
  int32_t* colsum = reinterpret_cast<int32_t*>(out + Np16 * Kp4);
  constexpr int64_t kChunkW = 16;  // words per chunk: the 16-row staging is 16 KB (L1)
  parallel_for(Np16 / kInt8NB, n_threads, [&](int64_t nb) {
    int8_t* tile = out + nb * kInt8NB * Kp4;
    alignas(64) uint8_t stage[kInt8NB][kChunkW * 64];
    for (int64_t i = 0; i < kInt8NB; ++i) {
      const int64_t r = nb * kInt8NB + i;
      colsum[r] = r < rows ? c.w.rowsum[n0 + r] : 0;
    }
    const int64_t j0 = (n0 + nb * kInt8NB) / 8;
    const int nblk = j0 + 1 < Nb ? 2 : 1;  // j0 < Nb always: the tile holds a row < N
    const int8_t* cur[2] = {vals + c.w.boffsets[j0], vals + c.w.boffsets[j0 + nblk - 1]};
    if (nblk == 1) std::memset(stage[8], 0, 8 * sizeof(stage[8]));
    for (int64_t b0 = 0; b0 < c.Kw; b0 += kChunkW) {
      const int64_t nw = std::min(kChunkW, c.Kw - b0);
      for (int h = 0; h < nblk; ++h) {
        const uint64_t* mk = c.w.masks + ((j0 + h) * c.Kw + b0) * 8;
        const int8_t* p = cur[h];
        for (int64_t w = 0; w < nw; ++w, mk += 8) {
          _mm_prefetch(reinterpret_cast<const char*>(mk) + 512, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p) + 512, _MM_HINT_T0);
          for (int r = 0; r < 8; ++r) {
            const uint64_t m = mk[r];
            _mm512_store_si512(stage[8 * h + r] + w * 64, _mm512_maskz_expand_epi8(m, load_unfolded(p)));
            p += _mm_popcnt_u64(m);
          }
        }
        cur[h] = p;
      }
      for (int64_t w = 0; w < nw; ++w) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(stage[i] + w * 64);
        transpose16x16_epi32(r);
        const int64_t kb0 = (b0 + w) * 16, n_kb = std::min<int64_t>(16, ksteps - kb0);
        int8_t* dst = tile + kb0 * kInt8NB * kInt8KB;
        for (int64_t j = 0; j < n_kb; ++j) _mm512_storeu_si512(dst + j * 64, r[j]);
      }
    }
  });
}

void s8_dense(const SparseLinearArgs& a, const Ctx& c) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp4 = int8_padded_k(K);
  // rows per group: the expanded weight (~2 MB) stays in the last-level cache between its
  // expansion and the GEMM (a group written out to DRAM costs more than the expansion itself);
  // w8a8 quantizes x once per group, ~1/group of its MACs.
  const int64_t group = std::max<int64_t>(256, ((int64_t{2} << 20) / Kp4) / 16 * 16);
  const int64_t esz = a.dtype == DType::f32 ? 4 : 2;
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    const int64_t rows = std::min(group, N - n0);
    int8_t* wt = reinterpret_cast<int8_t*>(tl_sparse_dense.get(static_cast<size_t>(int8_packed_bytes(rows, K))));
    expand_to_int8_tiles(c, n0, rows, K, a.n_threads, wt);
    Int8LinearArgs d;
    d.x = a.x; d.dtype = a.dtype; d.M = M; d.K = K; d.N = rows; d.ldx = a.ldx;
    d.w_packed = wt;
    d.w_scale = a.scales + n0;
    d.bias = a.bias ? a.bias + n0 : nullptr;
    d.y = static_cast<uint8_t*>(a.y) + n0 * esz;
    d.ldy = a.ldy;
    d.n_threads = a.n_threads;
    w8a8_linear_avx512vnni(d);
  }
}

// Outputs of weight rows n .. n+nr-1 (nr <= 16) for x rows m0 .. m0+mrows-1: acc[r][i] is row
// n+r, x row m0+i. Transposed (16x16 dwords) so each x row's 16 outputs are one vector: the
// scalar epilogue's three fp32 roundings lane by lane, then one (masked) store per x row.
void s8_blk_epilogue(const Ctx& c, int32_t (*acc)[16], int64_t n, int64_t nr, int64_t m0, int64_t mrows) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(acc[i]);
  transpose16x16_epi32(r);
  const __mmask16 k = static_cast<__mmask16>((1u << nr) - 1);
  const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(k, c.w.rowsum + n), 7);
  const __m512 ws = _mm512_maskz_loadu_ps(k, c.scales + n);
  const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(k, c.bias + n) : _mm512_setzero_ps();
  for (int64_t i = 0; i < mrows; ++i) {
    const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(c.sx[m0 + i]), ws);
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(r[i], corr)), sc);
    if (c.bias) y = _mm512_add_ps(y, bias);
    if (c.dt == DType::f32) {
      _mm512_mask_storeu_ps(static_cast<float*>(c.y) + (m0 + i) * c.ldy + n, k, y);
    } else {
      alignas(64) float t[16];
      _mm512_store_ps(t, y);
      for (int64_t j = 0; j < nr; ++j) store_from_f32(c.y, c.dt, (m0 + i) * c.ldy + n + j, t[j]);
    }
  }
}

void s8_blocks(const SparseLinearArgs& a, const Ctx& c) {
  const int64_t M = a.M, Kw = c.Kw, KB = Kw * 16;  // 4-column lines over the padded row
  const int64_t W = M <= 8 ? 8 : 16, tiles = ceil_div(M, W), line = W * 4;
  uint8_t* x4 = tl_sparse_xt.get(static_cast<size_t>(tiles * KB * line + 64));
  // x4[t][kb][m][4] = xq row (tW + m), dword kb; rows past M hold u8 128 (q = 0)
  for (int64_t t = 0; t < tiles; ++t) {
    uint32_t* T = reinterpret_cast<uint32_t*>(x4 + t * KB * line);
    for (int64_t m = 0; m < W; ++m) {
      const int64_t r = t * W + m;
      if (r < M) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(c.xq + r * c.ldq);
        for (int64_t kb = 0; kb < KB; ++kb) T[kb * W + m] = src[kb];
      } else {
        for (int64_t kb = 0; kb < KB; ++kb) T[kb * W + m] = 0x80808080u;
      }
    }
  }
  sparse_for_row_chunks(a, c.w.boffsets, Kw * 16, [&](int64_t n0, int64_t n1) {
    RowLists L(KB + 16, 0);  // per row: its nonzero 4-blocks' weights (p) and x4 line offsets (q)
    // int32 outputs of 16 weight rows for every x tile: [tile][16 rows][16 lanes]
    std::vector<int32_t> accv(static_cast<size_t>(tiles * 256 + 16));
    int32_t(*acc)[16] = reinterpret_cast<int32_t(*)[16]>((reinterpret_cast<uintptr_t>(accv.data()) + 63) & ~uintptr_t(63));
    for (int64_t g = n0; g < n1; g += 16) {
      const int64_t nr = std::min<int64_t>(16, n1 - g);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t n = g + r, i = n % 8;
        if (i == 0) block_blocks(c, n / 8, W == 8 ? 5 : 6, L.p, L.q, L.cnt);
        for (int64_t t = 0; t < tiles; ++t) {
          const uint8_t* T = x4 + t * KB * line;
          if (W == 8) s8_blk_row<8>(T, L.p[i], L.q[i], L.cnt[i], acc[t * 16 + r]);
          else s8_blk_row<16>(T, L.p[i], L.q[i], L.cnt[i], acc[t * 16 + r]);
        }
      }
      for (int64_t t = 0; t < tiles; ++t)
        s8_blk_epilogue(c, acc + t * 16, g, nr, t * W, std::min<int64_t>(W, M - t * W));
    }
  });
}

void s8_linear(const SparseLinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kw = sparse_words(K), Kp = Kw * 64;
  Ctx c{};
  c.w = sparse_view(a.w_packed, N, K, a.kind);
  c.Kw = Kw; c.N = N; c.ldq = Kp; c.scales = a.scales; c.bias = a.bias; c.y = a.y; c.ldy = a.ldy;
  c.dt = a.dtype;
  const int force = g_force_path.load(std::memory_order_relaxed);
  const double d = static_cast<double>(a.nnz) / (static_cast<double>(N) * static_cast<double>(K));
  const int path = force ? force : s8_pick_path(M, d, Kw);
  if (path == 3) {
    s8_dense(a, c);
    return;
  }
  uint8_t* buf = tl_sparse_scratch.get(static_cast<size_t>(M * Kp + M * 4 + 128));
  uint8_t* xq = buf;
  float* sx = reinterpret_cast<float*>(buf + (M * Kp + 63) / 64 * 64);
  // quantize_rows_u8_avx512 fills up to ceil(K/4)*4; the rest of each row only ever meets
  // zero weights, but must be initialised memory.
  quantize_rows_u8_avx512(a.x, a.dtype, M, K, a.ldx, xq, Kp, sx);
  const int64_t Kp4 = int8_padded_k(K);
  for (int64_t m = 0; m < M; ++m) std::memset(xq + m * Kp + Kp4, 128, static_cast<size_t>(Kp - Kp4));
  c.xq = xq; c.sx = sx;
  if (path == 4) {
    s8_blocks(a, c);
    return;
  }
  const bool narrow = M <= 16;
  const int64_t TW = narrow ? 16 : 64, tiles = ceil_div(M, TW);
  if (path == 1) {
    sparse_for_row_chunks(a, c.w.boffsets, Kw * 64, [&](int64_t n0, int64_t n1) {
      for (int64_t j = n0 / 8; 8 * j < n1; ++j) {
        if (M == 1) {
          s8_block8<1>(c, j, 0);
        } else if (M == 2) {
          s8_block8<2>(c, j, 0);
        } else {  // 4 rows x 4 x rows per pass: the expands of a word serve 4 x rows
          s8_half<0>(c, j, M);
          if (8 * j + 4 < c.N) s8_half<4>(c, j, M);
        }
      }
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
  sparse_for_row_chunks(a, c.w.boffsets, 32, [&](int64_t n0, int64_t n1) {
    RowLists L(Kp + 16, Kp + 64);  // per row: column list, int8 values (read as int32 groups of 4)
    for (int64_t n = n0; n < n1; ++n) {
      if (n % 8 == 0) block_indices<1>(c, n / 8, L.p, L.v, L.cnt);
      int32_t* idx = L.p[n % 8];
      int8_t* wb = reinterpret_cast<int8_t*>(L.v[n % 8]);
      const int64_t cnt = L.cnt[n % 8], groups = (cnt + 3) / 4;
      for (int64_t i = cnt; i < groups * 4; ++i) {  // pad to whole groups: column 0, weight 0
        idx[i] = 0;
        wb[i] = 0;
      }
      const int32_t* w4 = reinterpret_cast<const int32_t*>(wb);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * TW, rows = std::min<int64_t>(TW, M - m0);
        const uint8_t* T = xT + t * K * TW;
        if (narrow) s8_nz_row<X>(c, T, n, m0, rows, idx, w4, groups);
        else s8_nz_row<Z>(c, T, n, m0, rows, idx, w4, groups);
      }
    }
  });
}

}  // namespace

void sparse_force_path(int path) { g_force_path.store(path < 0 || path > 4 ? 0 : path); }

void sparse_linear_avx512vnni(const SparseLinearArgs& a) {
  if (a.M <= 0) return;
  if (a.kind == SparseValues::s8) s8_linear(a);
  else f32_linear(a);
}

}  // namespace slmkern
