// The sparse path's 3x3 patch gather and its row index sets as XLA FFI
// custom calls, built into the same library as onednn_conv.cc by onednn.py
// (they need no oneDNN, only the compiler, cache and registration that
// library already has).
//
// Why: XLA:CPU fuses the gather of `[S, 9, C]` patches with the reshape to
// the `[S, 9 C]` rows the matmul reads, and its loop over that 2-D output
// works out every element's source on its own; the same gather left 3-D
// runs 3.5x faster, and whole rows copied here 4-6x faster (BUILD.md,
// "The row windows, the stem's pool and the heads' sums").
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Below this many bytes of output per thread, one thread: a second costs
// more to wake than it copies. XLA calls this from its pool threads, so a
// second thread is an OpenMP team of that thread's own, whose worker sleeps
// between calls (onednn_conv.cc, `RunSplit`). At 64 KB the sparse path at
// batch 1 (ImageNet ResNet-101, 50% of the FLOPs; patches of 0.2-2 MB) took
// 1.01x its time with 1 MB, at batch 32 (chunks of 2-5 MB) 1.003x (BUILD.md,
// "Where batch 1's time goes after the split").
constexpr int64_t kBytesPerThread = 1 << 20;

// `out[s, t] = src[neighbour t of idx[s]]` for the 9 taps of a 3x3 window
// in row-major order, as `rows.patches` computes it with XLA's gather: a
// neighbour outside the image, or of a padding index (`>= num_rows`),
// reads row `num_rows`; every row index is clipped to `src`'s rows.
ffi::Error Patches3x3(ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::S32> idx,
                      ffi::ResultBuffer<ffi::F32> out, int64_t height,
                      int64_t width, int64_t num_rows) {
  const int64_t src_rows = src.dimensions()[0];
  const int64_t channels = src.dimensions()[1];
  const int64_t count = idx.dimensions()[0];
  if (src_rows < 1 || height < 1 || width < 1) {
    return ffi::Error::InvalidArgument("row patches: empty map");
  }
  const float* in = src.typed_data();
  const int32_t* centre = idx.typed_data();
  float* dst = out->typed_data();
  const int64_t map = height * width;
  const int64_t outside = std::min(num_rows, src_rows - 1);
  const size_t bytes = channels * sizeof(float);
  const int threads = static_cast<int>(std::clamp<int64_t>(
      count * 9 * static_cast<int64_t>(bytes) / kBytesPerThread, 1,
      omp_get_max_threads()));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t s = 0; s < count; ++s) {
    const int64_t c = centre[s];
    const bool inside = c >= 0 && c < num_rows;
    const int64_t i = inside ? (c % map) / width : 0;
    const int64_t j = inside ? c % width : 0;
    float* row = dst + s * 9 * channels;
    for (int64_t t = 0; t < 9; ++t) {
      const int64_t di = t / 3 - 1, dj = t % 3 - 1;
      const bool valid = inside && i + di >= 0 && i + di < height &&
                         j + dj >= 0 && j + dj < width;
      const int64_t r =
          valid ? std::min(c + di * width + dj, src_rows - 1) : outside;
      std::memcpy(row + t * channels, in + r * channels, bytes);
    }
  }
  return ffi::Error::Success();
}

// `out[k]` = the k-th flat index `i` with `mask[i] > 0`, in increasing
// order; the rest of `out` the padding index `N + 1` (`rows.indices`).
// Why: XLA computes the same with a prefix sum (a small matmul, a scan over
// blocks) and a scatter, some ten operations of 1-18 us on the path from
// one unit to the next (two index sets per unit); this is one pass.
ffi::Error NonzeroRows(ffi::Buffer<ffi::F32> mask,
                       ffi::ResultBuffer<ffi::S32> out) {
  const int64_t num_rows = mask.element_count();
  const int64_t length = out->element_count();
  if (num_rows + 1 > INT32_MAX) {
    return ffi::Error::InvalidArgument("row indices: too many rows");
  }
  const float* m = mask.typed_data();
  int32_t* o = out->typed_data();
  int64_t k = 0;
  for (int64_t i = 0; i < num_rows && k < length; ++i) {
    if (m[i] > 0) o[k++] = static_cast<int32_t>(i);
  }
  std::fill(o + k, o + length, static_cast<int32_t>(num_rows + 1));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactRowPatches3x3, Patches3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactNonzeroRows, NonzeroRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
