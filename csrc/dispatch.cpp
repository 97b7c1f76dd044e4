// CPUID once, then pick each op's best variant. SLMKERN_CPU_ISA (read at first
// use) or set_isa() caps the choice, so tests can force every path in turn.
#include "slmkern/dispatch.h"
#include "slmkern/sparse24.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace slmkern {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // libgcc also checks XGETBV, so these are true only if the OS saves the state.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  if (vnni) return Isa::avx512vnni;
  if (avx512) return Isa::avx512;
  if (avx2) return Isa::avx2;
#endif
  return Isa::ref;
}

Isa parse(const std::string& name) {
  if (name == "ref") return Isa::ref;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  if (name == "avx512vnni") return Isa::avx512vnni;
  throw std::invalid_argument("unknown ISA '" + name +
                              "'; expected one of ref, avx2, avx512, avx512vnni, auto");
}

std::atomic<int> g_cap{-1};  // -1: not initialised yet
std::once_flag g_env_once;

void init_from_env() {
  std::call_once(g_env_once, [] {
    const char* env = std::getenv("SLMKERN_CPU_ISA");
    int cap = static_cast<int>(detected_isa());
    if (env && *env && std::string(env) != "auto") {
      const Isa want = parse(env);  // throws on a bad name: loud, at import
      if (static_cast<int>(want) > cap)
        throw std::invalid_argument(std::string("SLMKERN_CPU_ISA=") + env +
                                    " but this CPU supports at most " + isa_name(detected_isa()));
      cap = static_cast<int>(want);
    }
    int expected = -1;
    g_cap.compare_exchange_strong(expected, cap);
  });
}

template <class Choice, class Fn, size_t N>
Choice pick(const Fn (&fns)[N], const Isa (&isas)[N]) {
  const Isa cap = active_isa();
  for (size_t i = N; i-- > 0;)
    if (static_cast<int>(isas[i]) <= static_cast<int>(cap)) return {fns[i], isas[i]};
  return {fns[0], isas[0]};
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::ref: return "ref";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "avx512vnni";
  }
}

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  init_from_env();
  return static_cast<Isa>(g_cap.load(std::memory_order_acquire));
}

void set_isa(const std::string& name) {
  init_from_env();
  const Isa want = name == "auto" ? detected_isa() : parse(name);
  if (static_cast<int>(want) > static_cast<int>(detected_isa()))
    throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU (best: " +
                                isa_name(detected_isa()) + ")");
  g_cap.store(static_cast<int>(want), std::memory_order_release);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= static_cast<int>(detected_isa()); ++i) out.push_back(isa_name(static_cast<Isa>(i)));
  return out;
}

// Each op lists its variants from slowest to fastest; the best one at or below
// the cap wins (an op with no avx512-only variant runs its avx2 one there).
OpChoice select_w8a8() {
  static const Int8LinearFn fns[] = {w8a8_linear_ref, w8a8_linear_avx2, w8a8_linear_avx512vnni};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512vnni};
  return pick<OpChoice>(fns, isas);
}

OpChoice select_w8a16() {
  static const Int8LinearFn fns[] = {w8a16_linear_ref, w8a16_linear_avx2, w8a16_linear_avx512};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512};
  return pick<OpChoice>(fns, isas);
}

// int4 weights: avx512 without VNNI has its own w4a16 (vpmaddubsw on zmm);
// w4a8 there runs the avx2 variant.
Int4OpChoice select_w4a16() {
  static const Int4LinearFn fns[] = {w4a16_linear_ref, w4a16_linear_avx2, w4a16_linear_avx512,
                                     w4a16_linear_avx512vnni};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512, Isa::avx512vnni};
  return pick<Int4OpChoice>(fns, isas);
}

Int4OpChoice select_w4a8() {
  static const Int4LinearFn fns[] = {w4a8_linear_ref, w4a8_linear_avx2, w4a8_linear_avx512vnni};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512vnni};
  return pick<Int4OpChoice>(fns, isas);
}

// ---- unstructured (bitmask) sparse: the avx512vnni variant also needs AVX512-VBMI2
// (vpexpandb); a VNNI CPU without it runs the avx2 variant.
SparseOpChoice select_sparse() {
  static const SparseLinearFn fns[] = {sparse_linear_ref, sparse_linear_avx2, sparse_linear_avx512vnni};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512vnni};
  static const SparseLinearFn fns2[] = {sparse_linear_ref, sparse_linear_avx2};
  static const Isa isas2[] = {Isa::ref, Isa::avx2};
#if defined(__x86_64__) || defined(_M_X64)
  static const bool vbmi2 = __builtin_cpu_supports("avx512vbmi2");
#else
  static const bool vbmi2 = false;
#endif
  return vbmi2 ? pick<SparseOpChoice>(fns, isas) : pick<SparseOpChoice>(fns2, isas2);
}

AttentionOpChoice select_attention() {
  static const AttentionFn fns[] = {attention_ref, attention_avx2};
  static const Isa isas[] = {Isa::ref, Isa::avx2};
  return pick<AttentionOpChoice>(fns, isas);
}

// ---------------------------------------------------------------- 2:4 sparse (sparse24_linear)
Sparse24OpChoice select_sparse24_f() {
  static const Sparse24Fn fns[] = {sparse24_f_linear_ref, sparse24_f_linear_avx2, sparse24_f_linear_avx512};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512};
  return pick<Sparse24OpChoice>(fns, isas);
}

Sparse24OpChoice select_sparse24_i8() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi");  // vpmultishiftqb
#else
  static const bool vbmi = false;
#endif
  static const Sparse24Fn fns[] = {sparse24_i8_linear_ref, sparse24_i8_linear_avx2, sparse24_i8_linear_avx512vbmi};
  static const Isa isas[] = {Isa::ref, Isa::avx2, Isa::avx512vnni};
  static const Sparse24Fn fns2[] = {sparse24_i8_linear_ref, sparse24_i8_linear_avx2};
  static const Isa isas2[] = {Isa::ref, Isa::avx2};
  return vbmi ? pick<Sparse24OpChoice>(fns, isas) : pick<Sparse24OpChoice>(fns2, isas2);
}
// ---------------------------------------------------------------- end 2:4 sparse

}  // namespace slmkern
