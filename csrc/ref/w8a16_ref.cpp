// Scalar W8A16 linear: int8 weights, float activations, fp32 accumulation.
//   y[m, n] = (sum_k float(x[m, k]) * float(W[n, k])) * w_scale[n] + bias[n]
// Summation order is free (SIMD variants differ): tests use fp32 tolerances.
#include <vector>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"

namespace slmkern {

void w8a16_linear_ref(const Int8LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp = int8_padded_k(K);
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = load_as_f32(a.x, a.dtype, m * a.ldx + k);
  parallel_chunks(N, a.n_threads, kInt8NB, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xf.data() + m * K;
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* tile = a.w_packed + (n / kInt8NB) * kInt8NB * Kp;
        const int64_t i = n % kInt8NB;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k)
          acc += xr[k] * static_cast<float>(tile[((k / kInt8KB) * kInt8NB + i) * kInt8KB + k % kInt8KB]);
        float v = acc * a.w_scale[n];
        if (a.bias) v = v + a.bias[n];
        store_from_f32(a.y, a.dtype, m * a.ldy + n, v);
      }
    }
  });
}

}  // namespace slmkern
