// sparse_linear with AVX2: decompress each 8-row block of the weight into dense rows (one pass
// over the block's interleaved masks and values, one value cursor), then a dense row-times-x dot
// for every x row. y[M, N] = x[M, K] @ W^T, W in the bitmask packed layout.
//
// Decompression, 8 columns per step, driven by the mask byte b:
//   int8 : pshufb of the 8 bytes at the value cursor by kShuf[b] (the rank of each set bit,
//          0x80 -> zero for clear bits);
//   fp32 : vpermps of the 8 floats at the cursor by kPerm[b], clear lanes zeroed by a mask;
// then cursor += popcnt(b). The packed values end with 64 pad bytes, so loads stay inside.
// int8 dot: both sides in [-127, 127], vpmaddubsw(|x|, sign(w, x)) then vpmaddwd(1) -> exact
// int32 (see w8a8_avx2.cpp), so results are bit-exact with sparse_linear_ref.
// fp32: every column is multiplied (zeros too), so inf/NaN in x propagate like a dense matmul.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "slmkern/bitmask.h"

namespace slmkern {
namespace {

struct Tables {
  alignas(64) uint64_t shuf[256];
  alignas(64) int32_t perm[256][8];
  uint8_t pop[256];  // popcount of a mask byte (the AVX2 level does not promise POPCNT)
  Tables() {
    for (int b = 0; b < 256; ++b) {
      uint64_t s = 0;
      int rank = 0;
      for (int i = 0; i < 8; ++i) {
        const bool set = (b >> i) & 1;
        s |= static_cast<uint64_t>(set ? rank : 0x80) << (8 * i);
        perm[b][i] = set ? rank : 0;
        rank += set;
      }
      shuf[b] = s;
      pop[b] = static_cast<uint8_t>(rank);
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void s8_linear(const SparseLinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kw = sparse_words(K), Kp = Kw * 64;
  const SparsePacked w = sparse_view(a.w_packed, N, K, a.kind);
  // qx and |qx| rows, zero-padded to Kp (the tile is zero there too).
  std::vector<int8_t> qx(static_cast<size_t>(M * Kp), 0);
  std::vector<uint8_t> qabs(static_cast<size_t>(M * Kp), 0);
  std::vector<float> sx(static_cast<size_t>(M));
  quantize_rows_s8_ref(a.x, a.dtype, M, K, a.ldx, qx.data(), Kp, sx.data());
  for (size_t i = 0; i < qx.size(); ++i) qabs[i] = static_cast<uint8_t>(qx[i] < 0 ? -qx[i] : qx[i]);
  const Tables& tb = tables();
  const int8_t* vals = static_cast<const int8_t*>(w.values);
  sparse_for_row_chunks(a, w.boffsets, Kw * 64, [&](int64_t n0, int64_t n1) {
    std::vector<int8_t> tv(static_cast<size_t>(8 * Kp) + 32);  // the block's 8 dense rows
    int8_t* tb8 = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(tv.data()) + 31) & ~uintptr_t(31));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; ++n) {
      if (n % 8 == 0) {  // chunks start at a block
        const uint8_t* mb = reinterpret_cast<const uint8_t*>(w.masks + (n / 8) * Kw * 8);
        const int8_t* cur = vals + w.boffsets[n / 8];
        for (int64_t b = 0; b < Kw; ++b)
          for (int r = 0; r < 8; ++r) {
            uint64_t m;
            std::memcpy(&m, mb + (b * 8 + r) * 8, 8);
            int8_t* dst = tb8 + r * Kp + b * 64;
            for (int g = 0; g < 8; ++g, m >>= 8) {
              const unsigned bm = static_cast<unsigned>(m & 0xff);
              const __m128i v = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cur)),
                                                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tb.shuf + bm)));
              _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + g * 8), v);
              cur += tb.pop[bm];
            }
          }
      }
      const int8_t* t = tb8 + (n % 8) * Kp;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = qx.data() + m * Kp;
        const uint8_t* ar = qabs.data() + m * Kp;
        __m256i c0 = _mm256_setzero_si256(), c1 = _mm256_setzero_si256();
        for (int64_t k = 0; k < Kp; k += 64) {
          const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + k));
          const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + k + 32));
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k + 32));
          const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar + k));
          const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar + k + 32));
          c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(w0, x0)), ones));
          c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(w1, x1)), ones));
        }
        const int32_t acc = hsum_epi32(_mm256_add_epi32(c0, c1));
        const float s = sx[m] * a.scales[n];
        float y = static_cast<float>(acc) * s;
        if (a.bias) y = y + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, y);
      }
    }
  });
}

