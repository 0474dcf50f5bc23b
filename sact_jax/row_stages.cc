// A sparse bottleneck unit's two stages at all of their rows, each as one
// XLA FFI custom call (`sparse.stages`, `onednn.dilated_rows` /
// `onednn.active_rows`):
//
// * dilated: `y[i] = relu(relu(x[i] * s0 + t0) @ w1 * s1 + t1)` at the
//   dilated rows `i`, written into the map `y`, and optionally the next
//   head's tap products of `x[i]` (as row_gather.cc's `RowTaps`);
// * active: the residual `r = relu(patches3x3(y)[i] @ w2 * s2 + t2) @ w3 +
//   b3` at the active rows, and the block's update with it (as
//   row_gather.cc's `UpdateRows`, with the weight `1 - cumulative[i]`:
//   `out`, and with `update_x` also `x`, the per-image sums and the next
//   head's tap products).
//
// Why: as XLA operations and single custom calls in a loop over chunks of
// rows, each stage wrote its gathered rows (and the active stage its
// patches and residual) to memory and read them back, ran the gathers and
// elementwise passes on one thread, and oneDNN packed each matrix again
// for every chunk. Here each matrix is packed once per call, and the rows
// go through in tiles that stay in cache: two threads take the tiles in
// turn and per tile gather, multiply (oneDNN, one thread), apply the
// affine maps and scatter, so one thread's gathers overlap the other's
// matmuls.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "onednn_common.h"
#include "row_passes.h"
#include "run_parts.h"

namespace ffi = xla::ffi;

namespace {

using sact_jax::AffineRelu;
using sact_jax::GetPackedMatmuls;
using sact_jax::InPlace;
using sact_jax::OneThread;
using sact_jax::PackedMatmuls;
using sact_jax::RunParts;
using sact_jax::TapsFit;

// Rows ahead whose data a gather or an update prefetches while it works on
// a row: the rows lie at scattered positions, which the CPU's own
// prefetcher does not guess (alone, at 56x56x256 with half the positions,
// the active stage took 35.5-37.5 ms without, 29-31 with these and
// `kWarmBytes`).
constexpr int64_t kAhead = 4;

// Bytes of `x` and `out` rows an active tile prefetches into L2 for its
// update: at most ResNet-101's first three blocks' tiles (452-512 KB); the
// last block's (1 MB, beside 1.2 MB of 3x3 windows) would push them out.
constexpr size_t kWarmBytes = 768 << 10;

// Rows per tile: enough floats of gathered input (`kTileFloats`) that each
// oneDNN call has work to pay for itself (on the Intel Xeon VM, in the
// model, the dilated stage of ResNet-101's first block, 256 -> 64 at 67487
// rows, took 23-28 ms in 64-row tiles and 16.2 ms in 512-row ones), at
// least 64 (where a one-thread matmul by a packed ResNet-101 matrix ran
// within noise of 128-512 rows) and at most 1024. 64 rows of the widest
// input, the last block's 3x3 windows (18 KB a row), stay in a 2 MB L2
// cache.
constexpr int64_t kTileFloats = 1 << 17;

int64_t TileRows(int64_t floats_per_row) {
  return std::clamp<int64_t>(kTileFloats / std::max<int64_t>(floats_per_row,
                                                             1), 64, 1024);
}

// The rows `s` whose index lies in the map, in order (padding indices,
// `>= num_rows`, do nothing in either stage).
std::vector<int64_t> ValidRows(const int32_t* idx, int64_t count,
                               int64_t num_rows) {
  std::vector<int64_t> rows;
  rows.reserve(count);
  for (int64_t s = 0; s < count; ++s) {
    if (idx[s] >= 0 && idx[s] < num_rows) rows.push_back(s);
  }
  return rows;
}

// Unit `unit`'s matrix of a stack `[U, K, N]`, or the matrix `[K, N]`;
// null if `w` is neither or a stack comes without one unit index.
const float* Matrix(const ffi::Buffer<ffi::F32>& w,
                    const ffi::Buffer<ffi::S32>& unit, int64_t k,
                    int64_t n) {
  auto d = w.dimensions();
  if (d.size() < 2 || d[d.size() - 2] != k || d.back() != n) return nullptr;
  if (d.size() == 2) return w.typed_data();
  if (d.size() != 3 || unit.element_count() != 1) return nullptr;
  // Clamped as XLA clamps a dynamic slice.
  const int64_t u = std::clamp<int64_t>(unit.typed_data()[0], 0, d[0] - 1);
  return w.typed_data() + u * k * n;
}

// Tiles `[begin, end)` of `count` valid rows (`ValidRows`), at most
// `tile_rows` each.
std::vector<std::pair<int64_t, int64_t>> Tiles(int64_t count,
                                               int64_t tile_rows) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t b = 0; b < count; b += tile_rows) {
    tiles.emplace_back(b, std::min(count, b + tile_rows));
  }
  return tiles;
}

