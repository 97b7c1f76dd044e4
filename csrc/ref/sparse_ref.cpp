// Scalar sparse_linear (bitmask weights): the C++ spec of every ISA variant.
//   f32 values: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias) in fp32 over EVERY column k,
//               zeros included, so inf/NaN in x propagate exactly as in a dense matmul
//               (inf * 0 = NaN); SIMD variants match it within fp32 reordering.
//   s8 values : acc = sum over the kept entries of qx[m, k] * v (int32, exact), then
//               y = float(acc) * (sx[m] * scales[n]) + bias[n] -- bit-exact with w8a8_linear_ref.
// Also sparse_pack(), the packed layout's builder (slmkern/bitmask.h).
#include <cstring>
#include <vector>

#include "slmkern/bitmask.h"
#include "slmkern/threadpool.h"

namespace slmkern {

void sparse_pack(const uint8_t* bitmask, const int64_t* row_offsets, const void* values, DType vdtype,
                 SparseValues kind, int64_t N, int64_t K, int64_t nnz, uint8_t* out) {
  const int64_t Kw = sparse_words(K), Kb = (K + 7) / 8;
  std::memset(out, 0, static_cast<size_t>(sparse_packed_bytes(N, K, nnz, kind)));
  uint64_t* masks = reinterpret_cast<uint64_t*>(out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < Kb; ++b)
      masks[n * Kw + b / 8] |= static_cast<uint64_t>(bitmask[n * Kb + b]) << (8 * (b % 8));
  std::memcpy(out + sparse_offsets_at(N, K), row_offsets, static_cast<size_t>((N + 1) * 8));
  uint8_t* vals = out + sparse_values_at(N, K, kind);
  if (kind == SparseValues::s8) {
    const int8_t* v = static_cast<const int8_t*>(values);
    int32_t* rowsum = reinterpret_cast<int32_t*>(out + sparse_rowsum_at(N, K));
    for (int64_t n = 0; n < N; ++n) {
      int32_t s = 0;
      for (int64_t i = row_offsets[n]; i < row_offsets[n + 1]; ++i) s += v[i];
      rowsum[n] = s;
    }
    if (nnz > 0) std::memcpy(vals, v, static_cast<size_t>(nnz));
  } else {
    float* f = reinterpret_cast<float*>(vals);
    for (int64_t i = 0; i < nnz; ++i) f[i] = load_as_f32(values, vdtype, i);
  }
}

namespace {

// Balanced row chunks: 4 per thread, claimed dynamically.
template <class F>
void for_row_chunks(const SparseLinearArgs& a, const int64_t* offsets, int64_t per_row, F&& f) {
  const int64_t parts = a.n_threads <= 1 ? 1 : 4 * static_cast<int64_t>(a.n_threads);
  parallel_for(parts, a.n_threads, [&](int64_t p) {
    const int64_t r0 = sparse_split_row(offsets, a.N, per_row, p, parts);
    const int64_t r1 = sparse_split_row(offsets, a.N, per_row, p + 1, parts);
    if (r0 < r1) f(r0, r1);
  });
}

}  // namespace

void sparse_linear_ref(const SparseLinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kw = sparse_words(K);
  const SparsePacked w = sparse_view(a.w_packed, N, K, a.kind);
  if (a.kind == SparseValues::s8) {
    std::vector<int8_t> qx(static_cast<size_t>(M * K));
    std::vector<float> sx(static_cast<size_t>(M));
    quantize_rows_s8_ref(a.x, a.dtype, M, K, a.ldx, qx.data(), K, sx.data());
    const int8_t* v = static_cast<const int8_t*>(w.values);
    for_row_chunks(a, w.offsets, Kw, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
          int64_t c = w.offsets[n];
          int32_t acc = 0;
          for (int64_t k = 0; k < K; ++k)
            if ((w.masks[n * Kw + k / 64] >> (k % 64)) & 1) acc += int32_t(qx[m * K + k]) * int32_t(v[c++]);
          const float s = sx[m] * a.scales[n];
          float y = static_cast<float>(acc) * s;
          if (a.bias) y = y + a.bias[n];
          store_from_f32(a.y, a.dtype, m * a.ldy + n, y);
        }
    });
    return;
  }
  const float* v = static_cast<const float*>(w.values);
  for_row_chunks(a, w.offsets, Kw, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        int64_t c = w.offsets[n];
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const float wk = ((w.masks[n * Kw + k / 64] >> (k % 64)) & 1) ? v[c++] : 0.f;
          acc = acc + load_as_f32(a.x, a.dtype, m * a.ldx + k) * wk;
        }
        if (a.bias) acc = acc + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, acc);
      }
  });
}

}  // namespace slmkern
