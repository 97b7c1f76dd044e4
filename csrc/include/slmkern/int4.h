// int4 weights on CPU: the packed layout shared by every ISA, the kernel
// arguments and the kernel declarations of w4a16_linear / w4a8_linear.
//
// Canonical input (slmkern/formats/int4.py): w uint8 [N, K/2], two unsigned
// 4-bit codes u per byte along K, low nibble first; scales fp32 [N, K/g];
// zeros none (z = 8), uint8 [N, K/g] (0..15) or fp32 [N, K/g]:
//   W[n, k] = (u[n, k] - z[n, k/g]) * s[n, k/g].
//
// ---------------------------------------------------------------------------
// int4 CPU packed layout ("int4 packed", version 1), built once per module by
// int4_pack(); one flat byte blob of int4_layout(...).total bytes:
//
//   NT = ceil(N/16) tiles of 16 output channels, G = K/g groups per row,
//   gp = ceil(g/8)*8 (each group padded to whole 8-k blocks), nblk = gp/8.
//   tile t (channels n = 16t + i, i < 16), group q: group_bytes contiguous bytes
//     blocks  : nblk x 64 bytes; block b covers k = q*g + 8b + [0, 8):
//               byte[4i + j] = u[n, k0 + j] | u[n, k0 + 4 + j] << 4   (j < 4)
//               i.e. the low nibbles form one 16-channel x 4-k vpdpbusd
//               operand, the high nibbles the next one; 0 past the group's
//               end and for n >= N.
//     s       : fp32[16]   scales of the 16 channels (0 for n >= N)
//     sz      : fp32[16]   s * z, only when the weight has zero points
//   tile stride = G * group_bytes, group_bytes = nblk*64 + 64*(1 + asym).
//
// A 64-byte block read as 16 dwords has channel i in dword i: one load feeds
// all 16 channels, and (& 0x0f, >> 4 & 0x0f) yields both operands. Scales sit
// right after their group's weights, so the epilogue reads them from the
// stream it is already walking. Symmetric weights store no sz (it is 8*s).
// ---------------------------------------------------------------------------
#pragma once
#include <cstdint>

#include "slmkern/common.h"

namespace slmkern {

constexpr int64_t kInt4NB = 16;  // output channels per tile
constexpr int64_t kInt4KB = 8;   // k per 64-byte block
constexpr int64_t kInt4BlockBytes = 64;

struct Int4Layout {
  int64_t N, K, g;
  bool asym;
  int64_t NT, G, gp, nblk, group_bytes, tile_bytes, total;
};

// static: every translation unit (each built with its own ISA flags) keeps a
// private copy, so no AVX-512 copy can be chosen for the baseline code at link time.
static inline Int4Layout int4_layout(int64_t N, int64_t K, int64_t g, bool asym) {
  Int4Layout L;
  L.N = N; L.K = K; L.g = g; L.asym = asym;
  L.NT = (N + kInt4NB - 1) / kInt4NB;
  L.G = K / g;
  L.gp = (g + kInt4KB - 1) / kInt4KB * kInt4KB;
  L.nblk = L.gp / kInt4KB;
  L.group_bytes = L.nblk * kInt4BlockBytes + kInt4BlockBytes * (asym ? 2 : 1);
  L.tile_bytes = L.G * L.group_bytes;
  L.total = L.NT * L.tile_bytes;
  return L;
}

static inline int64_t int4_packed_bytes(int64_t N, int64_t K, int64_t g, bool asym) {
  return int4_layout(N, K, g, asym).total;
}

// How the zero points arrive: none (symmetric, z = 8), uint8 codes, or fp32.
enum class Int4Zeros : int { none = 0, u8 = 1, f32 = 2 };

// Canonical (w [N, K/2] row stride ldw bytes, scales/zeros [N, K/g] contiguous)
// -> packed blob `out` of int4_packed_bytes(N, K, g, zeros != none) bytes.
void int4_pack(const uint8_t* w, int64_t N, int64_t K, int64_t ldw, const float* scales,
               const void* zeros, Int4Zeros zt, int64_t g, uint8_t* out);

// y[M, N] = x[M, K] @ W^T + bias (w4a16), or its dynamic-int8 form (w4a8).
struct Int4LinearArgs {
  const void* x;            // [M, K], row stride ldx elements
  DType dtype;              // dtype of x and y
  int64_t M, K, N;
  int64_t ldx;
  int64_t group_size;       // g: divides K, even
  bool asym;                // packed blob carries sz (weights had zero points)
  const uint8_t* w_packed;  // int4 packed layout above
  const float* bias;        // [N] or nullptr
  void* y;                  // [M, N], row stride ldy elements
  int64_t ldy;
  int n_threads;
};

using Int4LinearFn = void (*)(const Int4LinearArgs&);

// w4a16: y = x @ W^T + bias with W dequantized in fp32 (tolerance-tested).
void w4a16_linear_ref(const Int4LinearArgs& a);
void w4a16_linear_avx2(const Int4LinearArgs& a);
void w4a16_linear_avx512(const Int4LinearArgs& a);
void w4a16_linear_avx512vnni(const Int4LinearArgs& a);
// w4a8: qx, sx = quantize_rows_s8_ref(x); per group g:
//   acc_g = sum qx*u (int32), asum_g = sum qx;
//   y = sx * sum_g (s*acc_g - sz*asum_g) + bias   (fp32, tolerance-tested).
void w4a8_linear_ref(const Int4LinearArgs& a);
void w4a8_linear_avx2(const Int4LinearArgs& a);
void w4a8_linear_avx512vnni(const Int4LinearArgs& a);

}  // namespace slmkern
