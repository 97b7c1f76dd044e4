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

// While on, the pool's helper threads spin between jobs instead of going to sleep after a few tens of
// microseconds: for a stretch of many small calls separated by other work (a decode loop whose other
// work runs on one thread), so every call finds its helpers awake. Off (the default) outside such stretches.
void set_pool_keep_warm(bool on);

// Static split of [0, n) into n_threads contiguous chunks, fn(begin, end) each.
void parallel_chunks(int64_t n, int n_threads, int64_t align,
                     const std::function<void(int64_t, int64_t)>& fn);

}  // namespace slmkern
