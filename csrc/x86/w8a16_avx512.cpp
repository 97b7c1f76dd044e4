// PLACEHOLDER until the SIMD kernel lands: forwards to the scalar spec.
#include "slmkern/common.h"

namespace slmkern {
void w8a16_linear_avx512(const Int8LinearArgs& a) { w8a16_linear_ref(a); }
}  // namespace slmkern
