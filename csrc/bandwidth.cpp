// Memory read bandwidth probe for the benchmarks' floor: every thread streams
// its share of a buffer larger than the last-level cache.
#include <cstdint>
#include <atomic>
#include <cstring>
#include <vector>

#include "slmkern/threadpool.h"

namespace slmkern {

uint64_t stream_read(const uint8_t* p, int64_t bytes, int n_threads) {
  const int64_t words = bytes / 8;
  std::atomic<uint64_t> result{0};
  parallel_chunks(words, n_threads, 1024, [&](int64_t b, int64_t e) {
    // Eight independent xor chains; the compiler vectorises this with the
    // baseline ISA, which is enough to saturate DRAM.
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
    int64_t i = b;
    for (; i + 8 <= e; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] ^= w[i + j];
    for (; i < e; ++i) acc[0] ^= w[i];
    uint64_t r = 0;
    for (int j = 0; j < 8; ++j) r ^= acc[j];
    result.fetch_xor(r, std::memory_order_relaxed);
  });
  return result.load();
}

}  // namespace slmkern
