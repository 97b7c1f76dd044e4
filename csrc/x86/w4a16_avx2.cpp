// W4A16 linear, AVX2: the fixed-point digit scheme of w4_engine.h on ymm
// (vpmaddubsw + vpmaddwd), one row x 3 digits x 16 channels per step.
#include "w4_engine.h"

namespace slmkern {
void w4a16_linear_avx2(const Int4LinearArgs& a) { int4_linear<Avx2, 3, 1>(a); }
}  // namespace slmkern
