// The only pybind11 file. Python (slmkern/_backends/cpu.py) has validated
// every pointer, size and stride before these run; the GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "slmkern/common.h"
#include "slmkern/dispatch.h"
#include "slmkern/int4.h"
#include "slmkern/bitmask.h"
#include "slmkern/sparse24.h"
#include "slmkern/threadpool.h"

namespace py = pybind11;
using namespace slmkern;

namespace slmkern {
uint64_t stream_read(const uint8_t* p, int64_t bytes, int n_threads);
void rope_qkv_f32(const float* qkv, int64_t ld_qkv, int64_t M, int64_t H, int64_t Hkv, int64_t D,
                  const float* cos, const float* sin, float* q_out, float* k_cache, float* v_cache,
                  int64_t cache_head_stride, int64_t pos);
extern int64_t g_w8a8_row_chunk;
void add_rms_norm_f32(const float* a, const float* b, int64_t n, const float* w, float eps, float* h_out,
                      float* x_out, int lanes);
}

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

Int8LinearArgs make_args(uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                         uintptr_t w_packed, uintptr_t w_scale, uintptr_t bias, uintptr_t y,
                         int64_t ldy, int n_threads) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  if (M < 0 || K <= 0 || N <= 0 || ldx < K || ldy < N)
    throw std::invalid_argument("bad sizes: need M >= 0, K > 0, N > 0, ldx >= K, ldy >= N");
  Int8LinearArgs a;
  a.x = ptr<const void>(x);
  a.dtype = static_cast<DType>(dtype);
  a.M = M; a.K = K; a.N = N; a.ldx = ldx;
  a.w_packed = ptr<const int8_t>(w_packed);
  a.w_scale = ptr<const float>(w_scale);
  a.bias = bias ? ptr<const float>(bias) : nullptr;
  a.y = ptr<void>(y);
  a.ldy = ldy;
  a.n_threads = n_threads < 1 ? 1 : n_threads;
  return a;
}

