// What row_gather.cc and row_stages.cc share: parts of a range, maps
// aliased to results, and a row's tap products for a halting head.
#ifndef SACT_JAX_ROW_PASSES_H_
#define SACT_JAX_ROW_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

namespace sact_jax {

// `[begin, end)` of part k of `parts` over `size` items, whole multiples
// of `align`.
inline std::pair<int64_t, int64_t> PartRange(int64_t size, int k, int parts,
                                             int64_t align = 1) {
  const int64_t units = (size + align - 1) / align;
  return {std::min(size, units * k / parts * align),
          std::min(size, units * (k + 1) / parts * align)};
}

// The maps come in aliased to the results, so normally already in place.
inline void InPlace(const float* src, float* dst, int64_t size) {
  if (src != dst) std::memcpy(dst, src, size * sizeof(float));
}

// `acc[t] = sum over c in [c0, c1) of x[c] * k[t * stride + c]`, t < 9: a
// row's share of the 9 taps of a halting head's folded local conv
// (`SactHead.taps_affine`), on the widest vectors the CPU has
// (row_gather.cc).
void RowTapSums(const float* x, const float* k, int64_t stride, int64_t c0,
                int64_t c1, float* acc);

}  // namespace sact_jax

#endif  // SACT_JAX_ROW_PASSES_H_
