// `RunParts`: a pass in two parts on the calling thread and one of XLA's
// pool threads, shared by onednn_conv.cc (the matmul halves) and
// row_gather.cc (the sparse path's row passes).
#ifndef SACT_JAX_RUN_PARTS_H_
#define SACT_JAX_RUN_PARTS_H_

#include <atomic>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace sact_jax {

// Runs `part(k, parts)` for k < parts (1 or 2): the calling thread runs
// the first, one of XLA's pool threads the second, and whichever gets to
// the second first runs it, so it never waits for a busy pool. Returns once
// both have run. `part` must not throw (nothing may reach XLA's pool).
template <typename Part>
void RunParts(xla::ffi::ThreadPool& pool, int parts, const Part& part) {
  if (parts < 2) {
    part(0, 1);
    return;
  }
  struct Claim {
    std::atomic<bool> taken{false}, done{false};
  };
  auto claim = std::make_shared<Claim>();
  // The task may run after this returned (the caller took the part): it
  // then only drops its reference to `claim`, never touching `part`.
  const Part* second = &part;
  pool.Schedule([claim, second] {
    if (claim->taken.exchange(true)) return;
    (*second)(1, 2);
    claim->done.store(true, std::memory_order_release);
  });
  part(0, 2);
  if (!claim->taken.exchange(true)) {
    part(1, 2);
  } else {
    while (!claim->done.load(std::memory_order_acquire)) {
      __builtin_ia32_pause();
    }
  }
}

}  // namespace sact_jax

#endif  // SACT_JAX_RUN_PARTS_H_
