// PLACEHOLDER until the SIMD kernel lands: forwards to the scalar spec.
#include "slmkern/common.h"

namespace slmkern {
void w8a8_linear_avx2(const Int8LinearArgs& a) { w8a8_linear_ref(a); }
}  // namespace slmkern
