// slmkern::attention, portable scalar C++ (the C++ spec the SIMD variant is tested against, and what
// SLMKERN_CPU_ISA=ref runs): one query row at a time, scores in fp32, a max-subtracted softmax.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "slmkern/attention.h"
#include "slmkern/threadpool.h"

namespace slmkern {

void attention_ref(const AttentionArgs& a) {
  const int64_t group = a.Hq / a.Hkv;
  const int64_t chunks = (a.L + kAttnRowsPerTask - 1) / kAttnRowsPerTask;
  parallel_for(a.B * a.Hq * chunks, a.n_threads, [&](int64_t task) {
    const int64_t c = task % chunks, bh = task / chunks, b = bh / a.Hq, h = bh % a.Hq, g = h / group;
    const float* kb = a.k + b * a.k_sb + g * a.k_sh;
    const float* vb = a.v + b * a.v_sb + g * a.v_sh;
    std::vector<float> p(static_cast<size_t>(a.S));
    const int64_t i_end = std::min(a.L, (c + 1) * kAttnRowsPerTask);
    for (int64_t i = c * kAttnRowsPerTask; i < i_end; ++i) {
      const float* qi = a.q + b * a.q_sb + h * a.q_sh + i * a.q_sl;
      const float* mi = a.mask ? a.mask + b * a.m_sb + h * a.m_sh + i * a.m_sl : nullptr;
      const int64_t n = a.causal ? std::min(a.S, i + 1) : a.S;  // keys this row may see
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        float s = 0.f;
        for (int64_t d = 0; d < a.D; ++d) s += qi[d] * kb[j * a.k_sl + d];
        s *= a.scale;
        if (mi) s += mi[j];
        p[j] = s;
        mx = (s > mx || s != s) ? s : mx;  // a NaN score makes the row NaN
      }
      float* o = a.out + ((b * a.L + i) * a.Hq + h) * a.D;
      for (int64_t d = 0; d < a.D; ++d) o[d] = 0.f;
      if (mx == -std::numeric_limits<float>::infinity()) continue;  // every key masked: 0
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < a.D; ++d) o[d] += p[j] * vb[j * a.v_sl + d];
      for (int64_t d = 0; d < a.D; ++d) o[d] *= inv;
    }
  });
}

}  // namespace slmkern
