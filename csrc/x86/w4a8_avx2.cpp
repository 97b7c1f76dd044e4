// W4A8 linear, AVX2: vpmaddubsw (nibble u8 x activation s8, pairs <= 3840)
// + vpmaddwd, 2 rows x 16 channels per micro-kernel step (w4_engine.h).
#include "w4_engine.h"

namespace slmkern {
void w4a8_linear_avx2(const Int4LinearArgs& a) { int4_linear<Avx2, 1, 2>(a); }
}  // namespace slmkern
