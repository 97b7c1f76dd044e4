// Per-calling-thread scratch for the w8a8 kernels (quantized activations and
// row scales). ISA-neutral; each kernel file includes it into its own
// anonymous namespace.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace slmkern {
namespace {

// A 64-byte aligned buffer owned by one calling thread (calls from several
// Python threads each get their own), grown on demand and kept for reuse.
class ScratchBuf {
 public:
  ~ScratchBuf() { std::free(p_); }
  uint8_t* get(size_t bytes) {
    if (bytes > n_) {
      std::free(p_);
      p_ = nullptr;
      n_ = 0;
      const size_t want = (bytes + 4095) / 4096 * 4096;
      p_ = static_cast<uint8_t*>(std::aligned_alloc(64, want));
      if (!p_) throw std::bad_alloc();
      n_ = want;
    }
    return p_;
  }

 private:
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace
}  // namespace slmkern
