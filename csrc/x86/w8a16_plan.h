// ISA-neutral pieces of the SIMD w8a16 kernels: the fp32 activation scratch
// and the split of the output into thread tasks.
//
// Everything here has internal linkage (anonymous namespace): this header is
// compiled once per ISA file with different -m flags, and an inline function
// with external linkage would let the linker keep, say, the AVX-512 copy for
// the AVX2 path.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "slmkern/common.h"

namespace slmkern {
namespace {

struct W8a16FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using W8a16FloatBuf = std::unique_ptr<float[], W8a16FreeDeleter>;

inline W8a16FloatBuf w8a16_alloc_floats(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return W8a16FloatBuf(p);
}

// A buffer of >= n floats for the calling thread, valid until its next call.
// Small requests reuse one per-thread buffer (no malloc on the per-token path;
// concurrent callers each have their own); big ones get a one-off buffer that
// `oneoff` frees when the caller returns, so a long prefill pins no memory.
inline float* w8a16_scratch(size_t n, W8a16FloatBuf& oneoff) {
  constexpr size_t kKeepFloats = size_t(1) << 20;  // 4 MB
  if (n > kKeepFloats) {
    oneoff = w8a16_alloc_floats(n);
    return oneoff.get();
  }
  thread_local W8a16FloatBuf buf;
  thread_local size_t cap = 0;
  if (cap < n) {
    buf.reset();
    cap = 0;
    buf = w8a16_alloc_floats(n);
    cap = n;
  }
  return buf.get();
}

// Work split: tasks are (range of 16-channel blocks) x (range of rows),
// claimed dynamically by parallel_for so a core slowed by a neighbour does
// not hold the others up. Row ranges are multiples of the micro-kernel's row
// count `mr`; rows are split only when there are too few channel blocks.
struct W8a16Plan {
  int64_t n_blocks, blocks_per_task, n_ntasks;
  int64_t rows_per_task, n_mtasks;
  int64_t n_tasks() const { return n_ntasks * n_mtasks; }
};

inline W8a16Plan w8a16_plan(int64_t M, int64_t N, int64_t K, int n_threads, int64_t mr) {
  W8a16Plan p;
  p.n_blocks = ceil_div(N, kInt8NB);
  const int64_t T = std::max(1, n_threads);
  // Aim for ~8 tasks per thread, but keep each task's weight slice >= ~16 KB
  // so the per-task overhead stays small next to streaming it.
  const int64_t min_blocks = std::max<int64_t>(1, 16384 / (kInt8NB * int8_padded_k(K)));
  int64_t bpt = std::max<int64_t>(1, p.n_blocks / (8 * T));
  bpt = std::min(p.n_blocks, std::max(bpt, T == 1 ? p.n_blocks : min_blocks));
  // Several row blocks re-read the task's weight slice: keep it in L2.
  if (M > mr) bpt = std::min(bpt, std::max<int64_t>(1, (256 << 10) / (kInt8NB * int8_padded_k(K))));
  if (T > 1 && ceil_div(p.n_blocks, bpt) < T) bpt = ceil_div(p.n_blocks, T);
  p.blocks_per_task = bpt;
  p.n_ntasks = ceil_div(p.n_blocks, bpt);
  p.rows_per_task = M;
  p.n_mtasks = 1;
  if (T > 1 && p.n_ntasks < 4 * T && M > 2 * mr) {
    const int64_t want = std::max<int64_t>(1, 4 * T / p.n_ntasks);
    p.rows_per_task = std::max(mr, ceil_div(ceil_div(M, want), mr) * mr);
    p.n_mtasks = ceil_div(M, p.rows_per_task);
  }
  return p;
}

// Rows of the next micro-kernel call when `left` rows remain: blocks of
// ceil(left / ceil(left / mr)) rows, so 7 rows with mr = 6 run as 4 + 3, not
// 6 + 1 (a 1- or 2-row block converts as many weights as a full one).
inline int64_t w8a16_row_block(int64_t left, int64_t mr) {
  return ceil_div(left, ceil_div(left, mr));
}

}  // namespace
}  // namespace slmkern
