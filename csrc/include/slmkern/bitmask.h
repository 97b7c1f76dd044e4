// Unstructured sparse weights ("bitmask" format) for sparse_linear: the CPU
// packed layout and the kernel signatures. Canonical format: slmkern/formats/bitmask.py.
#pragma once
#include <cstdint>

#include "slmkern/common.h"

namespace slmkern {

// ---------------------------------------------------------------------------
// CPU packed layout (built once per module by sparse_pack(); never saved).
// One flat byte buffer, every section 64-byte aligned relative to its start:
//
//   masks   : uint64 [N][Kw]      Kw = ceil(K/64); bit i of masks[n][w] <-> column 64w + i
//                                  (the canonical uint8 bitmask read as little-endian words,
//                                  zero-extended to whole words)
//   offsets : int64  [N + 1]      the canonical row_offsets
//   rowsum  : int32  [N]          int8 values only: sum of row n's values (compensates the
//                                  +128 shift of the unsigned vpdpbusd operand); absent for float
//   values  : int8 [nnz] or fp32 [nnz], then 64 zero bytes, so a full 64-byte load at any
//             value cursor stays inside the buffer (bf16/f16 values are widened to fp32, exact)
// ---------------------------------------------------------------------------
enum class SparseValues : int { f32 = 0, s8 = 1 };

static inline int64_t sparse_align64(int64_t b) { return (b + 63) / 64 * 64; }
static inline int64_t sparse_words(int64_t K) { return (K + 63) / 64; }
static inline int64_t sparse_offsets_at(int64_t N, int64_t K) { return sparse_align64(N * sparse_words(K) * 8); }
static inline int64_t sparse_rowsum_at(int64_t N, int64_t K) {
  return sparse_offsets_at(N, K) + sparse_align64((N + 1) * 8);
}
static inline int64_t sparse_values_at(int64_t N, int64_t K, SparseValues kind) {
  return sparse_rowsum_at(N, K) + (kind == SparseValues::s8 ? sparse_align64(N * 4) : 0);
}
static inline int64_t sparse_packed_bytes(int64_t N, int64_t K, int64_t nnz, SparseValues kind) {
  return sparse_values_at(N, K, kind) + nnz * (kind == SparseValues::s8 ? 1 : 4) + 64;
}

struct SparsePacked {
  const uint64_t* masks;
  const int64_t* offsets;
  const int32_t* rowsum;  // s8 only
  const void* values;
};

static inline SparsePacked sparse_view(const uint8_t* p, int64_t N, int64_t K, SparseValues kind) {
  SparsePacked s;
  s.masks = reinterpret_cast<const uint64_t*>(p);
  s.offsets = reinterpret_cast<const int64_t*>(p + sparse_offsets_at(N, K));
  s.rowsum = reinterpret_cast<const int32_t*>(p + sparse_rowsum_at(N, K));
  s.values = p + sparse_values_at(N, K, kind);
  return s;
}

// y[M, N] = x[M, K] @ W^T (+ bias), W given by the packed layout above.
//   f32 values: fp32 accumulation (scales unused).
//   s8 values : exactly w8a8_linear's math (quantize_rows_s8_ref, int32 accumulate,
//               float(acc) * (sx[m] * scales[n]) + bias[n]); bit-exact across ISAs.
struct SparseLinearArgs {
  const void* x;  // [M, K], row stride ldx
  DType dtype;    // of x and y
  int64_t M, K, N, ldx;
  const uint8_t* w_packed;
  SparseValues kind;
  int64_t nnz;
  const float* scales;  // [N], s8 only
  const float* bias;    // [N] or nullptr
  void* y;              // [M, N], row stride ldy
  int64_t ldy;
  int n_threads;
};

using SparseLinearFn = void (*)(const SparseLinearArgs&);

// Pack canonical tensors (already validated in Python). values: int8 [nnz] or
// float [nnz] of type vdtype (f32/bf16/f16) when kind == f32.
void sparse_pack(const uint8_t* bitmask, const int64_t* row_offsets, const void* values, DType vdtype,
                 SparseValues kind, int64_t N, int64_t K, int64_t nnz, uint8_t* out);

// Rows [r0, r1) whose cost is a balanced share: part p of `parts` by
// cost(n) = offsets[n] + n * per_row (binary search; offsets is monotone).
static inline int64_t sparse_split_row(const int64_t* offsets, int64_t N, int64_t per_row, int64_t p,
                                       int64_t parts) {
  if (p <= 0) return 0;
  if (p >= parts) return N;
  const double total = static_cast<double>(offsets[N]) + static_cast<double>(N) * per_row;
  const double target = total * p / parts;
  int64_t lo = 0, hi = N;  // first n with cost(n) >= target
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<double>(offsets[mid]) + static_cast<double>(mid) * per_row < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

void sparse_linear_ref(const SparseLinearArgs& a);
void sparse_linear_avx2(const SparseLinearArgs& a);
void sparse_linear_avx512vnni(const SparseLinearArgs& a);  // also needs AVX512-VBMI2 (vpexpandb)
// avx512vnni variant's path: 0 by cost (default), 1 expand, 2 nonzero broadcast, 3 dense (int8 values:
// expand to the int8 tile layout + w8a8_linear_avx512vnni), 4 nonzero 4-blocks (int8 values) (tests, tuning).
void sparse_force_path(int path);

}  // namespace slmkern
