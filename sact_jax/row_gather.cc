// The sparse path's row passes as XLA FFI custom calls: the 3x3 patch
// gather, a dense convolution's windows, the row index sets, the active
// rows' update of the block's maps, a densely run unit's update of them
// and the halting heads' tap products at rows. Built into the same library
// as onednn_conv.cc by onednn.py (they need no oneDNN, only the compiler,
// cache and registration that library already has). A bottleneck unit's
// stages run whole in row_stages.cc; these serve the other units (CIFAR's)
// and the heads.
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
#include "row_passes.h"
#include "run_parts.h"

namespace ffi = xla::ffi;
using sact_jax::InPlace;
using sact_jax::PartRange;
using sact_jax::TapsFit;
using sact_jax::RunParts;

namespace {

// Below this many bytes per part, one part: a second costs more to hand
// over than it copies. At 64 KB the sparse path at batch 1 (ImageNet
// ResNet-101, 50% of the FLOPs; patches of 0.2-2 MB) took 1.01x its time
// with 1 MB, at batch 32 (chunks of 2-5 MB) 1.003x (BUILD.md, "Where batch
// 1's time goes after the split").
constexpr int64_t kBytesPerPart = 1 << 20;

// Parts of a pass of `bytes` (`sact_jax::RunParts`): two where there are
// two CPUs and the bytes pay for a second, else one.
// Why not an OpenMP team: XLA calls these passes from its pool threads, and
// a team started there is a second set of threads on the same CPUs, which
// the pool's own work then contends with. With teams, `sparse.apply` at
// batch 32 ran no faster than with every pass on one thread (2-core Intel
// Xeon; BUILD.md, "Two cores against one at batch 32").
int Parts(int64_t bytes) {
  return bytes >= 2 * kBytesPerPart && omp_get_max_threads() > 1 ? 2 : 1;
}

// `out[s, t] = src[neighbour t of idx[s]]` for the 9 taps of a 3x3 window
// in row-major order, as `rows.patches` computes it with XLA's gather: a
// neighbour outside the image, or of a padding index (`>= num_rows`),
// reads row `num_rows`; every row index is clipped to `src`'s rows.
ffi::Error Patches3x3(ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::S32> idx,
                      ffi::ResultBuffer<ffi::F32> out, int64_t height,
                      int64_t width, int64_t num_rows, ffi::ThreadPool pool) {
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
  RunParts(pool, Parts(count * 9 * static_cast<int64_t>(bytes)),
           [&](int k, int parts) {
    const auto [begin, end] = PartRange(count, k, parts);
    for (int64_t s = begin; s < end; ++s) {
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
  });
  return ffi::Error::Success();
}

// `out[b, p, q, (i * kw + j) * C + c] = x[b, p * sh + i - top, q * sw + j -
// left, c]`, zero where that lies outside the map: a convolution's input
// windows as rows, what `conv.patches` computes (`conv._rows`, a dense
// convolution with few output positions as one row matmul).
// Why: XLA:CPU pads the map, slices it once per tap and concatenates the
// slices, a pass each; at batch 1 the concatenation of a 14x14x256 map's
// nine taps alone took about 175 us (ImageNet ResNet-101 on a 2-core AMD
// EPYC; BUILD.md, "On an AVX-512 EPYC (Zen 4) again"). Here each tap's
// row is one copy.
ffi::Error Windows(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out,
                   int64_t kh, int64_t kw, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_left,
                   ffi::ThreadPool pool) {
  const auto d = x.dimensions();
  const auto o = out->dimensions();
  if (d.size() != 4 || o.size() != 4 || o[0] != d[0] ||
      o[3] != kh * kw * d[3] || kh < 1 || kw < 1 || stride_h < 1 ||
      stride_w < 1) {
    return ffi::Error::InvalidArgument("windows: shapes do not match");
  }
  const int64_t height = d[1], width = d[2], channels = d[3];
  const int64_t out_h = o[1], out_w = o[2];
  const float* in = x.typed_data();
  float* dst = out->typed_data();
  const size_t bytes = channels * sizeof(float);
  const int64_t lines = o[0] * out_h;  // One output row of the map each.
  RunParts(pool, Parts(out->element_count() * sizeof(float)),
           [&](int k, int parts) {
    const auto [begin, end] = PartRange(lines, k, parts);
    for (int64_t l = begin; l < end; ++l) {
      const int64_t b = l / out_h, p = l % out_h;
      float* to = dst + l * out_w * kh * kw * channels;
      for (int64_t q = 0; q < out_w; ++q) {
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t r = p * stride_h + i - pad_top;
          for (int64_t j = 0; j < kw; ++j, to += channels) {
            const int64_t c = q * stride_w + j - pad_left;
            if (r < 0 || r >= height || c < 0 || c >= width) {
              std::memset(to, 0, bytes);
            } else {
              std::memcpy(to, in + ((b * height + r) * width + c) * channels,
                          bytes);
            }
          }
        }
      }
    }
  });
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

// Vectors of 16, 8 and 4 floats: one AVX-512, AVX2 or SSE register each.
typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));

