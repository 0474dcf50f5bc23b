// The sparse path's row passes as XLA FFI custom calls: the 3x3 patch
// gather, the row index sets, the active rows' update of the block's maps
// and the halting heads' tap products at rows. Built into the same library
// as onednn_conv.cc by onednn.py (they need no oneDNN, only the compiler,
// cache and registration that library already has).
//
// Why the gather: XLA:CPU fuses the gather of `[S, 9, C]` patches with the
// reshape to the `[S, 9 C]` rows the matmul reads, and its loop over that
// 2-D output works out every element's source on its own; the same gather
// left 3-D runs 3.5x faster, and whole rows copied here 4-6x faster
// (BUILD.md, "The row windows, the stem's pool and the heads' sums"). Each
// of the others says why it is here.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

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

// Channels per thread are whole cache lines (16 floats): no two threads
// write to one line.
struct ChannelSplit {
  int64_t lines;
  int threads;
  ChannelSplit(int64_t count, int64_t channels) {
    lines = (channels + 15) / 16;
    threads = static_cast<int>(std::clamp<int64_t>(
        std::min(count * channels * static_cast<int64_t>(sizeof(float)) /
                     kBytesPerThread,
                 lines),
        1, omp_get_max_threads()));
  }
  // Thread t of n's channels [c0, c1).
  std::pair<int64_t, int64_t> Range(int64_t channels, int t, int n) const {
    return {std::min(channels, lines * t / n * 16),
            std::min(channels, lines * (t + 1) / n * 16)};
  }
};

// `acc[t] = sum over c in [c0, c1) of x[c] * k[t * stride + c]`, t < 9:
// a row's share of the 9 taps of a halting head's folded local conv
// (`SactHead.taps_affine`). Compiled for AVX-512, AVX2 and plain x86-64,
// picked at load time (the library is built without -march, so that one
// build serves any x86-64 CPU).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void TapSums(const float* __restrict x, const float* __restrict k,
             int64_t stride, int64_t c0, int64_t c1, float* __restrict acc) {
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0,
        a8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8)
  for (int64_t c = c0; c < c1; ++c) {
    const float v = x[c];
    a0 += v * k[c];
    a1 += v * k[stride + c];
    a2 += v * k[2 * stride + c];
    a3 += v * k[3 * stride + c];
    a4 += v * k[4 * stride + c];
    a5 += v * k[5 * stride + c];
    a6 += v * k[6 * stride + c];
    a7 += v * k[7 * stride + c];
    a8 += v * k[8 * stride + c];
  }
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4;
  acc[5] = a5, acc[6] = a6, acc[7] = a7, acc[8] = a8;
}

// Per-thread partial tap sums of `count` rows, added up into `taps[idx[s]]`
// with the shift, for the rows `valid` says.
class Taps {
 public:
  Taps(int threads, int64_t count)
      : count_(count), partial_(threads * count * 9) {}
  float* Of(int t, int64_t s) { return partial_.data() + (t * count_ + s) * 9; }
  void AddUp(int threads, const int32_t* idx, const float* shift,
             int64_t num_rows, float* taps) {
    for (int64_t s = 0; s < count_; ++s) {
      const int64_t i = idx[s];
      if (i < 0 || i >= num_rows) continue;
      for (int64_t t = 0; t < 9; ++t) {
        float sum = shift[t];
        for (int th = 0; th < threads; ++th) sum += Of(th, s)[t];
        taps[i * 9 + t] = sum;
      }
    }
  }

 private:
  int64_t count_;
  std::vector<float> partial_;
};

// The maps come in aliased to the results, so normally already in place.
void InPlace(const float* src, float* dst, int64_t size) {
  if (src != dst) std::memcpy(dst, src, size * sizeof(float));
}

