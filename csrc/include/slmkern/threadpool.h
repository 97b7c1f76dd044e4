// A small persistent thread pool. torch-free, so it cannot share torch's
// OpenMP pool; Python passes torch.get_num_threads() so both agree on width.
#pragma once
#include <cstdint>
#include <functional>

#include "slmkern/common.h"

namespace slmkern {

// Run fn(task) for task in [0, n_tasks) on up to n_threads threads (the caller
// is one of them). Tasks are claimed dynamically, so uneven tasks balance.
// Safe to call from several threads at once: concurrent calls are serialised.
void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn);

// Static split of [0, n) into n_threads contiguous chunks, fn(begin, end) each.
void parallel_chunks(int64_t n, int n_threads, int64_t align,
                     const std::function<void(int64_t, int64_t)>& fn);

}  // namespace slmkern
