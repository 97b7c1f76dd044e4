// The only pybind11 file. Python (slmkern/_backends/cpu.py) has validated
// every pointer, size and stride before these run; the GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "slmkern/common.h"
#include "slmkern/dispatch.h"

namespace py = pybind11;
using namespace slmkern;

namespace slmkern {
uint64_t stream_read(const uint8_t* p, int64_t bytes, int n_threads);
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
    throw std::invalid_argument("unknown op '" + op + "'");
  });

  m.def("int8_packed_bytes", &int8_packed_bytes, py::arg("N"), py::arg("K"));
  m.def("int8_pack", [](uintptr_t w, int64_t N, int64_t K, int64_t ldw, uintptr_t out) {
    py::gil_scoped_release nogil;
    int8_pack(ptr<const int8_t>(w), N, K, ldw, ptr<int8_t>(out));
  });

  m.def("quantize_rows_s8", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx,
                               uintptr_t q, int64_t ldq, uintptr_t scale) {
    py::gil_scoped_release nogil;
    quantize_rows_s8_ref(ptr<const void>(x), static_cast<DType>(dtype), M, K, ldx, ptr<int8_t>(q), ldq,
                         ptr<float>(scale));
  });

  m.def("w8a8_linear", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t ldx,
                          uintptr_t w_packed, uintptr_t w_scale, uintptr_t bias, uintptr_t y,
                          int64_t ldy, int n_threads) {
    const Int8LinearArgs a = make_args(x, dtype, M, K, N, ldx, w_packed, w_scale, bias, y, ldy, n_threads);
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

  m.def("stream_read", [](uintptr_t p, int64_t bytes, int n_threads) {
    py::gil_scoped_release nogil;
    return stream_read(ptr<const uint8_t>(p), bytes, n_threads);
  });
}
