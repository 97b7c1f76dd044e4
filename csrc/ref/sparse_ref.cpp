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

namespace slmkern {

void sparse_pack(const uint8_t* bitmask, const int64_t* row_offsets, const void* values, DType vdtype,
                 SparseValues kind, int64_t N, int64_t K, int64_t nnz, uint8_t* out) {
  const int64_t Kw = sparse_words(K), Kb = (K + 7) / 8, Nb = sparse_blocks(N);
  std::memset(out, 0, static_cast<size_t>(sparse_packed_bytes(N, K, nnz, kind)));
  uint64_t* masks = reinterpret_cast<uint64_t*>(out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < Kb; ++b)
      masks[((n / 8) * Kw + b / 8) * 8 + n % 8] |= static_cast<uint64_t>(bitmask[n * Kb + b]) << (8 * (b % 8));
  int64_t* boff = reinterpret_cast<int64_t*>(out + sparse_boffsets_at(N, K));
  const bool s8 = kind == SparseValues::s8;
  uint8_t* vals = out + sparse_values_at(N, K, kind);
  int64_t at = 0;  // values written so far (consumption order)
  for (int64_t j = 0; j < Nb; ++j) {
    boff[j] = at;
    int64_t cur[8];
    for (int r = 0; r < 8; ++r) cur[r] = 8 * j + r < N ? row_offsets[8 * j + r] : 0;
    for (int64_t b = 0; b < Kw; ++b)
      for (int r = 0; r < 8; ++r) {
        const int c = sparse_popcount(masks[(j * Kw + b) * 8 + r]);
        for (int i = 0; i < c; ++i, ++at, ++cur[r]) {
          if (s8) vals[at] = static_cast<const uint8_t*>(values)[cur[r]];
          else reinterpret_cast<float*>(vals)[at] = load_as_f32(values, vdtype, cur[r]);
        }
      }
  }
  boff[Nb] = at;
  if (s8) {
    const int8_t* v = static_cast<const int8_t*>(values);
    int32_t* rowsum = reinterpret_cast<int32_t*>(out + sparse_rowsum_at(N, K));
    for (int64_t n = 0; n < N; ++n) {
      int32_t s = 0;
      for (int64_t i = row_offsets[n]; i < row_offsets[n + 1]; ++i) s += v[i];
      rowsum[n] = s;
    }
  }
}

namespace {

// Every row of W in row order, chunked over the threads: f(n, masks of row n (Kw words), its values
// (esize bytes each)), each block de-interleaved once (sparse_block_rows).
template <class F>
void for_each_row(const SparseLinearArgs& a, const SparsePacked& w, int64_t Kw, int esize, F&& f) {
  sparse_for_row_chunks(a, w.boffsets, Kw * 8, [&](int64_t n0, int64_t n1) {
    std::vector<uint64_t> mk(static_cast<size_t>(8 * Kw));
    std::vector<uint8_t> vb;
    int64_t voff[9];
    for (int64_t n = n0; n < n1; ++n) {
      if (n % 8 == 0) {  // chunks start at a block
        const int64_t j = n / 8;
        vb.resize(static_cast<size_t>(esize * (w.boffsets[j + 1] - w.boffsets[j]) + 64));
        sparse_block_rows(w, Kw, j, esize, mk.data(), vb.data(), voff);
      }
      f(n, mk.data() + (n % 8) * Kw, vb.data() + voff[n % 8] * esize);
    }
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
    for_each_row(a, w, Kw, 1, [&](int64_t n, const uint64_t* rm, const uint8_t* vbytes) {
      const int8_t* v = reinterpret_cast<const int8_t*>(vbytes);
      for (int64_t m = 0; m < M; ++m) {
        int64_t c = 0;
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k)
          if ((rm[k / 64] >> (k % 64)) & 1) acc += int32_t(qx[m * K + k]) * int32_t(v[c++]);
        const float s = sx[m] * a.scales[n];
        float y = static_cast<float>(acc) * s;
        if (a.bias) y = y + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, y);
      }
    });
    return;
  }
  for_each_row(a, w, Kw, 4, [&](int64_t n, const uint64_t* rm, const uint8_t* vbytes) {
    const float* v = reinterpret_cast<const float*>(vbytes);
    for (int64_t m = 0; m < M; ++m) {
      int64_t c = 0;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float wk = ((rm[k / 64] >> (k % 64)) & 1) ? v[c++] : 0.f;
        acc = acc + load_as_f32(a.x, a.dtype, m * a.ldx + k) * wk;
      }
      if (a.bias) acc = acc + a.bias[n];
      store_from_f32(a.y, a.dtype, m * a.ldy + n, acc);
    }
  });
}

}  // namespace slmkern