// Rows each matmul runs: a tile's rows rounded up to a multiple of 8 (the
// caller zeroes the extra input rows and ignores their output), so that
// the matmuls built per row count (0.2 ms and about 100 KB each) are at
// most 128 per matrix whatever the set sizes a long run sees.
int64_t MatmulRows(int64_t rows) { return (rows + 7) / 8 * 8; }

// Runs `tile(t)` for every tile on two threads where there are two tiles
// or more (`RunParts`), each taking the next tile not yet taken. Why not
// halves: a thread of XLA's pool may start late or share a CPU for a
// while; with halves the call waits for the slow half (on the Intel Xeon
// VM, timed inside a call of 4235 rows, one half took 16.2 ms and the
// other, started 3.7 ms late, 11.7 ms, where calls of 3997 and 4573 rows
// took 8.0 and 9.2 ms), where tiles taken in turn go to whichever thread
// runs. Returns false if a tile threw (nothing may reach XLA's pool).
template <typename Tile>
bool RunTiles(ffi::ThreadPool& pool, int64_t count, const Tile& tile) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  const int parts = count > 1 && omp_get_max_threads() > 1 ? 2 : 1;
  RunParts(pool, parts, [&](int, int) {
    try {
      OneThread one;
      for (int64_t t = next++; t < count && ok; t = next++) tile(t);
    } catch (const std::exception&) {
      ok = false;
    }
  });
  return ok;
}

// Builds `m`'s matmuls for every tile size. The caller holds RunMutex().
void PrepareTiles(PackedMatmuls& m,
                  const std::vector<std::pair<int64_t, int64_t>>& tiles) {
  for (const auto& [begin, end] : tiles) m.Prepare(MatmulRows(end - begin));
}

ffi::Error Failed(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("row stages: ") + what);
}

// The dilated stage into `y` (`[N + 1, D]`, aliased; rows not in `idx`
// unchanged) and, with a tap kernel `k` of 9 rows, the tap products
// `taps[i] = x[i] . k + shift` (`[N + 1, 9]`, aliased) of the next head at
// the same rows: a head's 3x3 window at an active row reads them at its
// neighbours, the dilated rows. Why here: the stage has each row of `x` in
// cache; a pass of its own read the rows again (at 14x14x1024, batch 32,
// 2-3 ms a unit where the stage took 10).
ffi::Error DilatedRows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> idx,
                       ffi::Buffer<ffi::F32> s0, ffi::Buffer<ffi::F32> t0,
                       ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> s1,
                       ffi::Buffer<ffi::F32> t1, ffi::Buffer<ffi::S32> unit,
                       ffi::Buffer<ffi::F32> y_in, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> shift,
                       ffi::Buffer<ffi::F32> taps_in,
                       ffi::ResultBuffer<ffi::F32> y_out,
                       ffi::ResultBuffer<ffi::F32> taps_out,
                       ffi::ThreadPool pool) try {
  const int64_t num_rows = x.dimensions()[0], channels = x.dimensions()[1];
  const int64_t depth = y_in.dimensions()[1];
  const bool with_taps = k.dimensions()[0] == 9;
  const float* wp = Matrix(w1, unit, channels, depth);
  if (!wp || s0.element_count() != channels || t0.element_count() != channels ||
      s1.element_count() != depth || t1.element_count() != depth ||
      y_in.dimensions()[0] < num_rows ||
      (with_taps && !TapsFit(k, shift, taps_in, channels, num_rows))) {
    return ffi::Error::InvalidArgument("dilated rows: shapes disagree");
  }
  InPlace(y_in, y_out);
  InPlace(taps_in, taps_out);
  const int32_t* at = idx.typed_data();
  const std::vector<int64_t> valid =
      ValidRows(at, idx.element_count(), num_rows);
  const auto tiles = Tiles(valid.size(), TileRows(channels));
  if (tiles.empty()) return ffi::Error::Success();  // Nothing to pack.
  std::lock_guard<std::mutex> lock(sact_jax::RunMutex());
  PackedMatmuls& matmul = GetPackedMatmuls(channels, depth);
  PrepareTiles(matmul, tiles);
  matmul.Pack(wp);
  const float *xs = x.typed_data(), *a0 = s0.typed_data(),
              *b0 = t0.typed_data(), *a1 = s1.typed_data(),
              *b1 = t1.typed_data(), *kernel = k.typed_data(),
              *tap_shift = shift.typed_data();
  float *y = y_out->typed_data(), *taps = taps_out->typed_data();
  bool ok = RunTiles(pool, tiles.size(), [&](int64_t t) {
    const auto [begin, end] = tiles[t];
    thread_local std::vector<float> a, c;
    thread_local std::vector<char> scratch;
    const int64_t rows = end - begin, m = MatmulRows(rows);
    a.resize(m * channels);
    c.resize(m * depth);
    for (int64_t r = 0; r < rows; ++r) {
      if (r + kAhead < rows) {
        const float* ahead = xs + at[valid[begin + r + kAhead]] * channels;
        for (int64_t c = 0; c < channels; c += 16) {
          __builtin_prefetch(ahead + c, 0);
        }
      }
      const int64_t i = at[valid[begin + r]];
      AffineRelu(xs + i * channels, a0, b0, channels,
                 a.data() + r * channels);
      if (with_taps) {
        sact_jax::TapProducts(xs + i * channels, kernel, tap_shift, channels,
                              taps + i * 9);
      }
    }
    std::fill(a.data() + rows * channels, a.data() + m * channels, 0.0f);
    matmul.Run(m, a.data(), c.data(), scratch);
    for (int64_t r = 0; r < rows; ++r) {
      AffineRelu(c.data() + r * depth, a1, b1, depth,
                 y + at[valid[begin + r]] * depth);
    }
  });
  return ok ? ffi::Error::Success() : Failed("a dilated tile failed");
} catch (const std::exception& e) {
  return Failed(e.what());
}

