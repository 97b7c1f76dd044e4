// W4A16 linear, AVX-512 (F/BW, no VNNI): the fixed-point digit scheme of
// w4_engine.h with vpmaddubsw + vpmaddwd in place of vpdpbusd.
#include "w4_engine.h"

namespace slmkern {
void w4a16_linear_avx512(const Int4LinearArgs& a) { int4_linear<Bw512, 3, 4>(a); }
}  // namespace slmkern