template <typename V>
inline __attribute__((always_inline)) V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of a vector's lanes, halving it (a tree, not a chain of adds).
template <typename H, typename V>
inline __attribute__((always_inline)) H Halves(V v) {
  H lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  return lo + hi;
}
inline __attribute__((always_inline)) float LaneSum(V4 v) {
  return (v[0] + v[2]) + (v[1] + v[3]);
}
inline __attribute__((always_inline)) float LaneSum(V8 v) {
  return LaneSum(Halves<V4>(v));
}
inline __attribute__((always_inline)) float LaneSum(V16 v) {
  return LaneSum(Halves<V8>(v));
}

// `acc[t] = sum over c in [c0, c1) of x[c] * k[t * stride + c]`, t < 9,
// with vectors `V` of channels: nine vector accumulators, summed across
// lanes once at the end.
template <typename V>
inline __attribute__((always_inline)) void TapSumsOf(
    const float* __restrict x, const float* __restrict k, int64_t stride,
    int64_t c0, int64_t c1, float* __restrict acc) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(float);
  V a[9] = {};
  int64_t c = c0;
  for (; c + kLanes <= c1; c += kLanes) {
    const V v = Load<V>(x + c);
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) a[t] += v * Load<V>(k + t * stride + c);
  }
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t) {
    float sum = LaneSum(a[t]);
    for (int64_t j = c; j < c1; ++j) sum += x[j] * k[t * stride + j];
    acc[t] = sum;
  }
}

// `TapSumsOf` on AVX-512, AVX2 and SSE vectors: the bodies `TapSums` picks
// from, each named so that tests run every one the CPU has (`SactTapSums`),
// not only the one it picks.
__attribute__((target("arch=x86-64-v4"))) void TapSums16(
    const float* x, const float* k, int64_t stride, int64_t c0, int64_t c1,
    float* acc) {
  TapSumsOf<V16>(x, k, stride, c0, c1, acc);
}
__attribute__((target("arch=x86-64-v3"))) void TapSums8(
    const float* x, const float* k, int64_t stride, int64_t c0, int64_t c1,
    float* acc) {
  TapSumsOf<V8>(x, k, stride, c0, c1, acc);
}
void TapSums4(const float* x, const float* k, int64_t stride, int64_t c0,
              int64_t c1, float* acc) {
  TapSumsOf<V4>(x, k, stride, c0, c1, acc);
}

// A row's share of the 9 taps of a halting head's folded local conv
// (`SactHead.taps_affine`): the body of the widest vectors the CPU has,
// picked at load time (the library is built without -march, so that one
// build serves any x86-64 CPU). Why vectors written out: the same loop as
// `omp simd` with nine scalar reductions summed each accumulator's lanes
// one by one through the stack; on the Intel Xeon VM (one core, rows in
// L2) 86.7 against 69.5 ns a row of 256 channels, 281 against 259 of 1024.
__attribute__((target("arch=x86-64-v4"))) void TapSums(
    const float* x, const float* k, int64_t stride, int64_t c0, int64_t c1,
    float* acc) {
  TapSums16(x, k, stride, c0, c1, acc);
}
__attribute__((target("arch=x86-64-v3"))) void TapSums(
    const float* x, const float* k, int64_t stride, int64_t c0, int64_t c1,
    float* acc) {
  TapSums8(x, k, stride, c0, c1, acc);
}
__attribute__((target("default"))) void TapSums(
    const float* x, const float* k, int64_t stride, int64_t c0, int64_t c1,
    float* acc) {
  TapSums4(x, k, stride, c0, c1, acc);
}