// The active stage and the block's update at the active rows. `y` is the
// dilated stage's map with a zero row `N` (read outside the image); the
// maps and results as row_gather.cc's `UpdateRows` has them (a tap kernel
// `k` of 9 rows, else none).
ffi::Error ActiveRows(ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::S32> idx,
                      ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> s2,
                      ffi::Buffer<ffi::F32> t2, ffi::Buffer<ffi::F32> w3,
                      ffi::Buffer<ffi::F32> b3, ffi::Buffer<ffi::S32> unit,
                      ffi::Buffer<ffi::F32> cumulative,
                      ffi::Buffer<ffi::F32> x_in, ffi::Buffer<ffi::F32> out_in,
                      ffi::Buffer<ffi::F32> xsum_in,
                      ffi::Buffer<ffi::F32> taps_in, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> shift,
                      ffi::ResultBuffer<ffi::F32> x_out,
                      ffi::ResultBuffer<ffi::F32> out_out,
                      ffi::ResultBuffer<ffi::F32> xsum_out,
                      ffi::ResultBuffer<ffi::F32> taps_out, int64_t height,
                      int64_t width, int64_t update_x,
                      ffi::ThreadPool pool) try {
  const int64_t num_rows = x_in.dimensions()[0];
  const int64_t channels = x_in.dimensions()[1];
  const int64_t depth = y.dimensions()[1];
  const int64_t count = idx.element_count();
  const int64_t images = xsum_in.dimensions()[0];
  const int64_t hw = height * width;
  const bool with_taps = update_x && k.dimensions()[0] == 9;
  const float* wa = Matrix(w2, unit, 9 * depth, depth);
  const float* wb = Matrix(w3, unit, depth, channels);
  if (!wa || !wb || hw < 1 || images * hw != num_rows ||
      y.dimensions()[0] != num_rows + 1 ||
      out_in.dimensions()[0] != num_rows ||
      xsum_in.dimensions()[1] != channels || s2.element_count() != depth ||
      t2.element_count() != depth || b3.element_count() != channels ||
      cumulative.element_count() != num_rows ||
      (with_taps && !TapsFit(k, shift, taps_in, channels, num_rows))) {
    return ffi::Error::InvalidArgument("active rows: shapes disagree");
  }
  InPlace(x_in, x_out);
  InPlace(out_in, out_out);
  InPlace(xsum_in, xsum_out);
  InPlace(taps_in, taps_out);
  const int32_t* at = idx.typed_data();
  const std::vector<int64_t> valid = ValidRows(at, count, num_rows);
  const auto tiles = Tiles(valid.size(), TileRows(9 * depth));
  if (tiles.empty()) return ffi::Error::Success();  // Nothing to pack.
  // With `update_x`, the rows of each image within each tile (a segment:
  // its first row and image; a tile's segments from `first_segment[t]`)
  // are summed into the segment's own row of `sums`, added to `xsum` in
  // order after: the same sums whichever thread ran which tile.
  std::vector<std::pair<int64_t, int64_t>> segments;
  std::vector<size_t> first_segment;
  for (const auto& [begin, end] : tiles) {
    first_segment.push_back(segments.size());
    for (int64_t r = begin; update_x && r < end; ++r) {
      const int64_t image = at[valid[r]] / hw;
      if (r == begin || image != segments.back().second) {
        segments.emplace_back(r, image);
      }
    }
  }
  first_segment.push_back(segments.size());
  std::lock_guard<std::mutex> lock(sact_jax::RunMutex());
  static std::vector<float> sums;  // Kept: no page faults per call.
  sums.assign(segments.size() * channels, 0.0f);
  PackedMatmuls& first = GetPackedMatmuls(9 * depth, depth);
  PackedMatmuls& second = GetPackedMatmuls(depth, channels);
  PrepareTiles(first, tiles);
  PrepareTiles(second, tiles);
  // The two matrices packed at once, one per thread.
  RunParts(pool, tiles.size() > 1 ? 2 : 1, [&](int k, int n) {
    if (k == 0) first.Pack(wa);
    if (k == 1 || n == 1) second.Pack(wb);
  });
  const float *src = y.typed_data(), *a2 = s2.typed_data(),
              *c2 = t2.typed_data(), *bias = b3.typed_data(),
              *done = cumulative.typed_data(), *kernel = k.typed_data(),
              *tap_shift = shift.typed_data();
  float *x = x_out->typed_data(), *out = out_out->typed_data(),
        *xsum = xsum_out->typed_data(), *taps = taps_out->typed_data();
  const size_t depth_bytes = depth * sizeof(float);
  bool ok = RunTiles(pool, tiles.size(), [&](int64_t tile) {
    const auto [begin, end] = tiles[tile];
    size_t segment = first_segment[tile];
    thread_local std::vector<float> a, z, r;
    thread_local std::vector<char> scratch;
    const int64_t rows = end - begin, m = MatmulRows(rows);
    a.resize(m * 9 * depth);
    z.resize(m * depth);
    r.resize(m * channels);
    const bool warm = rows * channels * 2 * sizeof(float) <= kWarmBytes;
    // The 3x3 windows, row-major taps, row `N` outside the image.
    for (int64_t q = 0; q < rows; ++q) {
      const int64_t c = at[valid[begin + q]];
      const int64_t i = (c % hw) / width, j = c % width;
      float* dst = a.data() + q * 9 * depth;
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t di = t / 3 - 1, dj = t % 3 - 1;
        const bool inside = i + di >= 0 && i + di < height && j + dj >= 0 &&
                            j + dj < width;
        const int64_t n = inside ? c + di * width + dj : num_rows;
        std::memcpy(dst + t * depth, src + n * depth, depth_bytes);
      }
      // The rows the update reads and writes, on their way to L2 while the
      // matmuls run (where they fit beside the tile's inputs).
      for (int64_t ch = 0; warm && ch < channels; ch += 16) {
        __builtin_prefetch(out + c * channels + ch, 1, 2);
        if (update_x) __builtin_prefetch(x + c * channels + ch, 1, 2);
      }
    }
    std::fill(a.data() + rows * 9 * depth, a.data() + m * 9 * depth, 0.0f);
    first.Run(m, a.data(), z.data(), scratch);
    for (int64_t q = 0; q < rows; ++q) {
      AffineRelu(z.data() + q * depth, a2, c2, depth, z.data() + q * depth);
    }
    second.Run(m, z.data(), r.data(), scratch);
    for (int64_t q = 0; q < rows; ++q) {
      const int64_t i = at[valid[begin + q]];
      if (q + kAhead < rows) {
        const int64_t ahead = at[valid[begin + q + kAhead]] * channels;
        for (int64_t c = 0; c < channels; c += 16) {
          __builtin_prefetch(out + ahead + c, 1);
          if (update_x) __builtin_prefetch(x + ahead + c, 1);
        }
      }
      float* __restrict rs = r.data() + q * channels;
      float* __restrict o = out + i * channels;
      const float ws = 1.0f - done[i];
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        rs[c] += bias[c];
        o[c] += ws * rs[c];
      }
      if (!update_x) continue;
      while (segment + 1 < first_segment[tile + 1] &&
             segments[segment + 1].first <= begin + q) {
        ++segment;
      }
      float* __restrict sum = sums.data() + segment * channels;
      float* __restrict xi = x + i * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        xi[c] += rs[c];
        sum[c] += rs[c];
      }
      if (with_taps) {
        sact_jax::TapProducts(xi, kernel, tap_shift, channels, taps + i * 9);
      }
    }
  });
  if (!ok) return Failed("an active tile failed");
  for (size_t k = 0; k < segments.size(); ++k) {
    float* __restrict to = xsum + segments[k].second * channels;
    const float* __restrict from = sums.data() + k * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) to[c] += from[c];
  }
  return ffi::Error::Success();
} catch (const std::exception& e) {
  return Failed(e.what());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactDilatedRows, DilatedRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t1
                                  .Arg<ffi::Buffer<ffi::S32>>()  // unit
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // taps
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // taps
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SactActiveRows, ActiveRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w3
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b3
                                  .Arg<ffi::Buffer<ffi::S32>>()  // unit
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cumul.
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xsum
                                  .Arg<ffi::Buffer<ffi::F32>>()  // taps
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // xsum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // taps
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("update_x")
                                  .Ctx<ffi::ThreadPool>());
