// 2:4 semi-structured linear: y[M, N] = x[M, K] @ W^T (+ bias), W 2:4 sparse.
// Canonical format and its bit layout: slmkern/formats/sparse24.py.
//
// CPU packed layouts (built by sparse24_pack, ISA-independent so set_isa may change after
// packing; private to the CPU kernels, never saved).
//
// Float values (f32/bf16/f16), version 1:
//   Np = ceil(N/4)*4, Kp = ceil(K/128)*128, C = Kp/128 chunks of 128 dense columns
//   block(t, c) for row tile t < Np/4 (rows 4t..4t+3), chunk c < C, stored t-major, c-minor:
//     values[4][64]  kept values 64c..64c+63 of each of the 4 rows, value dtype, zero padded
//     meta  [4][16]  the matching canonical meta bytes 16c..16c+15 of each row, zero padded
//   Kept value i of a chunk row has its in-group column at bits 2i..2i+1 of the row's 16 meta
//   bytes read little-endian, i.e. dense column 4*(i/2) + c.
//
// int8 values, version 2 (16 rows in the 16 dword lanes of a zmm, like the dense int8 tiles):
//   Np = ceil(N/16)*16, Kp = ceil(K/32)*32, S = Kp/32 blocks of 32 dense columns
//   = 4 windows of 8 dense columns (two groups, one canonical meta byte, 4 kept values)
//   block(t, s) for row tile t < Np/16 (rows 16t..16t+15), s < S, 320 bytes, stored t-major:
//     values[4][16][4] int8  byte 64w + 4r + j: kept value j (0..3) of window w of row r,
//                            i.e. canonical value 16s + 4w + j of row 16t + r
//     meta[8][4][2]   uint8  byte 256 + 8(r/2) + 2w + (r%2): canonical meta byte 4s + w of row r
//                            (so each qword holds the meta of two rows for all 4 windows)
//   rowsum int32 [Np]  sum of each row's kept values (for the +128 shift of u8 activations)
//   The dense column (in its window) of kept value j is 4*(j/2) + ((meta >> 2j) & 3): a byte
//   index into 8 broadcast activation bytes (vpshufb), so one vpdpbusd does 16 rows x 4 kept.
//
// A row tile is one sequential stream in both layouts, so an M=1 call reads exactly the
// compressed bytes, in order. Padding (rows >= N, columns >= K) has value 0 and meta 0; the
// kernels feed finite activations for x columns >= K.
#pragma once
#include <cstdint>

#include "slmkern/common.h"
#include "slmkern/dispatch.h"

namespace slmkern {

constexpr int64_t kS24TileN = 4;     // rows per tile
constexpr int64_t kS24ChunkK = 128;  // dense columns per chunk (64 kept values)
constexpr int64_t kS24ChunkV = 64;   // kept values per chunk row
constexpr int64_t kS24ChunkMeta = 16;

// Value dtype of the packed weight.
enum class S24Values : int { f32 = 0, bf16 = 1, f16 = 2, i8 = 3 };

static inline int64_t s24_value_size(S24Values v) {
  return v == S24Values::f32 ? 4 : (v == S24Values::i8 ? 1 : 2);
}
static inline int64_t s24_padded_n(int64_t N) { return ceil_div(N, kS24TileN) * kS24TileN; }
static inline int64_t s24_padded_k(int64_t K) { return ceil_div(K, kS24ChunkK) * kS24ChunkK; }
static inline int64_t s24_block_bytes(S24Values v) {
  return kS24TileN * kS24ChunkV * s24_value_size(v) + kS24TileN * kS24ChunkMeta;
}
static inline int64_t s24_tile_bytes(int64_t K, S24Values v) {
  return (s24_padded_k(K) / kS24ChunkK) * s24_block_bytes(v);
}
// int8 layout (version 2)
constexpr int64_t kS24I8TileN = 16;   // rows per tile
constexpr int64_t kS24I8BlockK = 32;  // dense columns per block (4 windows of 8)
constexpr int64_t kS24I8Block = 320;  // bytes per block: 256 values + 64 meta
static inline int64_t s24i8_padded_n(int64_t N) { return ceil_div(N, kS24I8TileN) * kS24I8TileN; }
static inline int64_t s24i8_padded_k(int64_t K) { return ceil_div(K, kS24I8BlockK) * kS24I8BlockK; }
static inline int64_t s24i8_tile_bytes(int64_t K) { return (s24i8_padded_k(K) / kS24I8BlockK) * kS24I8Block; }

static inline int64_t s24_packed_bytes(int64_t N, int64_t K, S24Values v) {
  if (v == S24Values::i8) return (s24i8_padded_n(N) / kS24I8TileN) * s24i8_tile_bytes(K) + 4 * s24i8_padded_n(N);
  return (s24_padded_n(N) / kS24TileN) * s24_tile_bytes(K, v);
}
static inline const int32_t* s24_rowsum(const uint8_t* packed, int64_t N, int64_t K) {
  return reinterpret_cast<const int32_t*>(packed + (s24i8_padded_n(N) / kS24I8TileN) * s24i8_tile_bytes(K));
}

struct Sparse24Args {
  const void* x;            // [M, K], row stride ldx elements
  DType dtype;              // dtype of x and y
  int64_t M, K, N;
  int64_t ldx;
  const uint8_t* w_packed;  // packed layout above
  S24Values values;         // value dtype of w_packed
  const float* scales;      // [N] (int8 values) or nullptr
  const float* bias;        // [N] fp32 or nullptr
  void* y;                  // [M, N], row stride ldy elements
  int64_t ldy;
  int n_threads;
};

using Sparse24Fn = void (*)(const Sparse24Args&);

// Canonical values [N, K/2] (value dtype v) and meta [N, ceil(K/8)], both contiguous -> packed.
void sparse24_pack(const void* values, const uint8_t* meta, int64_t N, int64_t K, S24Values v, uint8_t* out);

// Float values (f32/bf16/f16): y = x.float() @ W.T + bias, fp32 accumulation. A row of x with a
// NaN or inf is recomputed densely (every k, zeros included) so it propagates like F.linear.
void sparse24_f_linear_ref(const Sparse24Args& a);
void sparse24_f_linear_avx2(const Sparse24Args& a);
void sparse24_f_linear_avx512(const Sparse24Args& a);
// int8 values: w8a8 math (quantize_rows_s8_ref, exact int32, y = float(acc) * (sx * s) + b).
void sparse24_i8_linear_ref(const Sparse24Args& a);
void sparse24_i8_linear_avx2(const Sparse24Args& a);
void sparse24_i8_linear_avx512vbmi(const Sparse24Args& a);  // needs VNNI + VBMI

// The dense-emulation of one x row with a non-finite entry (shared by every float variant):
// y[n] = sum over all k of x[k] * W[n, k] (+ bias) in fp32, W read from the packed layout.
void sparse24_f_dense_row(const Sparse24Args& a, const float* xrow, int64_t m);

// Runtime choice (csrc/dispatch.cpp): the best variant at or below the active ISA cap. The
// int8 AVX-512 variant needs VBMI (vpmultishiftqb) besides VNNI; a VNNI CPU without it runs the avx2 one.
struct Sparse24OpChoice {
  Sparse24Fn fn;
  Isa isa;
};
Sparse24OpChoice select_sparse24_f();
Sparse24OpChoice select_sparse24_i8();

}  // namespace slmkern