// Per-part partial tap sums of `count` rows, added up into `taps[idx[s]]`
// with the shift, for the rows inside the map.
class Taps {
 public:
  Taps(int parts, int64_t count)
      : count_(count), partial_(parts * count * 9) {}
  float* Of(int k, int64_t s) { return partial_.data() + (k * count_ + s) * 9; }
  void AddUp(int parts, const int32_t* idx, const float* shift,
             int64_t num_rows, float* taps) {
    for (int64_t s = 0; s < count_; ++s) {
      const int64_t i = idx[s];
      if (i < 0 || i >= num_rows) continue;
      for (int64_t t = 0; t < 9; ++t) {
        float sum = shift[t];
        for (int k = 0; k < parts; ++k) sum += Of(k, s)[t];
        taps[i * 9 + t] = sum;
      }
    }
  }

 private:
  int64_t count_;
  std::vector<float> partial_;
};

// The active rows' update of a SACT block's maps (`rows.update_rows`): for
// each row `s` whose index `i = idx[s]` lies in the map (padding indices
// do not), `out[i] += weight[s] * res[s]` and, with `update_x`,
// `x[i] += res[s]`, `xsum[i / hw] += res[s]`, with a tap kernel `k`
// (`[9, C]`, else `[0, C]`) `taps[i] = x[i] . k + shift` (of the new
// `x[i]`), and where `rows` has a row per index, `rows[s]` = the new
// `x[i]` (0 at padding indices).
// Why: XLA runs each of these as a scatter of its own, on one thread, and
// reads the residual three times and `x`'s rows twice; this reads each
// once, in two parts where its bytes pay for them (`RunParts`), each part
// a range of channels.
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
                      int64_t update_x, ffi::ThreadPool pool) {
  const int64_t num_rows = x_in.dimensions()[0];
  const int64_t channels = x_in.dimensions()[1];
  const int64_t count = idx.dimensions()[0];
  const int64_t images = xsum_in.dimensions()[0];
  const bool with_rows = update_x && rows_out->dimensions()[0] == count;
  const bool with_taps = update_x && k.dimensions()[0] == 9;
  if (hw < 1 || out_in.dimensions()[0] != num_rows ||
      res.dimensions()[0] != count || res.dimensions()[1] != channels ||
      (with_taps && !TapsFit(k, shift, taps_in, channels, num_rows))) {
    return ffi::Error::InvalidArgument("update rows: shapes disagree");
  }
  InPlace(x_in, x_out);
  InPlace(out_in, out_out);
  InPlace(xsum_in, xsum_out);
  InPlace(taps_in, taps_out);
  float* x = x_out->typed_data();
  float* out = out_out->typed_data();
  float* xsum = xsum_out->typed_data();
  float* rows = rows_out->typed_data();
  const float* r = res.typed_data();
  const float* w = weight.typed_data();
  const float* kernel = k.typed_data();
  const int32_t* at = idx.typed_data();
  // Each part a range of channels, of whole cache lines (no two parts
  // write to one line).
  const int parts =
      Parts(count * channels * static_cast<int64_t>(sizeof(float)));
  Taps taps(with_taps ? parts : 0, count);
  RunParts(pool, parts, [&](int k, int n) {
    const auto [c0, c1] = PartRange(channels, k, n, 16);
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
      if (with_taps) TapSums(xi, kernel, channels, c0, c1, taps.Of(k, s));
      if (row) std::memcpy(row + c0, xi + c0, (c1 - c0) * sizeof(float));
    }
  });
  if (with_taps) {
    taps.AddUp(parts, at, shift.typed_data(), num_rows,
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
                   ffi::ResultBuffer<ffi::F32> taps_out,
                   ffi::ThreadPool pool) {
  const int64_t num_rows = x_in.dimensions()[0];
  const int64_t channels = x_in.dimensions()[1];
  const int64_t count = idx.dimensions()[0];
  if (!TapsFit(k, shift, taps_in, channels, num_rows)) {
    return ffi::Error::InvalidArgument("row taps: shapes disagree");
  }
  InPlace(taps_in, taps_out);
  const float* x = x_in.typed_data();
  const float* kernel = k.typed_data();
  const int32_t* at = idx.typed_data();
  const int parts =
      Parts(count * channels * static_cast<int64_t>(sizeof(float)));
  Taps taps(parts, count);
  RunParts(pool, parts, [&](int k, int n) {
    const auto [c0, c1] = PartRange(channels, k, n, 16);
    for (int64_t s = 0; s < count; ++s) {
      const int64_t i = at[s];
      if (i < 0 || i >= num_rows) continue;
      TapSums(x + i * channels, kernel, channels, c0, c1, taps.Of(k, s));
    }
  });
  taps.AddUp(parts, at, shift.typed_data(), num_rows, taps_out->typed_data());
  return ffi::Error::Success();
}

// Rows `UpdateDense` prefetches ahead of the one it works on: each row is
// read once, and alternating a row's loads with its tap sums left the
// loads unhidden (block 1's maps at batch 32, 2 cores: 23.6 ms without,
// 20-22 ms with 2-16 rows ahead).
constexpr int64_t kAhead = 4;

// A densely run unit's update of a SACT block's maps and the next head's
// tap products (`rows.update_dense`): for every row `i` with
// `weight[i] != 0` (the running positions: a halted one's weight,
// running * (1 - cumulative), is 0) `out[i] += weight[i] * res[i]` and
// `x[i] += res[i]`; then for every row `xsum[i / hw] += x[i]` (a fresh
// sum of the new map) and `taps[i] = x[i] . k + shift`. With `res` of no
// rows nothing is updated: the sums and taps of `x` alone (a block's first
// head), and the results `x` and `out` have no rows. With `out` of no rows
// (but a residual) `out` starts as `x` (a block's second unit: the output
// so far is the first unit's) and is written fresh, `out[i] = x[i] +
// weight[i] * res[i]` from `x` before the update, where XLA would copy `x`
// to alias `out` (11 ms at 56x56x256, batch 32, on one of the two
// threads). With `weight` of no rows (but a residual) every row is
// updated, `x[i] += res[i]`, and `out` is neither read nor written (a
// block's first unit: its shortcut plus its residual). With a `bias` of
// `C` (else none) the residual is `res[i] + bias`: a last conv's bias
// added here rather than in a pass of its own over the map (XLA's, 4-9 ms
// at 56x56x256, batch 32). Why one pass: XLA runs the masked residual, the
// output sum, the spatial sum and the head's tap products as four passes
// over the map (at 56x56x256, batch 32, 102 MB each); this reads each row
// once. The parts split the rows, at image boundaries where there are as
// many images as parts, so that each image's sum is one part's, in row
// order.
ffi::Error UpdateDense(ffi::Buffer<ffi::F32> x_in, ffi::Buffer<ffi::F32> out_in,
                       ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::F32> weight,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> shift,
                       ffi::ResultBuffer<ffi::F32> x_out,
                       ffi::ResultBuffer<ffi::F32> out_out,
                       ffi::ResultBuffer<ffi::F32> xsum_out,
                       ffi::ResultBuffer<ffi::F32> taps_out, int64_t hw,
                       ffi::ThreadPool pool) {
  // Maps of any rank, rows of their last dimension: `[B, H, W, C]` maps
  // as they are (`rows.update_dense` says why).
  const int64_t channels = x_in.dimensions().back();
  const int64_t num_rows = channels ? x_in.element_count() / channels : 0;
  const int64_t images = xsum_out->dimensions()[0];
  const bool update = res.element_count() > 0;
  const bool plain = update && weight.element_count() == 0;
  const bool out_is_x = update && !plain && out_in.element_count() == 0;
  const bool with_bias = update && bias.element_count() > 0;
  if (hw < 1 || images * hw != num_rows ||
      xsum_out->dimensions()[1] != channels ||
      (update && (res.element_count() != num_rows * channels ||
                  x_out->element_count() != num_rows * channels ||
                  (with_bias && bias.element_count() != channels))) ||
      (update && !plain &&
       ((!out_is_x && out_in.element_count() != num_rows * channels) ||
        out_out->element_count() != num_rows * channels ||
        weight.element_count() != num_rows)) ||
      k.dimensions()[0] != 9 || k.dimensions()[1] != channels ||
      shift.element_count() != 9 || taps_out->element_count() != num_rows * 9) {
    return ffi::Error::InvalidArgument("update dense: shapes disagree");
  }
  if (update) {
    InPlace(x_in.typed_data(), x_out->typed_data(), x_in.element_count());
    if (!out_is_x && !plain) {
      InPlace(out_in.typed_data(), out_out->typed_data(),
              out_in.element_count());
    }
  }
  // Without an update `x` is only read (the results `x` and `out` have no
  // rows then).
  float* x = update ? x_out->typed_data()
                    : const_cast<float*>(x_in.typed_data());
  float* out = out_out->typed_data();
  float* taps = taps_out->typed_data();
  const float* r = res.typed_data();
  const float* w = weight.typed_data();
  const float* b = bias.typed_data();
  const float* kernel = k.typed_data();
  const float* add = shift.typed_data();
  const int parts = Parts((update ? 5 : 1) * num_rows * channels *
                          static_cast<int64_t>(sizeof(float)));
  // Part 0 sums into the result, the others into sums of their own.
  std::vector<float> own((parts - 1) * images * channels, 0.0f);
  // A biased residual row per part.
  std::vector<float> scratch(with_bias ? parts * channels : 0);
  std::fill(xsum_out->typed_data(),
            xsum_out->typed_data() + images * channels, 0.0f);
  RunParts(pool, parts, [&](int part, int n) {
    const auto [begin, end] =
        PartRange(num_rows, part, n, images >= n ? hw : 1);
    float* sums = part == 0 ? xsum_out->typed_data()
                            : own.data() + (part - 1) * images * channels;
    float* __restrict biased = scratch.data() + part * channels;
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict xi = x + i * channels;
      float* __restrict sum = sums + (i / hw) * channels;
      const float wi = update && !plain ? w[i] : 0.0f;
      if (i + kAhead < end) {
        for (int64_t c = 0; c < channels; c += 16) {
          __builtin_prefetch(xi + kAhead * channels + c, 1);
          if (update) {
            __builtin_prefetch(r + (i + kAhead) * channels + c, 0);
            if (!out_is_x && !plain) {
              __builtin_prefetch(out + (i + kAhead) * channels + c, 1);
            }
          }
        }
      }
      const float* __restrict ri = update ? r + i * channels : nullptr;
      if (with_bias && (plain || wi != 0.0f)) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) biased[c] = ri[c] + b[c];
        ri = biased;
      }
      if (plain) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          xi[c] += ri[c];
          sum[c] += xi[c];
        }
      } else if (out_is_x) {
        float* __restrict o = out + i * channels;
        if (wi != 0.0f) {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            o[c] = xi[c] + wi * ri[c];
            xi[c] += ri[c];
            sum[c] += xi[c];
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            o[c] = xi[c];
            sum[c] += xi[c];
          }
        }
      } else if (wi != 0.0f) {
        float* __restrict o = out + i * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          o[c] += wi * ri[c];
          xi[c] += ri[c];
          sum[c] += xi[c];
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) sum[c] += xi[c];
      }
      sact_jax::TapProducts(xi, kernel, add, channels, taps + i * 9);
    }
  });
  float* xsum = xsum_out->typed_data();
  for (int p = 1; p < parts; ++p) {
    const float* sums = own.data() + (p - 1) * images * channels;
    for (int64_t j = 0; j < images * channels; ++j) xsum[j] += sums[j];
  }
  return ffi::Error::Success();
}

}  // namespace

