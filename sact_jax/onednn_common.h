// What onednn_conv.cc and row_stages.cc share: oneDNN's CPU engine, the
// lock that lets one oneDNN pass run at a time, OpenMP's thread count held
// at one, one-thread matmuls of row tiles by packed matrices, and a row's
// batch norm and ReLU.
#ifndef SACT_JAX_ONEDNN_COMMON_H_
#define SACT_JAX_ONEDNN_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"

namespace sact_jax {

// Inline functions: one engine and one lock in the library, whichever
// source file asks.
inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One pass runs at a time in the process. XLA:CPU runs independent
// operations concurrently on its threads, and two executions of one
// primitive at once (two same-shaped kernel gradients of a backward pass)
// share its scratchpad and the spin barrier inside oneDNN's kernel: one
// thread was seen spinning at that barrier for 16 minutes. A pass large
// enough to pay for them uses every core through OpenMP anyway.
inline std::mutex& RunMutex() {
  static std::mutex mu;
  return mu;
}

// One OpenMP thread for the current thread while in scope.
class OneThread {
 public:
  OneThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// One-thread matmuls `[m, k] x [k, n]` of plain row-major `a` and `c`
// against `b` packed once per call into the layout oneDNN's matmul prefers
// (blocks of its rows and columns, the same at every `m`). Packed, a 64-row
// tile by ResNet-101's block-3 conv2 matrix (2304 -> 256) took 0.75 of its
// time with `b` read as it lies (oneDNN then packs it at every call), on
// one core of the Intel Xeon VM. Each thread brings its own scratchpad, so
// that two run at once.
class PackedMatmuls {
 public:
  PackedMatmuls(int64_t k, int64_t n) : k_(k), n_(n) {
    OneThread one;  // oneDNN sizes a primitive's team when it is built.
    b_plain_ = dnnl::memory::desc({k, n}, dt::f32, tag::ab);
    auto pd = Desc(kRowsForLayout, dnnl::memory::desc({k, n}, dt::f32,
                                                      tag::any));
    b_packed_ = pd.weights_desc();
    pack_ = dnnl::reorder(dnnl::reorder::primitive_desc(
        Engine(), b_plain_, Engine(), b_packed_));
    packed_.resize(b_packed_.get_size() / sizeof(float) + 1);
  }

  // Builds the matmul of `m` rows (before the threads that run it start:
  // the caller holds RunMutex()).
  void Prepare(int64_t m) {
    auto& slot = by_rows_[m];
    if (slot.scratch_bytes >= 0) return;
    OneThread one;
    auto pd = Desc(m, b_packed_);
    slot.prim = dnnl::matmul(pd);
    slot.scratch_bytes =
        static_cast<int64_t>(pd.scratchpad_desc().get_size());
  }

  // Packs `b` (`[k, n]`, row-major) for the calls that follow.
  void Pack(const float* b) {
    OneThread one;
    dnnl::stream stream(Engine());
    dnnl::memory from(b_plain_, Engine(), const_cast<float*>(b));
    dnnl::memory to(b_packed_, Engine(), packed_.data());
    pack_.execute(stream, from, to);
    stream.wait();
  }

  // `c = a @ b` for `m` rows (`Prepare`d); `scratch` grows as needed.
  void Run(int64_t m, const float* a, float* c,
           std::vector<char>& scratch) const {
    const Rows& rows = by_rows_.at(m);
    if (static_cast<int64_t>(scratch.size()) < rows.scratch_bytes) {
      scratch.resize(rows.scratch_bytes);
    }
    dnnl::stream stream(Engine());
    dnnl::memory am(dnnl::memory::desc({m, k_}, dt::f32, tag::ab), Engine(),
                    const_cast<float*>(a));
    dnnl::memory bm(b_packed_, Engine(),
                    const_cast<float*>(packed_.data()));
    dnnl::memory cm(dnnl::memory::desc({m, n_}, dt::f32, tag::ab), Engine(),
                    c);
    dnnl::memory sm(dnnl::memory::desc({rows.scratch_bytes}, dt::u8, tag::a),
                    Engine(), scratch.data());
    rows.prim.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm},
                               {DNNL_ARG_DST, cm},
                               {DNNL_ARG_SCRATCHPAD, sm}});
    stream.wait();
  }

 private:
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  static constexpr int64_t kRowsForLayout = 64;

  struct Rows {
    dnnl::matmul prim;
    int64_t scratch_bytes = -1;
  };

  dnnl::matmul::primitive_desc Desc(int64_t m,
                                    const dnnl::memory::desc& b) const {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return dnnl::matmul::primitive_desc(
        Engine(), dnnl::memory::desc({m, k_}, dt::f32, tag::ab), b,
        dnnl::memory::desc({m, n_}, dt::f32, tag::ab), attr);
  }

  int64_t k_, n_;
  dnnl::memory::desc b_plain_, b_packed_;
  dnnl::reorder pack_;
  std::vector<float> packed_;  // Allocated once: no page faults per call.
  std::map<int64_t, Rows> by_rows_;
};

// The packed matmuls by a `[k, n]` matrix, built once per shape. The
// caller holds RunMutex() while it uses them (one call packs its matrix
// and runs its rows before the next).
inline PackedMatmuls& GetPackedMatmuls(int64_t k, int64_t n) {
  static std::map<std::pair<int64_t, int64_t>,
                  std::unique_ptr<PackedMatmuls>> cache;
  auto& slot = cache[{k, n}];
  if (!slot) slot = std::make_unique<PackedMatmuls>(k, n);
  return *slot;
}

// `to[c] = max(from[c] * scale[c] + shift[c], 0)` for a row of `n`.
inline void AffineRelu(const float* from, const float* __restrict scale,
                       const float* __restrict shift, int64_t n, float* to) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    to[c] = std::max(from[c] * scale[c] + shift[c], 0.0f);
  }
}

}  // namespace sact_jax

#endif  // SACT_JAX_ONEDNN_COMMON_H_
