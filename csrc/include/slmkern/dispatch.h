// Runtime ISA selection: CPUID once, then a per-op function table.
#pragma once
#include <string>
#include <vector>
#include "slmkern/common.h"
#include "slmkern/int4.h"
#include "slmkern/bitmask.h"
#include "slmkern/attention.h"

namespace slmkern {

enum class Isa : int { ref = 0, avx2 = 1, avx512 = 2, avx512vnni = 3 };

const char* isa_name(Isa isa);
Isa detected_isa();                      // best this CPU and OS support
Isa active_isa();                        // detected, or capped by set_isa / SLMKERN_CPU_ISA
// Cap the ISA used from now on ("ref", "avx2", "avx512", "avx512vnni", or "auto").
// Throws std::invalid_argument for an unknown name or one this CPU lacks.
void set_isa(const std::string& name);
std::vector<std::string> available_isas();

struct OpChoice {
  Int8LinearFn fn;
  Isa isa;  // which variant fn is
};
OpChoice select_w8a8();
OpChoice select_w8a16();

struct Int4OpChoice {
  Int4LinearFn fn;
  Isa isa;
};
Int4OpChoice select_w4a16();
Int4OpChoice select_w4a8();

// ---- unstructured (bitmask) sparse
struct SparseOpChoice {
  SparseLinearFn fn;
  Isa isa;
};
SparseOpChoice select_sparse();

// ---- attention (fp32): ref and avx2; AVX-512 machines run the avx2 variant
struct AttentionOpChoice {
  AttentionFn fn;
  Isa isa;
};
AttentionOpChoice select_attention();

}  // namespace slmkern
