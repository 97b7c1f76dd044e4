// 2:4 linear with int8 values on AVX-512 VNNI + VBMI: w8a8 math, bit-exact with
// sparse24_i8_linear_ref (and so with w8a8_linear on the decompressed weight).
//
// Activations are quantized per row (quantize_rows_s8's spec) to u8 = q + 128. Per 64 kept
// values of a row, its 16 meta bytes become 64 byte indices: vpmovzxwq spreads 8 kept values'
// 16 bits over each qword, vpmultishiftqb pulls out bits 2j..2j+7 for byte j, and 3, + the
// group bases 16q + 4(j/2). vpermt2b gathers the 64 matching activation bytes out of the
// 128-column window (two registers) and vpdpbusd multiplies them with the 64 int8 values.
// The +128 shift comes back out through the packed per-row sums of kept values.
#include <immintrin.h>

#include <algorithm>

#include "slmkern/sparse24.h"
#include "slmkern/threadpool.h"
#include "w8a8_quant_avx512.h"

namespace slmkern {
namespace {

thread_local ScratchBuf t_qa;

template <int MR>
inline void tile_kernel(const uint8_t* tile, int64_t C, const uint8_t* qa, int64_t Kp, int32_t out[4][4]) {
  constexpr int64_t bb = kS24TileN * kS24ChunkV + kS24TileN * kS24ChunkMeta;
  const __m512i ctrl = _mm512_set1_epi64(0x0E0C0A0806040200LL);
  const __m512i three = _mm512_set1_epi8(3);
  alignas(64) static const uint8_t kBase[64] = {
      0,   0,   4,   4,   8,   8,   12,  12,  16,  16,  20,  20,  24,  24,  28,  28,
      32,  32,  36,  36,  40,  40,  44,  44,  48,  48,  52,  52,  56,  56,  60,  60,
      64,  64,  68,  68,  72,  72,  76,  76,  80,  80,  84,  84,  88,  88,  92,  92,
      96,  96,  100, 100, 104, 104, 108, 108, 112, 112, 116, 116, 120, 120, 124, 124};
  const __m512i base = _mm512_load_si512(kBase);
  __m512i acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_si512();
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t* blk = tile + c * bb;
    const uint8_t* meta = blk + kS24TileN * kS24ChunkV;
    for (int64_t l = 0; l < bb; l += 64)  // every line of the block 16 blocks (5 KB) ahead
      _mm_prefetch(reinterpret_cast<const char*>(blk + 16 * bb + l), _MM_HINT_T0);
    __m512i idx[4], w[4];
    for (int r = 0; r < 4; ++r) {
      const __m512i mq = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 16 * r)));
      // base bytes have bits 0-1 clear: (t & 3) + base == (t & 3) | base, one vpternlogd
      idx[r] = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, mq), three, base, 0xEA);
      w[r] = _mm512_loadu_si512(blk + 64 * r);
    }
    for (int m = 0; m < MR; ++m) {
      const uint8_t* xw = qa + m * Kp + c * kS24ChunkK;
      const __m512i xa = _mm512_loadu_si512(xw), xb = _mm512_loadu_si512(xw + 64);
      for (int r = 0; r < 4; ++r)
        acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], _mm512_permutex2var_epi8(xa, idx[r], xb), w[r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = _mm512_reduce_add_epi32(acc[m][r]);
}

// ---- M >= kDenseM: the weight is compute-bound there, so groups of rows are expanded (vpexpandb)
// into the dense int8 tile layout (common.h) and run by w8a8_linear_avx512vnni, the tuned dense
// kernel, whose math is the same: bit-exact by construction.
constexpr int64_t kDenseM = 48;  // measured crossover vs the gather kernel (Zen 4)
constexpr int64_t kGroupRows = 1024;  // rows expanded per w8a8 call (~2 MB at K = 2048)
thread_local ScratchBuf t_wd;

struct MaskTable {
  uint8_t m[256];  // meta byte -> dense-column mask of its two groups (8 bits)
  MaskTable() {
    for (int b = 0; b < 256; ++b)
      m[b] = static_cast<uint8_t>((1 << (b & 3)) | (1 << ((b >> 2) & 3)) | (16 << ((b >> 4) & 3)) |
                                  (16 << ((b >> 6) & 3)));
  }
};
const MaskTable& mask_table() {
  static const MaskTable t;
  return t;
}

