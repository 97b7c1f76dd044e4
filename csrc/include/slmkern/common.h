// Shared types of the slmkern C++ kernels. No torch headers: Python validates
// tensors and passes raw pointers, sizes and strides.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

namespace slmkern {

// Helpers below are `static inline`: each translation unit keeps its own copy,
// compiled with that file's ISA flags. With plain `inline` the linker would keep
// one copy for all files -- possibly the AVX-512 one, called from the scalar path.

// Activation / output element type. Values match slmkern/_backends/cpu.py.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// Rows whose absmax is below this are quantized as all-zero (scale 0): it keeps
// 127 / absmax finite. Mirrors reference.ACT_ZERO_THRESHOLD.
constexpr float kActZeroThreshold = 7.888609052210118e-31f;  // 2^-100

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, NaN stays NaN (quiet) -- same as torch's .to(bfloat16).
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);    // IEEE half, exact
uint16_t f32_to_f16(float f);    // round-to-nearest-even, like torch's .to(float16)

static inline float load_as_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

static inline void store_from_f32(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// int8 CPU weight layout ("int8 packed", version 1), built once per module by
// int8_pack() from the canonical [N, K] row-major int8 weight:
//
//   tiles  : int8  [Np/16][Kp/4][16][4]   Np = ceil(N/16)*16, Kp = ceil(K/4)*4
//            tile(nb, kb)[i][j] = W[nb*16 + i, kb*4 + j], zero outside [N, K]
//   colsum : int32 [Np]                   sum_k W[n, k] (0 for padding)
//
// One 64-byte row of a tile is exactly one vpdpbusd operand: 16 output
// channels x 4 consecutive k. colsum compensates the +128 shift that turns
// signed activations into the unsigned operand of vpdpbusd.
// ---------------------------------------------------------------------------
constexpr int64_t kInt8NB = 16;
constexpr int64_t kInt8KB = 4;
static inline int64_t int8_padded_n(int64_t N) { return ceil_div(N, kInt8NB) * kInt8NB; }
static inline int64_t int8_padded_k(int64_t K) { return ceil_div(K, kInt8KB) * kInt8KB; }
static inline int64_t int8_packed_bytes(int64_t N, int64_t K) {
  return int8_padded_n(N) * int8_padded_k(K) + int8_padded_n(N) * 4;
}
static inline const int32_t* int8_colsum(const int8_t* packed, int64_t N, int64_t K) {
  return reinterpret_cast<const int32_t*>(packed + int8_padded_n(N) * int8_padded_k(K));
}

// Dynamic per-row activation quantization of w8a8_linear (the op's `activations` argument):
//   s8 ("int8"): symmetric, codes in [-127, 127] (quantize_rows_s8_ref).
//   u7 ("int7"): asymmetric 7-bit, codes q in [0, 127] with a per-row zero point z
//                (quantize_rows_u7_ref); the integer activation is q - z, in [-127, 127].
//                u8 codes below 128 let AVX2 feed vpmaddubsw directly: exact, no sign fix-up.
enum class ActQuant : int { s8 = 0, u7 = 1 };

// w8a8_linear's fused output function (the op's `epilogue` argument), applied to the fp32 value
// after the bias and before the store: none, or GELU as gelu_epilogue_f32 below.
enum class Epilogue : int { none = 0, gelu = 1 };

// GELU of the "gelu" epilogue, the spec every ISA follows (and slmkern.reference.gelu_epilogue):
// 0.5 v (1 + erf(v / sqrt 2)), erf by Abramowitz & Stegun 7.1.26, exp by a Cody-Waite reduction and
// a polynomial. Each line is one fp32 rounding (the build has -ffp-contract=off); the AVX2 gelu8 runs
// the same operations lane-wise.
static inline float gelu_epilogue_f32(float v) {
  const float z = v * 0.70710677f;
  const float a = std::fabs(z);
  const float t = 1.0f / (a * 0.3275911f + 1.0f);
  float p = t * 1.061405429f;
  p = (p + -1.453152027f) * t;
  p = (p + 1.421413741f) * t;
  p = (p + -0.284496736f) * t;
  p = (p + 0.254829592f) * t;
  float sx = -(a * a);
  sx = sx < -87.0f ? -87.0f : sx;  // NaN stays NaN
  const float n = std::nearbyint(sx * 1.44269504f);
  float r = sx - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float e = r * 1.9875691500e-4f;
  e = (e + 1.3981999507e-3f) * r;
  e = (e + 8.3334519073e-3f) * r;
  e = (e + 4.1665795894e-2f) * r;
  e = (e + 1.6666665459e-1f) * r;
  e = (e + 5.0000001201e-1f) * r;
  e = (e * r + r) + 1.0f;
  // 2^n (n in [-126, 0]; a NaN n only happens for a NaN v, whose result is NaN anyway)
  const int32_t ni = n == n ? static_cast<int32_t>(n) : 0;
  const uint32_t sbits = static_cast<uint32_t>(ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &sbits, 4);
  const float erfc = p * (e * scale);
  const float h = z < 0.0f ? erfc : 2.0f - erfc;
  return (v * 0.5f) * h;
}

// Arguments of every int8-weight linear: y[M, N] = x[M, K] @ W^T * scale + bias.
struct Int8LinearArgs {
  const void* x;           // [M, K], row stride ldx elements
  DType dtype;             // dtype of x and y
  int64_t M, K, N;
  int64_t ldx;
  const int8_t* w_packed;  // int8 packed layout above
  const float* w_scale;    // [N]
  const float* bias;       // [N] or nullptr
  void* y;                 // [M, N], row stride ldy elements
  int64_t ldy;
  int n_threads;
  ActQuant act = ActQuant::s8;  // w8a8 only: how x is quantized (w8a16 ignores it)
  Epilogue epi = Epilogue::none;  // w8a8 only: fused output function
};

using Int8LinearFn = void (*)(const Int8LinearArgs&);

// Pack canonical W[N, K] (row-major, row stride ldw) into `out`
// (int8_packed_bytes(N, K) bytes, 4-byte aligned).
void int8_pack(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int8_t* out);

// Dynamic per-row symmetric quantization, the spec every ISA follows:
//   amax = max|x[m, :]|; non-finite amax -> q = 0, scale = NaN;
//   amax < kActZeroThreshold -> q = 0, scale = 0;
//   else inv = 127 / amax (fp32), q = clamp(rint(x * inv), -127, 127), scale = amax / 127.
void quantize_rows_s8_ref(const void* x, DType t, int64_t M, int64_t K, int64_t ldx,
                          int8_t* q, int64_t ldq, float* scale);

// Dynamic per-row asymmetric 7-bit quantization, the spec every ISA follows:
//   lo = min(0, min x[m, :]), hi = max(0, max x[m, :]); a NaN/inf in the row, or
//   range = hi - lo overflowing -> q = 0, zero = 0, scale = NaN;
//   range < kActZeroThreshold -> q = 0, zero = 0, scale = 0;
//   else inv = 127 / range, zero = clamp(rint(-lo * inv), 0, 127),
//        q = clamp(rint(x * inv) + zero, 0, 127), scale = range / 127   (each step one fp32 rounding).
// Columns K..ldq-1 of q are not written.
void quantize_rows_u7_ref(const void* x, DType t, int64_t M, int64_t K, int64_t ldx,
                          uint8_t* q, int64_t ldq, float* scale, int32_t* zero);
// The AVX2 version (w8a8_avx2.cpp; callable from any TU on a machine with AVX2): the same codes.
// recenter: store q - zero + 128 (in [1, 255]: the s8 activation + 128, what the VNNI kernel eats),
// and zero may be null. Columns K..Kp-1 get 0 (or 128 with recenter).
void quantize_rows_u7_avx2(const void* x, DType t, int64_t rows, int64_t K, int64_t ldx, uint8_t* q,
                           int64_t lda, float* sx, int32_t* zero, bool recenter);

// Kernels, one per ISA (ref = portable scalar C++, the C++ spec).
void w8a8_linear_ref(const Int8LinearArgs& a);
void w8a8_linear_avx2(const Int8LinearArgs& a);
void w8a8_linear_avx512vnni(const Int8LinearArgs& a);
void w8a16_linear_ref(const Int8LinearArgs& a);
void w8a16_linear_avx2(const Int8LinearArgs& a);
void w8a16_linear_avx512(const Int8LinearArgs& a);

}  // namespace slmkern
