// W4A16 linear, AVX-512 VNNI: activations as three int8 digits of a per-row
// 24-bit fixed point, vpdpbusd against the nibbles (w4_engine.h explains why
// this is as accurate as fp32 FMAs). 6 rows x 3 digits x 16 channels per step.
#include "w4_engine.h"

namespace slmkern {
void w4a16_linear_avx512vnni(const Int4LinearArgs& a) { int4_linear<Vnni512, 3, 6>(a); }
}  // namespace slmkern