// Rows [n0, n0 + rows) (n0 a multiple of 16) into the int8 packed layout of a rows x K weight.
void expand_to_int8_tiles(const uint8_t* w, const int32_t* rowsum, int64_t n0, int64_t rows, int64_t N, int64_t K,
                          int n_threads, int8_t* out) {
  constexpr int64_t bb = kS24TileN * kS24ChunkV + kS24TileN * kS24ChunkMeta;
  const int64_t C = s24_padded_k(K) / kS24ChunkK, Kp4 = int8_padded_k(K), ksteps = Kp4 / kInt8KB;
  const int64_t Np16 = int8_padded_n(rows);
  const uint8_t* lut = mask_table().m;
  int32_t* colsum = reinterpret_cast<int32_t*>(out + Np16 * Kp4);
  const __m512i rowidx = _mm512_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 480);
  parallel_for(Np16 / kInt8NB, n_threads, [&](int64_t nb) {
    int8_t* tile = out + nb * kInt8NB * Kp4;
    alignas(64) uint8_t rows16[kInt8NB][kS24ChunkK];  // one chunk of 16 expanded rows
    for (int64_t i = 0; i < kInt8NB; ++i) {
      const int64_t n = n0 + nb * kInt8NB + i;
      colsum[nb * kInt8NB + i] = n < N ? rowsum[n] : 0;
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < kInt8NB; ++i) {
        const int64_t n = n0 + nb * kInt8NB + i;
        if (n >= N) {
          std::memset(rows16[i], 0, kS24ChunkK);
          continue;
        }
        const uint8_t* blk = w + ((n / kS24TileN) * C + c) * bb;
        const uint8_t* mb = blk + kS24TileN * kS24ChunkV + (n % kS24TileN) * kS24ChunkMeta;
        const uint8_t* v = blk + (n % kS24TileN) * kS24ChunkV;
        uint64_t m0 = 0, m1 = 0;
        for (int b = 0; b < 8; ++b) {
          m0 |= static_cast<uint64_t>(lut[mb[b]]) << (8 * b);
          m1 |= static_cast<uint64_t>(lut[mb[8 + b]]) << (8 * b);
        }
        // kept values 0..31 fill dense columns 0..63 of the chunk, 32..63 the rest
        const __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
        const __m512i hi = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32)));
        _mm512_store_si512(rows16[i], _mm512_maskz_expand_epi8(m0, lo));
        _mm512_store_si512(rows16[i] + 64, _mm512_maskz_expand_epi8(m1, hi));
      }
      // transpose to tile rows: vector kb holds dword kb of each of the 16 rows
      const int64_t kb0 = c * (kS24ChunkK / kInt8KB), kb1 = std::min(ksteps, kb0 + kS24ChunkK / kInt8KB);
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const __m512i idx = _mm512_add_epi32(rowidx, _mm512_set1_epi32(static_cast<int>(kb - kb0)));
        _mm512_storeu_si512(tile + kb * kInt8NB * kInt8KB, _mm512_i32gather_epi32(idx, rows16, 4));
      }
    }
  });
}

}  // namespace

void sparse24_i8_linear_avx512vbmi(const Sparse24Args& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp = s24_padded_k(K), C = Kp / kS24ChunkK;
  const int64_t T = s24_padded_n(N) / kS24TileN, tb = s24_tile_bytes(K, S24Values::i8);
  const int32_t* rowsum = s24_rowsum(a.w_packed, N, K);
  if (M >= kDenseM) {
    const int64_t esz = a.dtype == DType::f32 ? 4 : 2;
    for (int64_t n0 = 0; n0 < N; n0 += kGroupRows) {
      const int64_t rows = std::min(kGroupRows, N - n0);
      int8_t* wt = reinterpret_cast<int8_t*>(t_wd.get(static_cast<size_t>(int8_packed_bytes(rows, K))));
      expand_to_int8_tiles(a.w_packed, rowsum, n0, rows, N, K, a.n_threads, wt);
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
    return;
  }
  const int64_t lda = Kp;
  uint8_t* qa = t_qa.get(static_cast<size_t>(M * lda + 4 * M + 64));
  float* sx = reinterpret_cast<float*>(qa + ((M * lda + 63) / 64) * 64);
  quantize_rows_u8_avx512(a.x, a.dtype, M, K, a.ldx, qa, lda, sx);
  const int64_t k4 = int8_padded_k(K);
  for (int64_t m = 0; m < M; ++m) std::memset(qa + m * lda + k4, 128, static_cast<size_t>(Kp - k4));
  const int64_t tg = std::max<int64_t>(1, (96 << 10) / tb), n_tasks = ceil_div(T, tg);
  parallel_for(n_tasks, a.n_threads, [&](int64_t task) {
    const int64_t t0 = task * tg, t1 = std::min(T, t0 + tg);
    for (int64_t t = t0; t < t1; ++t) {  // a row tile's weights stay in L1 across the x-row blocks
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
        int32_t out[4][4];
        const uint8_t* tile = a.w_packed + t * tb;
        const uint8_t* x0 = qa + m0 * Kp;
        switch (mr) {
          case 1: tile_kernel<1>(tile, C, x0, Kp, out); break;
          case 2: tile_kernel<2>(tile, C, x0, Kp, out); break;
          case 3: tile_kernel<3>(tile, C, x0, Kp, out); break;
          default: tile_kernel<4>(tile, C, x0, Kp, out); break;
        }
        for (int m = 0; m < mr; ++m)
          for (int r = 0; r < 4; ++r) {
            const int64_t n = t * kS24TileN + r;
            if (n >= N) break;
            const int32_t acc = out[m][r] - 128 * rowsum[n];
            const float s = sx[m0 + m] * a.scales[n];
            float v = static_cast<float>(acc) * s;
            if (a.bias) v = v + a.bias[n];
            store_from_f32(a.y, a.dtype, (m0 + m) * a.ldy + n, v);
          }
      }
    }
  });
}

}  // namespace slmkern
