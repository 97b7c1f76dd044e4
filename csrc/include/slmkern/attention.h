// Scaled dot-product attention for inference (slmkern::attention), fp32:
//   out[b, i, h, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, g, j, :] + mask[b, h, i, j]) v[b, g, j, :]
// with g = h / (Hq / Hkv) (grouped-query heads), optional causal masking (key j visible to query i iff
// j <= i, top-left aligned as torch's is_causal), and a query row whose every key is masked gives 0
// (torch's convention). Python (slmkern/_backends/cpu.py) has checked every size and stride.
#pragma once
#include <cstdint>

namespace slmkern {

struct AttentionArgs {
  const float* q;  int64_t q_sb, q_sh, q_sl;   // [B, Hq, L, D], element strides; the last dim is contiguous
  const float* k;  int64_t k_sb, k_sh, k_sl;   // [B, Hkv, S, D]
  const float* v;  int64_t v_sb, v_sh, v_sl;   // [B, Hkv, S, D]
  const float* mask; int64_t m_sb, m_sh, m_sl; // additive [B, Hq, L, S] (0 strides broadcast), contiguous
                                               // over S; nullptr: none
  float* out;                                  // [B, L, Hq, D] contiguous
  int64_t B, Hq, Hkv, L, S, D;
  float scale;
  bool causal;
  int n_threads;
};

using AttentionFn = void (*)(const AttentionArgs&);

void attention_ref(const AttentionArgs& a);   // scalar C++, the C++ spec
void attention_avx2(const AttentionArgs& a);  // AVX2 + FMA (AVX-512 machines run it too)

// Rows of queries per task: each task packs the K/V of one (batch, head) it needs, then runs these rows.
constexpr int64_t kAttnRowsPerTask = 128;

}  // namespace slmkern