Int4LinearArgs make_int4_args(uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                              int64_t group_size, bool asym, uintptr_t w_packed, uintptr_t bias, uintptr_t y,
                              int64_t ldy, int n_threads) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  if (M < 0 || K <= 0 || N <= 0 || ldx < K || ldy < N)
    throw std::invalid_argument("bad sizes: need M >= 0, K > 0, N > 0, ldx >= K, ldy >= N");
  if (K % 2 != 0 || group_size <= 0 || group_size % 2 != 0 || K % group_size != 0)
    throw std::invalid_argument("bad int4 sizes: need K even and group_size even, > 0, dividing K");
  Int4LinearArgs a;
  a.x = ptr<const void>(x);
  a.dtype = static_cast<DType>(dtype);
  a.M = M; a.K = K; a.N = N; a.ldx = ldx;
  a.group_size = group_size;
  a.asym = asym;
  a.w_packed = ptr<const uint8_t>(w_packed);
  a.bias = bias ? ptr<const float>(bias) : nullptr;
  a.y = ptr<void>(y);
  a.ldy = ldy;
  a.n_threads = n_threads < 1 ? 1 : n_threads;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "slmkern C++ CPU kernels (torch-free; called from slmkern._backends.cpu)";

  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("available_isas", &available_isas);
  m.def("set_isa", &set_isa, py::arg("name"),
        "Cap the ISA used by every op: ref, avx2, avx512, avx512vnni or auto.");
  m.def("op_isa", [](const std::string& op) {
    if (op == "w8a8_linear") return std::string(isa_name(select_w8a8().isa));
    if (op == "w8a16_linear") return std::string(isa_name(select_w8a16().isa));
    if (op == "w4a16_linear") return std::string(isa_name(select_w4a16().isa));
    if (op == "w4a8_linear") return std::string(isa_name(select_w4a8().isa));
    if (op == "sparse_linear") return std::string(isa_name(select_sparse().isa));
    if (op == "sparse24_linear") return std::string(isa_name(select_sparse24_f().isa));
    if (op == "sparse24_linear[int8]") return std::string(isa_name(select_sparse24_i8().isa));
    if (op == "sparse24_w4a16_linear") return std::string(isa_name(select_w4a16().isa));
    if (op == "attention") return std::string(isa_name(select_attention().isa));
    throw std::invalid_argument("unknown op '" + op + "'");
  });

  m.def("int8_packed_bytes", &int8_packed_bytes, py::arg("N"), py::arg("K"));
  m.def("int8_pack", [](uintptr_t w, int64_t N, int64_t K, int64_t ldw, uintptr_t out) {
    py::gil_scoped_release nogil;
    int8_pack(ptr<const int8_t>(w), N, K, ldw, ptr<int8_t>(out));
  });

  m.def("quantize_rows_u7", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx,
                               uintptr_t q, int64_t ldq, uintptr_t scale, uintptr_t zero) {
    py::gil_scoped_release nogil;
    quantize_rows_u7_ref(ptr<const void>(x), static_cast<DType>(dtype), M, K, ldx, ptr<uint8_t>(q), ldq,
                         ptr<float>(scale), ptr<int32_t>(zero));
  });
  m.def("quantize_rows_s8", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx,
                               uintptr_t q, int64_t ldq, uintptr_t scale) {
    py::gil_scoped_release nogil;
    quantize_rows_s8_ref(ptr<const void>(x), static_cast<DType>(dtype), M, K, ldx, ptr<int8_t>(q), ldq,
                         ptr<float>(scale));
  });

  // act (ActQuant) and epi (Epilogue) sit before the weight-side pointers: LinearPlan passes
  // (act, epi, w_packed, w_scale, bias) as one tuple, so the fast path costs no extra argument handling.
  m.def("w8a8_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx, int act,
                          int epi, uintptr_t w_packed, uintptr_t w_scale, uintptr_t bias, uintptr_t y,
                          int64_t ldy, int n_threads) {
    if (act != 0 && act != 1) throw std::invalid_argument("act must be 0 (int8: s8) or 1 (int7: u7)");
    if (epi != 0 && epi != 1) throw std::invalid_argument("epi must be 0 (none) or 1 (gelu)");
    Int8LinearArgs a = make_args(x, dtype, M, K, N, ldx, w_packed, w_scale, bias, y, ldy, n_threads);
    a.act = static_cast<ActQuant>(act);
    a.epi = static_cast<Epilogue>(epi);
    const OpChoice c = select_w8a8();
    py::gil_scoped_release nogil;
    c.fn(a);
  });
  m.def("w8a16_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                           uintptr_t w_packed, uintptr_t w_scale, uintptr_t bias, uintptr_t y,
                           int64_t ldy, int n_threads) {
    const Int8LinearArgs a = make_args(x, dtype, M, K, N, ldx, w_packed, w_scale, bias, y, ldy, n_threads);
    const OpChoice c = select_w8a16();
    py::gil_scoped_release nogil;
    c.fn(a);
  });

  m.def("int4_packed_bytes", [](int64_t N, int64_t K, int64_t group_size, bool asym) {
    return int4_packed_bytes(N, K, group_size, asym);
  }, py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("asym"));
  // zeros_kind: 0 none (symmetric), 1 uint8 codes, 2 fp32 zero points
  m.def("int4_pack", [](uintptr_t w, int64_t N, int64_t K, int64_t ldw, uintptr_t scales, uintptr_t zeros,
                        int zeros_kind, int64_t group_size, uintptr_t out) {
    if (N <= 0 || K <= 0 || K % 2 != 0 || ldw < K / 2 || group_size <= 0 || K % group_size != 0)
      throw std::invalid_argument("int4_pack: bad sizes");
    if (zeros_kind < 0 || zeros_kind > 2 || (zeros_kind != 0 && !zeros))
      throw std::invalid_argument("int4_pack: zeros_kind must be 0, 1 or 2 (with a zeros pointer)");
    py::gil_scoped_release nogil;
    int4_pack(ptr<const uint8_t>(w), N, K, ldw, ptr<const float>(scales), ptr<const void>(zeros),
              static_cast<Int4Zeros>(zeros_kind), group_size, ptr<uint8_t>(out));
  });
  m.def("w4a16_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                           int64_t group_size, bool asym, uintptr_t w_packed, uintptr_t bias, uintptr_t y,
                           int64_t ldy, int n_threads) {
    const Int4LinearArgs a = make_int4_args(x, dtype, M, K, N, ldx, group_size, asym, w_packed, bias, y, ldy,
                                            n_threads);
    const Int4OpChoice c = select_w4a16();
    py::gil_scoped_release nogil;
    c.fn(a);
  });
  m.def("w4a8_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                          int64_t group_size, bool asym, uintptr_t w_packed, uintptr_t bias, uintptr_t y,
                          int64_t ldy, int n_threads) {
    const Int4LinearArgs a = make_int4_args(x, dtype, M, K, N, ldx, group_size, asym, w_packed, bias, y, ldy,
                                            n_threads);
    const Int4OpChoice c = select_w4a8();
    py::gil_scoped_release nogil;
    c.fn(a);
  });

  // ------------------------------------------------------------------ 2:4 sparse (sparse24_linear)
  m.def("sparse24_packed_bytes", [](int64_t N, int64_t K, int vcode) {
    if (vcode < 0 || vcode > 3) throw std::invalid_argument("value code must be 0..3");
    return s24_packed_bytes(N, K, static_cast<S24Values>(vcode));
  }, py::arg("N"), py::arg("K"), py::arg("values_code"));
  m.def("sparse24_pack", [](uintptr_t values, uintptr_t meta, int64_t N, int64_t K, int vcode, uintptr_t out) {
    if (N <= 0 || K <= 0 || K % 4 != 0) throw std::invalid_argument("sparse24_pack: need N > 0, K > 0, K % 4 == 0");
    if (vcode < 0 || vcode > 3) throw std::invalid_argument("sparse24_pack: value code must be 0..3");
    py::gil_scoped_release nogil;
    sparse24_pack(ptr<const void>(values), ptr<const uint8_t>(meta), N, K, static_cast<S24Values>(vcode),
                  ptr<uint8_t>(out));
  });
  // vcode: 0 f32, 1 bf16, 2 f16 values (scales must be 0); 3 int8 values (scales required)
  m.def("sparse24_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                              uintptr_t w_packed, int vcode, uintptr_t scales, uintptr_t bias, uintptr_t y,
                              int64_t ldy, int n_threads) {
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
    if (M < 0 || K <= 0 || N <= 0 || K % 4 != 0 || ldx < K || ldy < N)
      throw std::invalid_argument("bad sizes: need M >= 0, K > 0 with K % 4 == 0, N > 0, ldx >= K, ldy >= N");
    if (vcode < 0 || vcode > 3 || (vcode == 3) != (scales != 0))
      throw std::invalid_argument("value code must be 0..3, with scales exactly for int8 values (3)");
    Sparse24Args a;
    a.x = ptr<const void>(x);
    a.dtype = static_cast<DType>(dtype);
    a.M = M; a.K = K; a.N = N; a.ldx = ldx;
    a.w_packed = ptr<const uint8_t>(w_packed);
    a.values = static_cast<S24Values>(vcode);
    a.scales = scales ? ptr<const float>(scales) : nullptr;
    a.bias = bias ? ptr<const float>(bias) : nullptr;
    a.y = ptr<void>(y);
    a.ldy = ldy;
    a.n_threads = n_threads < 1 ? 1 : n_threads;
    const Sparse24OpChoice c = vcode == 3 ? select_sparse24_i8() : select_sparse24_f();
    py::gil_scoped_release nogil;
    c.fn(a);
  });
  // ------------------------------------------------------------------ end 2:4 sparse

  // slmkern::attention (fp32; csrc/include/slmkern/attention.h). Strides are in elements; the mask
  // (0 = none) is additive fp32, contiguous over S, broadcast dims with stride 0.
  m.def("attention", [](uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                        uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                        uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                        uintptr_t mask, int64_t m_sb, int64_t m_sh, int64_t m_sl, uintptr_t out,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int64_t D, float scale,
                        bool causal, int n_threads) {
    if (B < 0 || L < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || S <= 0 || D <= 0)
      throw std::invalid_argument("attention: bad sizes: need B, L >= 0, S, D > 0, Hq a positive multiple of Hkv");
    AttentionArgs a{ptr<const float>(q), q_sb, q_sh, q_sl, ptr<const float>(k), k_sb, k_sh, k_sl,
                    ptr<const float>(v), v_sb, v_sh, v_sl, mask ? ptr<const float>(mask) : nullptr, m_sb, m_sh,
                    m_sl, ptr<float>(out), B, Hq, Hkv, L, S, D, scale, causal, n_threads < 1 ? 1 : n_threads};
    if (B == 0 || L == 0) return;
    const AttentionOpChoice c = select_attention();
    py::gil_scoped_release nogil;
    c.fn(a);
  });

  // slmkern.decoder: rotary embedding of q and k + KV-cache write, fp32 (csrc/decoder.cpp). Pointers and
  // sizes are the decoder's own buffers, checked once when it is built.
  m.def("rope_qkv_f32", [](uintptr_t qkv, int64_t ld_qkv, int64_t M, int64_t H, int64_t Hkv, int64_t D,
                           uintptr_t cos, uintptr_t sin, uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache,
                           int64_t cache_head_stride, int64_t pos) {
    if (M <= 0 || H <= 0 || Hkv <= 0 || D <= 0 || D % 2 || ld_qkv < (H + 2 * Hkv) * D || pos < 0 ||
        cache_head_stride < (pos + M) * D)
      throw std::invalid_argument("rope_qkv_f32: bad sizes");
    rope_qkv_f32(ptr<const float>(qkv), ld_qkv, M, H, Hkv, D, ptr<const float>(cos), ptr<const float>(sin),
                 ptr<float>(q_out), ptr<float>(k_cache), ptr<float>(v_cache), cache_head_stride, pos);
  });

  m.def("add_rms_norm_f32", [](uintptr_t a, uintptr_t b, int64_t n, uintptr_t w, float eps, uintptr_t h_out,
                               uintptr_t x_out, int lanes) {
    if (n <= 0 || n > (int64_t{1} << 24) || (lanes != 8 && lanes != 16))
      throw std::invalid_argument("add_rms_norm_f32: bad sizes");
    add_rms_norm_f32(ptr<const float>(a), b ? ptr<const float>(b) : nullptr, n, ptr<const float>(w), eps,
                     h_out ? ptr<float>(h_out) : nullptr, ptr<float>(x_out), lanes);
  });
  m.def("_set_w8a8_row_chunk", [](int64_t rows) { g_w8a8_row_chunk = rows < 0 ? 0 : rows; },
        "AVX2 w8a8 GEMM: rows per L2 chunk (0: none); a tuning knob for benchmarks");
  m.def("set_pool_keep_warm", [](bool on) {
    py::gil_scoped_release nogil;
    set_pool_keep_warm(on);
  }, py::arg("on"), "pool helpers spin between jobs (on) or sleep after a short spin (off, the default)");

  m.def("stream_read", [](uintptr_t p, int64_t bytes, int n_threads) {
    py::gil_scoped_release nogil;
    return stream_read(ptr<const uint8_t>(p), bytes, n_threads);
  });

  // ---- unstructured (bitmask) sparse_linear. kind: 0 float values (f32 in the packed
  // buffer), 1 int8 values. vdtype: dtype code of the canonical float values for sparse_pack.
  m.def("sparse_packed_bytes", [](int64_t N, int64_t K, int64_t nnz, int kind) {
    if (N < 0 || K <= 0 || nnz < 0 || kind < 0 || kind > 1) throw std::invalid_argument("sparse_packed_bytes: bad sizes");
    return sparse_packed_bytes(N, K, nnz, static_cast<SparseValues>(kind));
  }, py::arg("N"), py::arg("K"), py::arg("nnz"), py::arg("kind"));
  m.def("sparse_pack", [](uintptr_t bitmask, uintptr_t row_offsets, uintptr_t values, int vdtype, int kind,
                          int64_t N, int64_t K, int64_t nnz, uintptr_t out) {
    if (N <= 0 || K <= 0 || nnz < 0 || kind < 0 || kind > 1 || vdtype < 0 || vdtype > 2)
      throw std::invalid_argument("sparse_pack: bad sizes or codes");
    py::gil_scoped_release nogil;
    sparse_pack(ptr<const uint8_t>(bitmask), ptr<const int64_t>(row_offsets), ptr<const void>(values),
                static_cast<DType>(vdtype), static_cast<SparseValues>(kind), N, K, nnz, ptr<uint8_t>(out));
  });
  m.def("sparse_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                            uintptr_t w_packed, int kind, int64_t nnz, uintptr_t scales, uintptr_t bias,
                            uintptr_t y, int64_t ldy, int n_threads) {
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
    if (M < 0 || K <= 0 || N <= 0 || ldx < K || ldy < N || nnz < 0 || kind < 0 || kind > 1)
      throw std::invalid_argument("sparse_linear: bad sizes");
    if (kind == 1 && !scales) throw std::invalid_argument("sparse_linear: int8 values need scales");
    SparseLinearArgs a;
    a.x = ptr<const void>(x);
    a.dtype = static_cast<DType>(dtype);
    a.M = M; a.K = K; a.N = N; a.ldx = ldx;
    a.w_packed = ptr<const uint8_t>(w_packed);
    a.kind = static_cast<SparseValues>(kind);
    a.nnz = nnz;
    a.scales = scales ? ptr<const float>(scales) : nullptr;
    a.bias = bias ? ptr<const float>(bias) : nullptr;
    a.y = ptr<void>(y);
    a.ldy = ldy;
    a.n_threads = n_threads < 1 ? 1 : n_threads;
    const SparseOpChoice c = select_sparse();
    py::gil_scoped_release nogil;
    c.fn(a);
  });
  m.def("sparse_force_path", &sparse_force_path, py::arg("path"),
        "avx512vnni sparse_linear path: 0 by cost (default), 1 expand, 2 nonzero broadcast, 3 dense (int8), 4 4-blocks (int8)");
  // ---- end unstructured
}