namespace sact_jax {

// Not multiversioned itself: a call from another file reaches `TapSums`'
// resolver through it.
void TapProducts(const float* x, const float* k, const float* shift,
                 int64_t channels, float* taps) {
  float acc[9];
  TapSums(x, k, channels, 0, channels, acc);
  for (int t = 0; t < 9; ++t) taps[t] = acc[t] + shift[t];
}

}  // namespace sact_jax

// For tests (`onednn.tap_sums`): `TapSums`' body on vectors of `width`
// floats (16, 8 or 4), whose instructions the caller made sure the CPU has;
// 0, or -1 for another width.
extern "C" int SactTapSums(int width, const float* x, const float* k,
                           int64_t stride, int64_t c0, int64_t c1,
                           float* acc) {
  if (width == 16) {
    TapSums16(x, k, stride, c0, c1, acc);
  } else if (width == 8) {
    TapSums8(x, k, stride, c0, c1, acc);
  } else if (width == 4) {
    TapSums4(x, k, stride, c0, c1, acc);
  } else {
    return -1;
  }
  return 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactRowPatches3x3, Patches3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("num_rows")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactWindows, Windows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Ctx<ffi::ThreadPool>());

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
                                  .Attr<int64_t>("update_x")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactRowTaps, RowTaps,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // taps
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactUpdateDense, UpdateDense,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // res
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // xsum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // taps
                                  .Attr<int64_t>("hw")
                                  .Ctx<ffi::ThreadPool>());