void f32_linear(const SparseLinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kw = sparse_words(K), Kp = Kw * 64;
  const SparsePacked w = sparse_view(a.w_packed, N, K, a.kind);
  std::vector<float> xf(static_cast<size_t>(M * Kp), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * Kp + k] = load_as_f32(a.x, a.dtype, m * a.ldx + k);
  const Tables& tb = tables();
  const float* vals = static_cast<const float*>(w.values);
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  // A block's 8 rows are decompressed kCW words (64 kCW columns) at a time: the 8 x 64 kCW fp32
  // staging (16 KB) stays in L1 next to x; each (row, x row) keeps its two fma chains across
  // chunks, so the sum runs over k in the same order as a whole-row dot.
  constexpr int64_t kCW = 8;
  sparse_for_row_chunks(a, w.boffsets, Kw * 128, [&](int64_t n0, int64_t n1) {
    std::vector<float> tv(static_cast<size_t>(8 * kCW * 64) + 16);
    float* tb8 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tv.data()) + 31) & ~uintptr_t(31));
    std::vector<float> accf(static_cast<size_t>(16 * M * 8 + 8));  // [row r][x row m][2] x 8 lanes
    float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(accf.data()) + 31) & ~uintptr_t(31));
    for (int64_t j = n0 / 8; 8 * j < n1; ++j) {
      const uint8_t* mb = reinterpret_cast<const uint8_t*>(w.masks + j * Kw * 8);
      const float* cur = vals + w.boffsets[j];
      const int rows = static_cast<int>(std::min<int64_t>(8, n1 - 8 * j));
      std::fill(acc, acc + 16 * M * 8, 0.f);
      for (int64_t b0 = 0; b0 < Kw; b0 += kCW) {
        const int64_t nw = std::min(kCW, Kw - b0);
        for (int64_t b = 0; b < nw; ++b)
          for (int r = 0; r < 8; ++r) {
            uint64_t m;
            std::memcpy(&m, mb + ((b0 + b) * 8 + r) * 8, 8);
            for (int64_t g = 0; g < 8; ++g, m >>= 8) {
              const unsigned bm = static_cast<unsigned>(m & 0xff);
              const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tb.perm[bm]));
              const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bm), bits), bits);
              const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(cur), idx);
              _mm256_store_ps(tb8 + r * kCW * 64 + b * 64 + g * 8, _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
              cur += tb.pop[bm];
            }
          }
        for (int r = 0; r < rows; ++r) {
          const float* t = tb8 + r * kCW * 64;
          for (int64_t m = 0; m < M; ++m) {
            const float* xr = xf.data() + m * Kp + b0 * 64;
            float* ac = acc + (r * M + m) * 16;
            __m256 c0 = _mm256_load_ps(ac), c1 = _mm256_load_ps(ac + 8);
            for (int64_t k = 0; k < nw * 64; k += 16) {
              c0 = _mm256_fmadd_ps(_mm256_load_ps(t + k), _mm256_loadu_ps(xr + k), c0);
              c1 = _mm256_fmadd_ps(_mm256_load_ps(t + k + 8), _mm256_loadu_ps(xr + k + 8), c1);
            }
            _mm256_store_ps(ac, c0);
            _mm256_store_ps(ac + 8, c1);
          }
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int64_t m = 0; m < M; ++m) {
          const int64_t n = 8 * j + r;
          const float* ac = acc + (r * M + m) * 16;
          float y = hsum_ps(_mm256_add_ps(_mm256_load_ps(ac), _mm256_load_ps(ac + 8)));
          if (a.bias) y = y + a.bias[n];
          store_from_f32(a.y, a.dtype, m * a.ldy + n, y);
        }
    }
  });
}

}  // namespace

void sparse_linear_avx2(const SparseLinearArgs& a) {
  if (a.M <= 0) return;
  if (a.kind == SparseValues::s8) s8_linear(a);
  else f32_linear(a);
}

}  // namespace slmkern
