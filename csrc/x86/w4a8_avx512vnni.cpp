// W4A8 linear, AVX-512 VNNI: vpdpbusd with the nibble as the unsigned operand
// and the quantize_rows_s8 activation as the signed one (w4_engine.h).
// 12 rows x 16 channels per micro-kernel step: 12 int32 + 12 fp32 accumulators.
#include "w4_engine.h"

namespace slmkern {
void w4a8_linear_avx512vnni(const Int4LinearArgs& a) { int4_linear<Vnni512, 1, 12>(a); }
}  // namespace slmkern
