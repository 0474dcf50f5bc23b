// What row_gather.cc and row_stages.cc share: parts of a range, maps
// aliased to results, and a row's tap products for a halting head.
#ifndef SACT_JAX_ROW_PASSES_H_
#define SACT_JAX_ROW_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "xla/ffi/api/ffi.h"

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

inline void InPlace(const xla::ffi::Buffer<xla::ffi::F32>& in,
                    xla::ffi::ResultBuffer<xla::ffi::F32>& out) {
  InPlace(in.typed_data(), out->typed_data(), in.element_count());
}

// Whether a halting head's tap kernel `k` (`[9, C]`) and `shift` (`[9]`)
// fit maps of `channels` and a map of tap products `taps` of at least
// `num_rows` rows.
inline bool TapsFit(const xla::ffi::Buffer<xla::ffi::F32>& k,
                    const xla::ffi::Buffer<xla::ffi::F32>& shift,
                    const xla::ffi::Buffer<xla::ffi::F32>& taps,
                    int64_t channels, int64_t num_rows) {
  return k.dimensions()[0] == 9 && k.dimensions()[1] == channels &&
         shift.element_count() == 9 && taps.dimensions()[1] == 9 &&
         taps.dimensions()[0] >= num_rows;
}

// `taps[t] = x . k[t] + shift[t]`, t < 9: a row's tap products, of
// `channels`, for a halting head's folded local conv
// (`SactHead.taps_affine`: `k` `[9, C]`, `shift` `[9]`), on the widest
// vectors the CPU has (row_gather.cc).
void TapProducts(const float* x, const float* k, const float* shift,
                 int64_t channels, float* taps);

}  // namespace sact_jax

#endif  // SACT_JAX_ROW_PASSES_H_
