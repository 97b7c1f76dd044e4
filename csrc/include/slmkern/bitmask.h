// Unstructured sparse weights ("bitmask" format) for sparse_linear: the CPU
// packed layout and the kernel signatures. Canonical format: slmkern/formats/bitmask.py.
#pragma once
#include <cstdint>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"

namespace slmkern {

// ---------------------------------------------------------------------------
// CPU packed layout (built once per module by sparse_pack(); never saved).
// Rows in blocks of 8 (Nb = ceil(N/8)), Kw = ceil(K/64) mask words per row. One flat byte
// buffer, every section 64-byte aligned relative to its start:
//
//   masks   : uint64 [Nb][Kw][8]  masks[(j Kw + b) 8 + r]: word b of row n = 8j + r, bit i <->
//                                  column 64b + i (the canonical uint8 bitmask read as
//                                  little-endian words); rows >= N are 0. Word b of a block's
//                                  eight rows is one 64-byte line.
//   boffsets: int64  [Nb + 1]     index in values of block j's first value; boffsets[Nb] = nnz
//   rowsum  : int32  [Nb * 8]     int8 values only: sum of row n's values (compensates the +128
//                                  shift of the unsigned vpdpbusd operand); rows >= N: 0. Absent
//                                  for float values
//   values  : int8 [nnz] or fp32 [nnz] in consumption order: block by block, in a block word by
//             word, in a word row by row (r = 0..7), a row's values in ascending column. Then 64
//             zero bytes, so a full 64-byte load at any value cursor stays inside the buffer
//             (bf16/f16 values are widened to fp32, exact).
//
// Why interleaved: an M = 1 kernel walks one block with ONE value cursor and one mask line per
// word (two sequential streams), instead of 8 row cursors and 8 mask streams; on Zen 4 that is
// ~15% less time at 90% sparsity (benchmarks/NOTES.md, session 4). Row-at-a-time consumers
// walk a block once and build per-row lists (the AVX-512 large-M paths) or de-interleave it with
// sparse_block_rows() (the reference).
// ---------------------------------------------------------------------------
enum class SparseValues : int { f32 = 0, s8 = 1 };

static inline int64_t sparse_align64(int64_t b) { return (b + 63) / 64 * 64; }
static inline int64_t sparse_words(int64_t K) { return (K + 63) / 64; }
static inline int64_t sparse_blocks(int64_t N) { return (N + 7) / 8; }
static inline int64_t sparse_boffsets_at(int64_t N, int64_t K) {
  return sparse_align64(sparse_blocks(N) * sparse_words(K) * 64);
}
static inline int64_t sparse_rowsum_at(int64_t N, int64_t K) {
  return sparse_boffsets_at(N, K) + sparse_align64((sparse_blocks(N) + 1) * 8);
}
static inline int64_t sparse_values_at(int64_t N, int64_t K, SparseValues kind) {
  return sparse_rowsum_at(N, K) + (kind == SparseValues::s8 ? sparse_align64(sparse_blocks(N) * 32) : 0);
}
static inline int64_t sparse_packed_bytes(int64_t N, int64_t K, int64_t nnz, SparseValues kind) {
  return sparse_values_at(N, K, kind) + nnz * (kind == SparseValues::s8 ? 1 : 4) + 64;
}

struct SparsePacked {
  const uint64_t* masks;
  const int64_t* boffsets;
  const int32_t* rowsum;  // s8 only
  const void* values;
};

static inline SparsePacked sparse_view(const uint8_t* p, int64_t N, int64_t K, SparseValues kind) {
  SparsePacked s;
  s.masks = reinterpret_cast<const uint64_t*>(p);
  s.boffsets = reinterpret_cast<const int64_t*>(p + sparse_boffsets_at(N, K));
  s.rowsum = reinterpret_cast<const int32_t*>(p + sparse_rowsum_at(N, K));
  s.values = p + sparse_values_at(N, K, kind);
  return s;
}

static inline int sparse_popcount(uint64_t m) { return __builtin_popcountll(m); }

// Block j in row order, for row-at-a-time consumers: masks_out[r * Kw + b] = word b of row 8j + r,
// row r's values (esize bytes each) at vals_out + voff[r] * esize, voff[8] = the block's nnz.
// vals_out needs the block's nnz * esize bytes + 64 (the kernels' full-width loads).
static inline void sparse_block_rows(const SparsePacked& s, int64_t Kw, int64_t j, int esize, uint64_t* masks_out,
                                     uint8_t* vals_out, int64_t voff[9]) {
  const uint64_t* mk = s.masks + j * Kw * 8;
  voff[0] = 0;
  for (int r = 0; r < 8; ++r) {
    int64_t c = 0;
    for (int64_t b = 0; b < Kw; ++b) c += sparse_popcount(mk[b * 8 + r]);
    voff[r + 1] = voff[r] + c;
  }
  int64_t cur[8];
  for (int r = 0; r < 8; ++r) cur[r] = voff[r];
  const uint8_t* v = static_cast<const uint8_t*>(s.values) + s.boffsets[j] * esize;
  for (int64_t b = 0; b < Kw; ++b)
    for (int r = 0; r < 8; ++r) {
      const uint64_t m = mk[b * 8 + r];
      masks_out[r * Kw + b] = m;
      const int64_t bytes = sparse_popcount(m) * esize;
      for (int64_t i = 0; i < bytes; ++i) vals_out[cur[r] * esize + i] = v[i];
      cur[r] += sparse_popcount(m);
      v += bytes;
    }
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

// Block (or row) index where part p of `parts` starts, balanced by cost(n) = offsets[n] + n * per_row
// over n = 0..N (binary search; offsets is monotone). With the packed layout's boffsets and Nb
// blocks: part p is blocks [split(p), split(p + 1)).
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

// f(r0, r1) for balanced chunks of whole 8-row blocks (cost = nnz + per_block per block; r0 a
// multiple of 8), 4 per thread, claimed dynamically (every sparse_linear variant splits rows this way).
template <class F>
void sparse_for_row_chunks(const SparseLinearArgs& a, const int64_t* boffsets, int64_t per_block, F&& f) {
  const int64_t parts = a.n_threads <= 1 ? 1 : 4 * static_cast<int64_t>(a.n_threads);
  const int64_t Nb = sparse_blocks(a.N);
  parallel_for(parts, a.n_threads, [&](int64_t p) {
    const int64_t b0 = sparse_split_row(boffsets, Nb, per_block, p, parts);
    const int64_t b1 = sparse_split_row(boffsets, Nb, per_block, p + 1, parts);
    const int64_t r0 = 8 * b0 < a.N ? 8 * b0 : a.N, r1 = 8 * b1 < a.N ? 8 * b1 : a.N;
    if (r0 < r1) f(r0, r1);
  });
}

void sparse_linear_ref(const SparseLinearArgs& a);
void sparse_linear_avx2(const SparseLinearArgs& a);
void sparse_linear_avx512vnni(const SparseLinearArgs& a);  // also needs AVX512-VBMI2 (vpexpandb)
// avx512vnni variant's path: 0 by cost (default), 1 expand, 2 nonzero broadcast, 3 dense (int8 values:
// expand to the int8 tile layout + w8a8_linear_avx512vnni), 4 nonzero 4-blocks (int8 values) (tests, tuning).
void sparse_force_path(int path);

}  // namespace slmkern