// The active rows' update of a SACT block's maps (`rows.update_rows`): for
// each row `s` whose index `i = idx[s]` lies in the map (padding indices
// do not), `out[i] += weight[s] * res[s]` and, with `update_x`,
// `x[i] += res[s]`, `xsum[i / hw] += res[s]`, with a tap kernel `k`
// (`[9, C]`, else `[0, C]`) `taps[i] = x[i] . k + shift` (of the new
// `x[i]`), and where `rows` has a row per index, `rows[s]` = the new
// `x[i]` (0 at padding indices).
// Why: XLA runs each of these as a scatter of its own, on one thread, and
// reads the residual three times and `x`'s rows twice; this reads each
// once, on as many threads as its bytes pay for, each thread a range of
// channels.
ffi::Error UpdateRows(ffi::Buffer<ffi::F32> x_in, ffi::Buffer<ffi::F32> out_in,
                      ffi::Buffer<ffi::F32> xsum_in,
                      ffi::Buffer<ffi::F32> taps_in,
                      ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::S32> idx,
                      ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> shift,
                      ffi::ResultBuffer<ffi::F32> x_out,
                      ffi::ResultBuffer<ffi::F32> out_out,
                      ffi::ResultBuffer<ffi::F32> xsum_out,
                      ffi::ResultBuffer<ffi::F32> taps_out,
                      ffi::ResultBuffer<ffi::F32> rows_out, int64_t hw,
                      int64_t update_x) {
  const int64_t num_rows = x_in.dimensions()[0];
  const int64_t channels = x_in.dimensions()[1];
  const int64_t count = idx.dimensions()[0];
  const int64_t images = xsum_in.dimensions()[0];
  const bool with_rows = update_x && rows_out->dimensions()[0] == count;
  const bool with_taps = update_x && k.dimensions()[0] == 9;
  if (hw < 1 || out_in.dimensions()[0] != num_rows ||
      res.dimensions()[0] != count || res.dimensions()[1] != channels ||
      (with_taps && (k.dimensions()[1] != channels ||
                     shift.element_count() != 9 ||
                     taps_in.dimensions()[1] != 9))) {
    return ffi::Error::InvalidArgument("update rows: shapes disagree");
  }
  InPlace(x_in.typed_data(), x_out->typed_data(), x_in.element_count());
  InPlace(out_in.typed_data(), out_out->typed_data(), out_in.element_count());
  InPlace(xsum_in.typed_data(), xsum_out->typed_data(),
          xsum_in.element_count());
  InPlace(taps_in.typed_data(), taps_out->typed_data(),
          taps_in.element_count());
  float* x = x_out->typed_data();
  float* out = out_out->typed_data();
  float* xsum = xsum_out->typed_data();
  float* rows = rows_out->typed_data();
  const float* r = res.typed_data();
  const float* w = weight.typed_data();
  const float* kernel = k.typed_data();
  const int32_t* at = idx.typed_data();
  const ChannelSplit split(count, channels);
  Taps taps(with_taps ? split.threads : 0, count);
#pragma omp parallel num_threads(split.threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const auto [c0, c1] = split.Range(channels, t, n);
    for (int64_t s = 0; s < count; ++s) {
      const int64_t i = at[s];
      float* row = with_rows ? rows + s * channels : nullptr;
      if (i < 0 || i >= num_rows || i / hw >= images) {
        if (row) std::fill(row + c0, row + c1, 0.0f);
        continue;
      }
      const float* __restrict rs = r + s * channels;
      const float ws = w[s];
      float* __restrict o = out + i * channels;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) o[c] += ws * rs[c];
      if (!update_x) continue;
      float* __restrict xi = x + i * channels;
      float* __restrict sum = xsum + (i / hw) * channels;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        xi[c] += rs[c];
        sum[c] += rs[c];
      }
      if (with_taps) TapSums(xi, kernel, channels, c0, c1, taps.Of(t, s));
      if (row) std::memcpy(row + c0, xi + c0, (c1 - c0) * sizeof(float));
    }
  }
  if (with_taps) {
    taps.AddUp(split.threads, at, shift.typed_data(), num_rows,
               taps_out->typed_data());
  }
  return ffi::Error::Success();
}

// `taps[i] = x[i] . k + shift` at `i = idx[s]` for the indices inside the
// map (`rows.row_taps`): the 9 tap products of a halting head's folded
// local conv (`k` `[9, C]`) at rows, written into the `[N + 1, 9]` map of
// them (aliased). Why: in XLA a gather of the rows, a 9-column dot and a
// scatter, each on one thread.
ffi::Error RowTaps(ffi::Buffer<ffi::F32> x_in, ffi::Buffer<ffi::S32> idx,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> shift,
                   ffi::Buffer<ffi::F32> taps_in,
                   ffi::ResultBuffer<ffi::F32> taps_out) {
  const int64_t num_rows = x_in.dimensions()[0];
  const int64_t channels = x_in.dimensions()[1];
  const int64_t count = idx.dimensions()[0];
  if (k.dimensions()[0] != 9 || k.dimensions()[1] != channels ||
      shift.element_count() != 9 || taps_in.dimensions()[1] != 9 ||
      taps_in.dimensions()[0] < num_rows) {
    return ffi::Error::InvalidArgument("row taps: shapes disagree");
  }
  InPlace(taps_in.typed_data(), taps_out->typed_data(),
          taps_in.element_count());
  const float* x = x_in.typed_data();
  const float* kernel = k.typed_data();
  const int32_t* at = idx.typed_data();
  const ChannelSplit split(count, channels);
  Taps taps(split.threads, count);
#pragma omp parallel num_threads(split.threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const auto [c0, c1] = split.Range(channels, t, n);
    for (int64_t s = 0; s < count; ++s) {
      const int64_t i = at[s];
      if (i < 0 || i >= num_rows) continue;
      TapSums(x + i * channels, kernel, channels, c0, c1, taps.Of(t, s));
    }
  }
  taps.AddUp(split.threads, at, shift.typed_data(), num_rows,
             taps_out->typed_data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactUpdateRows, UpdateRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xsum
                                  .Arg<ffi::Buffer<ffi::F32>>()  // taps
                                  .Arg<ffi::Buffer<ffi::F32>>()  // res
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rows
                                  .Attr<int64_t>("hw")
                                  .Attr<int64_t>("update_x"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactRowTaps, RowTaps,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // taps
                                  .Ret<ffi::Buffer<ffi::F32>>());
