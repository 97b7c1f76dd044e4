// Scalar W8A8 linear: the C++ spec every SIMD variant must match bit for bit.
//   y[m, n] = float(acc[m, n]) * (sx[m] * w_scale[n]) + bias[n]
//   acc[m, n] = sum_k qx[m, k] * W[n, k]   (int32, exact)
// with qx, sx from quantize_rows_s8_ref (activations s8), or qx = q - zero and sx from
// quantize_rows_u7_ref (activations u7), then v = gelu_epilogue_f32(v) with the gelu epilogue. Each step is a separate fp32 rounding
// (no FMA), so every ISA produces identical floats.
#include <vector>

#include "slmkern/common.h"
#include "slmkern/threadpool.h"

namespace slmkern {

void w8a8_linear_ref(const Int8LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, Kp = int8_padded_k(K);
  std::vector<int8_t> qx(static_cast<size_t>(M * Kp), 0);
  std::vector<float> sx(static_cast<size_t>(M));
  if (a.act == ActQuant::u7) {  // the integer activation is q - zero, in [-127, 127]
    std::vector<uint8_t> q(static_cast<size_t>(M * Kp), 0);
    std::vector<int32_t> zero(static_cast<size_t>(M));
    quantize_rows_u7_ref(a.x, a.dtype, M, K, a.ldx, q.data(), Kp, sx.data(), zero.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) qx[m * Kp + k] = static_cast<int8_t>(q[m * Kp + k] - zero[m]);
  } else {
    quantize_rows_s8_ref(a.x, a.dtype, M, K, a.ldx, qx.data(), Kp, sx.data());
  }
  parallel_chunks(N, a.n_threads, kInt8NB, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xr = qx.data() + m * Kp;
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* tile = a.w_packed + (n / kInt8NB) * kInt8NB * Kp;
        const int64_t i = n % kInt8NB;
        int32_t acc = 0;
        for (int64_t kb = 0; kb < Kp / kInt8KB; ++kb)
          for (int64_t j = 0; j < kInt8KB; ++j)
            acc += int32_t(xr[kb * kInt8KB + j]) * int32_t(tile[(kb * kInt8NB + i) * kInt8KB + j]);
        const float s = sx[m] * a.w_scale[n];
        float v = static_cast<float>(acc) * s;
        if (a.bias) v = v + a.bias[n];
        if (a.epi == Epilogue::gelu) v = gelu_epilogue_f32(v);
        store_from_f32(a.y, a.dtype, m * a.ldy + n, v);
      }
    }
  });
}

}  // namespace slmkern
