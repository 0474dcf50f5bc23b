// oneDNN's convolutions as XLA FFI custom calls, built and registered by
// onednn.py: forward, input gradient and kernel gradient of an NHWC x HWIO
// float32 convolution (any strides, zero padding before and after).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "onednn_common.h"
#include "run_parts.h"

namespace ffi = xla::ffi;
using sact_jax::AffineRelu;
using sact_jax::Engine;
using sact_jax::OneThread;
using sact_jax::RunMutex;
using sact_jax::RunParts;

namespace {

using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// Batch, input H and W, input and output channels, kernel H and W, strides
// along H and W, padding before H and W, output H and W (the padding after
// follows from them); and, for the forward, whether the primitive gets the
// weights in the layout it prefers (reordered on every call) rather than
// as HWIO, and which post-ops it ends in (`PostOps`).
struct Shape {
  int64_t v[15];
  bool operator==(const Shape& o) const {
    return std::memcmp(v, o.v, sizeof(v)) == 0;
  }
  int64_t n() const { return v[0]; }
  int64_t h() const { return v[1]; }
  int64_t w() const { return v[2]; }
  int64_t c() const { return v[3]; }
  int64_t o() const { return v[4]; }
  int64_t kh() const { return v[5]; }
  int64_t kw() const { return v[6]; }
  int64_t sh() const { return v[7]; }
  int64_t sw() const { return v[8]; }
  int64_t top() const { return v[9]; }
  int64_t left() const { return v[10]; }
  int64_t oh() const { return v[11]; }
  int64_t ow() const { return v[12]; }
  bool blocked_weights() const { return v[13] != 0; }
  int64_t post_ops() const { return v[14]; }
  dnnl::memory::dims strides() const { return {sh(), sw()}; }
  dnnl::memory::dims pad_l() const { return {top(), left()}; }
  dnnl::memory::dims pad_r() const {
    return {(oh() - 1) * sh() + kh() - h() - top(),
            (ow() - 1) * sw() + kw() - w() - left()};
  }
  // The input and the output (NHWC).
  dnnl::memory::desc x_desc() const {
    return dnnl::memory::desc({n(), c(), h(), w()}, dt::f32, tag::nhwc);
  }
  dnnl::memory::desc y_desc() const {
    return dnnl::memory::desc({n(), o(), oh(), ow()}, dt::f32, tag::nhwc);
  }
  // The weights as the user holds them (HWIO), or in whatever layout the
  // primitive prefers.
  dnnl::memory::desc w_desc(tag layout) const {
    return dnnl::memory::desc({o(), c(), kh(), kw()}, dt::f32, layout);
  }
  double flops() const {
    return 2.0 * n() * oh() * ow() * o() * c() * kh() * kw();
  }
};

// What a forward does to its output `y` while it is in cache, per output
// channel `c`, as oneDNN post-ops. XLA's pass over the output afterwards
// reads and writes the whole map (BUILD.md, "Batch norm, ReLU and the
// residual sum inside oneDNN's convolutions"):
// * kAffineRelu: `relu(y * scale[c] + shift[c])`, an inference unit's batch
//   norm and ReLU after conv1 and conv2 (conv.py's `conv_affine_relu`);
// * kBiasSum: `y + bias[c] + d`, `d` what the output buffer held before
//   (XLA passes it aliased): conv3 and its bias added into the residual
//   stream (conv.py's `conv_add_into`).
enum PostOps { kNone = 0, kAffineRelu = 1, kBiasSum = 2 };

dnnl::primitive_attr PostOpsAttr(int64_t kind,
                                 const dnnl::memory::desc& channels) {
  dnnl::post_ops ops;
  if (kind == kAffineRelu) {
    ops.append_binary(dnnl::algorithm::binary_mul, channels);
    ops.append_binary(dnnl::algorithm::binary_add, channels);
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
  } else if (kind == kBiasSum) {
    ops.append_sum();
    ops.append_binary(dnnl::algorithm::binary_add, channels);
  }
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  return attr;
}

// The post-ops and their per-channel operands: `a` the scale or the bias,
// `b` the shift (null where unused).
struct PostOpArgs {
  int64_t kind = kNone;
  const float* a = nullptr;
  const float* b = nullptr;
};

// `PostOpsAttr`'s operands as execution arguments.
void AddPostOpArgs(const PostOpArgs& post, const dnnl::memory::desc& channels,
                   std::unordered_map<int, dnnl::memory>& args) {
  auto at = [&](const float* p) {
    return dnnl::memory(channels, Engine(), const_cast<float*>(p));
  };
  if (post.kind == kAffineRelu) {
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = at(post.a);
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1] = at(post.b);
  } else if (post.kind == kBiasSum) {
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1] = at(post.a);
  }
}

struct ShapeHash {
  size_t operator()(const Shape& k) const {
    size_t h = 0;
    for (int64_t x : k.v) h = h * 1000003u ^ std::hash<int64_t>()(x);
    return h;
  }
};

// One pass's primitive, and the reorder between the user's HWIO weights and
// the layout the primitive chose (`format_tag::any`), if they differ.
struct Pass {
  dnnl::primitive prim;
  std::string kernel;  // oneDNN's name for it (the forward's only).
  dnnl::memory::desc x, w_user, w_prim, y;
  dnnl::memory::desc channels;  // `[1, O, 1, 1]`: the post-ops' operands.
  dnnl::reorder w_reorder;
  bool reorder = false;
  // The weights in the primitive's layout, allocated once: a fresh buffer
  // per call cost page faults on every call.
  dnnl::memory w_prim_buffer;
};

enum Kind { kForward, kInputGrad, kKernelGrad };

dnnl::convolution_forward::primitive_desc ForwardDesc(
    const Shape& s, const dnnl::memory::desc& x, const dnnl::memory::desc& y,
    dnnl::prop_kind prop, const dnnl::memory::desc& w,
    const dnnl::primitive_attr& attr = dnnl::primitive_attr()) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), prop, dnnl::algorithm::convolution_direct, x, w, y,
      s.strides(), s.pad_l(), s.pad_r(), attr);
}

// Whether oneDNN picked im2col + gemm for a convolution.
bool IsGemm(const dnnl::convolution_forward::primitive_desc& pd) {
  return std::string(pd.impl_info_str()).find("gemm") != std::string::npos;
}

// Whether oneDNN picked one of its brgemm-based direct kernels ("brgconv",
// "brgconv_1x1"), its fastest for float32 on AVX-512.
bool IsBrgemm(const dnnl::convolution_forward::primitive_desc& pd) {
  return std::string(pd.impl_info_str()).find("brg") != std::string::npos;
}

// oneDNN's failure as the pass's error (exceptions must not cross into
// XLA).
ffi::Error Failed(const std::exception& e) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("oneDNN convolution: ") + e.what());
}

std::unique_ptr<Pass> Build(Kind kind, const Shape& s) {
  auto pass = std::make_unique<Pass>();
  pass->x = s.x_desc();
  pass->y = s.y_desc();
  pass->w_user = s.w_desc(tag::hwio);
  if (kind == kForward) {
    // The forward reads the user's HWIO weights as they are unless the
    // caller asks for the blocked layout (onednn.py says when) or only
    // im2col + gemm would take HWIO (AVX2; the gradients everywhere, 3x
    // slower than with the layout the primitive prefers).
    pass->channels = dnnl::memory::desc({1, s.o(), 1, 1}, dt::f32,
                                        tag::nchw);
    dnnl::primitive_attr attr;
    if (s.post_ops() != kNone) attr = PostOpsAttr(s.post_ops(), pass->channels);
    auto pd = ForwardDesc(
        s, pass->x, pass->y, dnnl::prop_kind::forward_inference,
        s.w_desc(s.blocked_weights() ? tag::any : tag::hwio), attr);
    if (s.blocked_weights() && !IsBrgemm(pd)) {
      // oneDNN 3.2 gives a blocked layout brgconv only where the input has
      // enough channels: the ImageNet stem (3 -> 64, 7x7, stride 2) got its
      // older jit kernel, 1.9x slower at batch 32 than brgconv on HWIO.
      auto in_place = ForwardDesc(s, pass->x, pass->y,
                                  dnnl::prop_kind::forward_inference,
                                  s.w_desc(tag::hwio), attr);
      if (IsBrgemm(in_place)) pd = in_place;
    }
    if (IsGemm(pd)) {
      pd = ForwardDesc(s, pass->x, pass->y,
                       dnnl::prop_kind::forward_inference, s.w_desc(tag::any),
                       attr);
    }
    pass->prim = dnnl::convolution_forward(pd);
    pass->kernel = pd.impl_info_str();
    pass->w_prim = pd.weights_desc();
  } else if (kind == kInputGrad) {
    auto hint = ForwardDesc(s, pass->x, pass->y,
                            dnnl::prop_kind::forward_training,
                            s.w_desc(tag::any));
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, pass->x,
        s.w_desc(tag::any), pass->y, s.strides(), s.pad_l(), s.pad_r(), hint);
    pass->prim = dnnl::convolution_backward_data(pd);
    pass->w_prim = pd.weights_desc();
  } else {
    auto hint = ForwardDesc(s, pass->x, pass->y,
                            dnnl::prop_kind::forward_training,
                            s.w_desc(tag::any));
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, pass->x,
        s.w_desc(tag::any), pass->y, s.strides(), s.pad_l(), s.pad_r(), hint);
    pass->prim = dnnl::convolution_backward_weights(pd);
    pass->w_prim = pd.diff_weights_desc();
  }
  pass->reorder = pass->w_prim != pass->w_user;
  if (pass->reorder) {
    // Weights in (forward, input gradient) or the gradient out.
    bool in = kind != kKernelGrad;
    pass->w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        Engine(), in ? pass->w_user : pass->w_prim, Engine(),
        in ? pass->w_prim : pass->w_user));
    pass->w_prim_buffer = dnnl::memory(pass->w_prim, Engine());
  }
  return pass;
}

// Primitives are built once per pass and shape, as a framework caches them.
// The caller holds RunMutex().
Pass* Get(Kind kind, const Shape& shape) {
  static std::unordered_map<Shape, std::unique_ptr<Pass>, ShapeHash> cache[3];
  auto& slot = cache[kind][shape];
  if (!slot) slot = Build(kind, shape);
  return slot.get();
}

// The attributes every handler takes: strides, padding before, and (read
// by the forward only) whether to reorder the weights to a blocked layout.
struct ConvAttrs {
  int64_t stride_h, stride_w, pad_top, pad_left, blocked_weights;
};

Shape MakeShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                ffi::Span<const int64_t> y, const ConvAttrs& a,
                int64_t post_ops = kNone) {
  return Shape{{x[0], x[1], x[2], x[3], w[3], w[0], w[1], a.stride_h,
                a.stride_w, a.pad_top, a.pad_left, y[1], y[2],
                a.blocked_weights, post_ops}};
}

// OpenMP threads for one pass: at least kFlopsPerThread each, at most as
// many as OpenMP would use. Waking a thread team costs more than small
// convolutions gain from it (next to XLA's own threads): a CIFAR ResNet-110
// at batch 1 (4.7 MFLOP per convolution) ran 1.7x faster single-threaded,
// at batch 4 (19 MFLOP) 1.09x slower. oneDNN sizes a primitive's team when
// it is created, so the count is set before creation and execution alike.
constexpr double kFlopsPerThread = 6e6;

class ThreadsForPass {
 public:
  explicit ThreadsForPass(const Shape& shape) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(static_cast<int>(std::clamp(
        shape.flops() / kFlopsPerThread, 1.0, static_cast<double>(saved_))));
  }
  ~ThreadsForPass() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// forward: (x, w) -> y; input gradient: (dy, w) -> dx; kernel gradient:
// (x, dy) -> dw. `x`, `w` and `y` point at the input, kernel and output
// (or their gradients), whichever are operands and result of the pass.
// `post`: the forward's post-ops' operands. oneDNN reports failures as
// exceptions, which must not cross into XLA.
ffi::Error Run(Kind kind, const Shape& shape, void* x, void* w, void* y,
               const PostOpArgs& post = PostOpArgs()) try {
  std::lock_guard<std::mutex> lock(RunMutex());
  ThreadsForPass threads(shape);
  Pass* pass = Get(kind, shape);
  dnnl::stream stream(Engine());
  dnnl::memory xm(pass->x, Engine(), x), ym(pass->y, Engine(), y);
  dnnl::memory wu(pass->w_user, Engine(), w);
  dnnl::memory wp = pass->reorder ? pass->w_prim_buffer : wu;
  if (pass->reorder && kind != kKernelGrad) {
    pass->w_reorder.execute(stream, wu, wp);
  }
  if (kind == kForward) {
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wp}, {DNNL_ARG_DST, ym}};
    AddPostOpArgs(post, pass->channels, args);
    pass->prim.execute(stream, args);
  } else if (kind == kInputGrad) {
    pass->prim.execute(stream, {{DNNL_ARG_DIFF_DST, ym},
                                {DNNL_ARG_WEIGHTS, wp},
                                {DNNL_ARG_DIFF_SRC, xm}});
  } else {
    pass->prim.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, ym},
                                {DNNL_ARG_DIFF_WEIGHTS, wp}});
    if (pass->reorder) pass->w_reorder.execute(stream, wp, wu);
  }
  stream.wait();
  return ffi::Error::Success();
} catch (const std::exception& e) {
  return Failed(e);
}

// A small row matmul (`x` an `[M, K]` matrix) as two one-thread matmuls
// over the halves of the output channels: the calling thread runs the
// first, one of XLA's intra-op threads the second, and whichever of the two
// gets to the second first runs it (so it never waits for a busy pool). Why
// not oneDNN's own two threads: XLA runs the custom calls on its pool
// threads, in turn, and GNU OpenMP gives each of them a team of its own;
// with more OpenMP threads than CPUs (on 2 CPUs, any team of two started
// off the process's first thread) its workers stop spinning at once and
// every call waits for its worker to be woken. On a 2-core VM a 26-row
// matmul 256 -> 1024 took 81-94 us called from another thread against
// 47-50 us from the first one; split, the sparse path at batch 1 took
// 0.94-1.01x its time (BUILD.md, "Packed weights and oneDNN's calls inside
// the program").
constexpr int64_t kSplitMaxRows = 4096;

struct SplitHalf {
  dnnl::matmul prim;
  dnnl::memory::desc a, b, c;
  dnnl::memory scratchpad;  // Its own: the halves run at once.
  int64_t n0;               // First output channel.
};

struct Split {
  SplitHalf half[2];
};

// Whether `s` is a matmul over one row of positions: one image of one row,
// a 1x1 kernel, stride 1, unpadded (onednn.py's `is_row`).
bool IsRow(const Shape& s) {
  return s.n() == 1 && s.h() == 1 && s.kh() == 1 && s.kw() == 1 &&
         s.sh() == 1 && s.sw() == 1 && s.top() == 0 && s.left() == 0 &&
         s.oh() == s.h() && s.ow() == s.w();
}

// Whether `s` runs as a `Split`: a 1x1 convolution over one image row of
// at most kSplitMaxRows positions that would get more than one thread: a
// row matmul of the sparse path (`conv.rows_matmul`), or a convolution
// with few output positions whose windows conv.py lays out as one row
// (its 'rows' formulation). Reads no shared state (no lock needed).
bool Splits(const Shape& s) {
  return IsRow(s) && s.w() <= kSplitMaxRows && s.o() >= 32 &&
         s.flops() >= 2 * kFlopsPerThread && omp_get_max_threads() > 1;
}

// The caller holds RunMutex() (as for `Get`).
Split* GetSplit(const Shape& s) {
  static std::unordered_map<Shape, std::unique_ptr<Split>, ShapeHash> cache;
  auto& slot = cache[s];
  if (slot) return slot.get();
  auto split = std::make_unique<Split>();
  int64_t m = s.n() * s.h() * s.w(), k = s.c(), n = s.o();
  int64_t n0 = (n / 2 + 15) / 16 * 16;
  for (int i = 0; i < 2; ++i) {
    SplitHalf& h = split->half[i];
    h.n0 = i ? n0 : 0;
    int64_t width = i ? n - n0 : n0;
    // Rows of the caller's HWIO weights and NHWC output, `n` apart.
    h.a = dnnl::memory::desc({m, k}, dt::f32, tag::ab);
    h.b = dnnl::memory::desc({k, width}, dt::f32, dnnl::memory::dims{n, 1});
    h.c = dnnl::memory::desc({m, width}, dt::f32, dnnl::memory::dims{n, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto pd = dnnl::matmul::primitive_desc(Engine(), h.a, h.b, h.c, attr);
    h.prim = dnnl::matmul(pd);
    h.scratchpad = dnnl::memory(pd.scratchpad_desc(), Engine());
  }
  slot = std::move(split);
  return slot.get();
}

// kAffineRelu then runs on the same thread, while the half's output is in
// cache: oneDNN's matmul of a half (rows `n` apart) has binary post-ops
// only in its reference implementation, 20x slower.
void RunHalf(SplitHalf& h, void* x, void* w, void* y, const PostOpArgs& post) {
  dnnl::stream stream(Engine());
  float* out = static_cast<float*>(y) + h.n0;
  dnnl::memory am(h.a, Engine(), x);
  dnnl::memory bm(h.b, Engine(), static_cast<float*>(w) + h.n0);
  dnnl::memory cm(h.c, Engine(), out);
  h.prim.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm},
                          {DNNL_ARG_DST, cm},
                          {DNNL_ARG_SCRATCHPAD, h.scratchpad}});
  stream.wait();
  if (post.kind != kAffineRelu) return;
  const auto dims = h.c.get_dims();
  const int64_t rows = dims[0], width = dims[1], stride = h.c.get_strides()[0];
  for (int64_t r = 0; r < rows; ++r) {
    float* row = out + r * stride;
    AffineRelu(row, post.a + h.n0, post.b + h.n0, width, row);
  }
}

// Runs `half(k)` for k = 0, 1 (`RunParts`: the calling thread and one of
// XLA's), each on one OpenMP thread. An exception in either (never into
// XLA's pool) fails the pass, saying `what`.
template <typename Half>
ffi::Error RunHalves(ffi::ThreadPool& pool, const char* what,
                     const Half& half) {
  bool ok[2] = {false, false};
  RunParts(pool, 2, [&](int k, int) {
    try {
      OneThread one;
      half(k);
      ok[k] = true;
    } catch (const std::exception&) {
    }
  });
  if (ok[0] && ok[1]) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("oneDNN convolution: ") + what);
}

// The caller holds RunMutex(): one pass (here, one pair of halves) at a time.
ffi::Error RunSplit(const Shape& shape, void* x, void* w, void* y,
                    const PostOpArgs& post, ffi::ThreadPool& pool) {
  Split* split;
  try {
    OneThread one;  // The halves' primitives: one thread each.
    split = GetSplit(shape);
  } catch (const std::exception& e) {
    return Failed(e);
  }
  return RunHalves(pool, "a matmul half failed", [&](int k) {
    RunHalf(split->half[k], x, w, y, post);
  });
}

// A forward of one image as two one-thread convolutions over the halves of
// its output rows, one on the calling thread and one on XLA's pool
// (`RunParts`), for the reason `RunSplit` gives: a team of two OpenMP
// threads started off one of XLA's threads waits for its worker to be
// woken. Each half reads the input rows its output rows need, with the
// padding that falls to it, and writes its rows of the output in place;
// the post-ops are per channel, so each half applies them to its rows. In
// ResNet-101 at batch 1 (AVX-512 EPYC, Zen 4) the 56x56 3x3 convolutions
// took 1.47 ms each on a team of two inside the model and 1.10 ms as two
// halves (1.0-1.1 ms alone on either), the 7x7 stem 1.92 against 1.18 ms
// (BUILD.md, "Halves of a batch-1 convolution").
struct RowHalf {
  dnnl::primitive prim;
  dnnl::memory::desc x, y;
  dnnl::memory scratchpad;   // Its own: the halves run at once.
  int64_t x_offset, y_offset;  // Floats into the input and output.
};

struct RowHalves {
  Pass* whole;  // Its weight layout (and reorder) serve both halves.
  RowHalf half[2];
};

// Whether a forward of `s` may run as `RowHalves`: one image with at least
// two output rows and the FLOPs for two threads, unless it is a row matmul
// that `Splits` runs. Whether it does also depends on oneDNN
// (`GetRowHalves`).
bool SplitsRows(const Shape& s) {
  return s.n() == 1 && s.oh() >= 2 && !Splits(s) &&
         s.flops() >= 2 * kFlopsPerThread && omp_get_max_threads() > 1;
}

// Output rows [a, b) of `s` as a convolution of its own: the input rows it
// reads, from `*first_row` on, and the padding of the image's edges it
// meets.
Shape RowsOf(const Shape& s, int64_t a, int64_t b, int64_t* first_row) {
  int64_t start = a * s.sh() - s.top(), end = (b - 1) * s.sh() - s.top() +
                                              s.kh();
  int64_t r0 = std::max<int64_t>(0, start), r1 = std::min(s.h(), end);
  Shape t = s;
  t.v[1] = r1 - r0;
  t.v[9] = r0 - start;
  t.v[11] = b - a;
  *first_row = r0;
  return t;
}

// Output rows [a, b) of `s` as `h`, reading the weights as `whole` does.
// False where oneDNN has no direct kernel for them in that weight layout
// (or only im2col and gemm).
bool BuildRowHalf(const Shape& s, const Pass& whole, int64_t a, int64_t b,
                  RowHalf* h) {
  int64_t first_row;
  const Shape t = RowsOf(s, a, b, &first_row);
  if (t.h() < 1) return false;
  h->x = t.x_desc();
  h->y = t.y_desc();
  dnnl::primitive_attr attr;
  if (t.post_ops() != kNone) attr = PostOpsAttr(t.post_ops(), whole.channels);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc pd;
  try {
    pd = ForwardDesc(t, h->x, h->y, dnnl::prop_kind::forward_inference,
                     whole.w_prim, attr);
  } catch (const dnnl::error&) {
    return false;
  }
  if (IsGemm(pd) || pd.weights_desc() != whole.w_prim) return false;
  h->prim = dnnl::convolution_forward(pd);
  h->scratchpad = dnnl::memory(pd.scratchpad_desc(), Engine());
  h->x_offset = first_row * s.w() * s.c();
  h->y_offset = a * s.ow() * s.o();
  return true;
}

// The halves of `s`, built once (null where a half cannot be built: the
// whole then runs as `Run` does). The caller holds RunMutex().
RowHalves* GetRowHalves(const Shape& s) {
  static std::unordered_map<Shape, std::unique_ptr<RowHalves>, ShapeHash>
      cache;
  auto found = cache.find(s);
  if (found != cache.end()) return found->second.get();
  auto halves = std::make_unique<RowHalves>();
  halves->whole = Get(kForward, s);
  OneThread one;  // oneDNN sizes a primitive's team when it is built.
  const int64_t middle = s.oh() / 2;
  if (!BuildRowHalf(s, *halves->whole, 0, middle, &halves->half[0]) ||
      !BuildRowHalf(s, *halves->whole, middle, s.oh(), &halves->half[1])) {
    halves.reset();
  }
  return (cache[s] = std::move(halves)).get();
}

// The caller holds RunMutex().
ffi::Error RunRowHalves(RowHalves& halves, void* x, void* w, void* y,
                        const PostOpArgs& post, ffi::ThreadPool& pool) {
  Pass& whole = *halves.whole;
  try {
    if (whole.reorder) {
      OneThread one;
      dnnl::stream stream(Engine());
      dnnl::memory wu(whole.w_user, Engine(), w);
      whole.w_reorder.execute(stream, wu, whole.w_prim_buffer);
      stream.wait();
      w = whole.w_prim_buffer.get_data_handle();
    }
  } catch (const std::exception& e) {
    return Failed(e);
  }
  return RunHalves(pool, "a half of the rows failed", [&](int k) {
    const RowHalf& h = halves.half[k];
    dnnl::stream stream(Engine());
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, dnnl::memory(h.x, Engine(),
                                    static_cast<float*>(x) + h.x_offset)},
        {DNNL_ARG_WEIGHTS, dnnl::memory(whole.w_prim, Engine(), w)},
        {DNNL_ARG_DST, dnnl::memory(h.y, Engine(),
                                    static_cast<float*>(y) + h.y_offset)},
        {DNNL_ARG_SCRATCHPAD, h.scratchpad}};
    AddPostOpArgs(post, whole.channels, args);
    h.prim.execute(stream, args);
    stream.wait();
  });
}

// A forward: as two halves of its rows where `GetRowHalves` builds them,
// as two matmul halves where `Splits` says so, else as `Run` does.
// kBiasSum never runs as matmul halves: as gemm's sum (beta 1) the halves
// took longer than without it and XLA's sum after them (conv.py's
// `conv_add_into` keeps those apart).
ffi::Error RunForward(const Shape& shape, void* x, void* w, void* y,
                      const PostOpArgs& post, ffi::ThreadPool& pool) {
  if (SplitsRows(shape)) {
    std::lock_guard<std::mutex> lock(RunMutex());
    RowHalves* halves;
    try {
      halves = GetRowHalves(shape);
    } catch (const std::exception& e) {
      return Failed(e);
    }
    if (halves) return RunRowHalves(*halves, x, w, y, post, pool);
  }
  if (!Splits(shape) || post.kind == kBiasSum) {
    return Run(kForward, shape, x, w, y, post);
  }
  std::lock_guard<std::mutex> lock(RunMutex());
  return RunSplit(shape, x, w, y, post, pool);
}

// kAffineRelu's operands, `relu(y * scale + shift)`, checked against the
// output `y` (one value per channel).
ffi::ErrorOr<PostOpArgs> AffineReluArgs(const ffi::Buffer<ffi::F32>& scale,
                                        const ffi::Buffer<ffi::F32>& shift,
                                        ffi::ResultBuffer<ffi::F32>& y) {
  const int64_t channels = y->dimensions().back();
  if (scale.element_count() != channels ||
      shift.element_count() != channels) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN convolution: expected one value per output channel"));
  }
  return PostOpArgs{kAffineRelu, scale.typed_data(), shift.typed_data()};
}

// kBiasSum's operands, `into + y + bias`, checked against the output `y`
// (one bias per channel; `y` aliased to `into`).
ffi::ErrorOr<PostOpArgs> BiasSumArgs(const ffi::Buffer<ffi::F32>& bias,
                                     const ffi::Buffer<ffi::F32>& into,
                                     ffi::ResultBuffer<ffi::F32>& y) {
  if (bias.element_count() != y->dimensions().back()) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN convolution: expected one value per output channel"));
  }
  if (into.untyped_data() != y->untyped_data()) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN convolution: the sum's operand must be aliased to the "
        "output"));
  }
  return PostOpArgs{kBiasSum, bias.typed_data(), nullptr};
}

ffi::Error RunWithPostOps(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y,
                          const ConvAttrs& attrs,
                          const ffi::ErrorOr<PostOpArgs>& post,
                          ffi::ThreadPool& pool) {
  if (post.has_error()) return post.error();
  return RunForward(MakeShape(x.dimensions(), w.dimensions(),
                              y->dimensions(), attrs, post->kind),
                    x.untyped_data(), w.untyped_data(), y->untyped_data(),
                    *post, pool);
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, ConvAttrs attrs,
                   ffi::ThreadPool pool) {
  return RunWithPostOps(x, w, y, attrs, PostOpArgs(), pool);
}

// `Forward` followed by `relu(y * scale + shift)` (kAffineRelu).
ffi::Error ForwardAffineRelu(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                             ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> shift,
                             ffi::ResultBuffer<ffi::F32> y, ConvAttrs attrs,
                             ffi::ThreadPool pool) {
  return RunWithPostOps(x, w, y, attrs, AffineReluArgs(scale, shift, y),
                        pool);
}

// `into + Forward + bias` (kBiasSum), `y` aliased to `into`.
ffi::Error ForwardAddInto(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> bias,
                          ffi::Buffer<ffi::F32> into,
                          ffi::ResultBuffer<ffi::F32> y, ConvAttrs attrs,
                          ffi::ThreadPool pool) {
  return RunWithPostOps(x, w, y, attrs, BiasSumArgs(bias, into, y), pool);
}

// `s`'s forward at the first `rows` positions of its one row of positions
// (`[1, 1, S, I]`, a 1x1 kernel, no post-ops), the output's other positions
// zero: in the sparse path's last chunk of a unit's rows the positions
// after the set's are padding, which the chunk's bucketed size adds (up to
// half of it). The rows computed are rounded up to a multiple of a 32nd of
// the row (at least 8), so that a row needs few primitives.
ffi::Error RunFirstRows(const Shape& s, int64_t rows, void* x, void* w,
                        void* y, const PostOpArgs& post,
                        ffi::ThreadPool& pool) {
  if (!IsRow(s) || post.kind != kNone) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: a count of rows needs one row "
                      "of positions, a 1x1 kernel and no post-ops");
  }
  const int64_t total = s.w();
  rows = std::clamp<int64_t>(rows, 0, total);
  const int64_t step = std::max<int64_t>(8, (total + 31) / 32);
  const int64_t computed = std::min(total, (rows + step - 1) / step * step);
  if (computed > 0) {
    Shape t = s;
    t.v[2] = t.v[12] = computed;
    ffi::Error error = RunForward(t, x, w, y, post, pool);
    if (error.failure()) return error;
  }
  float* out = static_cast<float*>(y);
  std::fill(out + rows * s.o(), out + total * s.o(), 0.0f);
  return ffi::Error::Success();
}

// The forward of unit `index[0]` of a stack of equal kernels `[U, kh, kw,
// I, O]`, read where it lies. Inside a loop over a block's units, a kernel
// sliced out of the stack is a copy XLA makes before every call (4.4 MB per
// ImageNet unit, a tenth of a batch-1 forward); the stack itself is the
// loop's operand and costs nothing to pass. The index is clamped as XLA
// clamps a dynamic slice. A second index is a count of rows
// (`RunFirstRows`).
ffi::Error RunStacked(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::S32> index,
                      ffi::ResultBuffer<ffi::F32> y, const ConvAttrs& attrs,
                      const ffi::ErrorOr<PostOpArgs>& post,
                      ffi::ThreadPool& pool) {
  if (post.has_error()) return post.error();
  auto stack = w.dimensions();
  const size_t indices = index.element_count();
  if (stack.size() != 5 || indices < 1 || indices > 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: expected [U, kh, kw, I, O] "
                      "kernels and one index (and a count of rows)");
  }
  int64_t unit = std::clamp<int64_t>(index.typed_data()[0], 0, stack[0] - 1);
  int64_t size = stack[1] * stack[2] * stack[3] * stack[4];
  const Shape shape = MakeShape(x.dimensions(), stack.last(4),
                                y->dimensions(), attrs, post->kind);
  float* kernel = w.typed_data() + unit * size;
  if (indices == 2) {
    return RunFirstRows(shape, index.typed_data()[1], x.untyped_data(),
                        kernel, y->untyped_data(), *post, pool);
  }
  return RunForward(shape, x.untyped_data(), kernel, y->untyped_data(),
                    *post, pool);
}

ffi::Error ForwardStacked(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::S32> index,
                          ffi::ResultBuffer<ffi::F32> y, ConvAttrs attrs,
                          ffi::ThreadPool pool) {
  return RunStacked(x, w, index, y, attrs, PostOpArgs(), pool);
}

ffi::Error ForwardStackedAffineRelu(
    ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
    ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> scale,
    ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
    ConvAttrs attrs, ffi::ThreadPool pool) {
  return RunStacked(x, w, index, y, attrs, AffineReluArgs(scale, shift, y),
                    pool);
}

ffi::Error ForwardStackedAddInto(
    ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
    ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> bias,
    ffi::Buffer<ffi::F32> into, ffi::ResultBuffer<ffi::F32> y,
    ConvAttrs attrs, ffi::ThreadPool pool) {
  return RunStacked(x, w, index, y, attrs, BiasSumArgs(bias, into, y), pool);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, ConvAttrs attrs) {
  return Run(kInputGrad,
             MakeShape(dx->dimensions(), w.dimensions(), dy.dimensions(),
                       attrs),
             dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, ConvAttrs attrs) {
  return Run(kKernelGrad,
             MakeShape(x.dimensions(), dw->dimensions(), dy.dimensions(),
                       attrs),
             x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

// `Shape` from onednn.py's 13 numbers (its layout flag and post-ops 0).
Shape FromC(const int64_t* shape) {
  Shape s{};
  std::memcpy(s.v, shape, 13 * sizeof(int64_t));
  return s;
}

// The forward's pass for `shape` (`FromC`'s 13 numbers) with the layout
// flag `blocked`, built as a call would build it. Passes are never freed,
// and their fields do not change once built.
const Pass* ForwardPass(const int64_t* shape, bool blocked) {
  Shape s = FromC(shape);
  s.v[13] = blocked;
  std::lock_guard<std::mutex> lock(RunMutex());
  ThreadsForPass threads(s);
  return Get(kForward, s);
}

}  // namespace

// Whether the forward of `shape` (the 13 numbers of `Shape` before its
// layout flag) copies the caller's HWIO weights into another layout on
// every call: 1 if it does, 0 if it reads them in place, -1 if oneDNN
// failed. For onednn.py, at trace time; the primitive it builds is the one
// the call then runs.
extern "C" int SactOnednnForwardCopiesWeights(const int64_t* shape) try {
  return ForwardPass(shape, false)->reorder ? 1 : 0;
} catch (const std::exception&) {
  return -1;
}

// The name of oneDNN's kernel for the forward of `shape` (the 13 numbers,
// as above) with the weights blocked or not, into `name` (`size` bytes,
// cut to fit): 0, or -1 where oneDNN fails. For onednn.py's tests.
extern "C" int SactOnednnForwardKernel(const int64_t* shape, int blocked,
                                       char* name, int size) try {
  std::snprintf(name, size, "%s",
                ForwardPass(shape, blocked != 0)->kernel.c_str());
  return 0;
} catch (const std::exception&) {
  return -1;
}

// Whether a forward of `shape` (the 13 numbers, as above) runs as two
// matmul halves (`Splits`), for onednn.py's tests.
extern "C" int SactOnednnForwardSplits(const int64_t* shape) {
  const Shape s = FromC(shape);
  return Splits(s) ? 1 : 0;
}

// Whether a forward of `shape` (as above) runs as two halves of its output
// rows (`RowHalves`); -1 where oneDNN fails. For onednn.py's tests.
extern "C" int SactOnednnForwardRowHalves(const int64_t* shape) try {
  const Shape s = FromC(shape);
  if (!SplitsRows(s)) return 0;
  std::lock_guard<std::mutex> lock(RunMutex());
  return GetRowHalves(s) != nullptr ? 1 : 0;
} catch (const std::exception&) {
  return -1;
}

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(ConvAttrs, ffi::StructMember<int64_t>(
    "stride_h"), ffi::StructMember<int64_t>("stride_w"),
    ffi::StructMember<int64_t>("pad_top"),
    ffi::StructMember<int64_t>("pad_left"),
    ffi::StructMember<int64_t>("blocked_weights"));

// The gradients' handlers: (dy, w) -> dx and (x, dy) -> dw.
#define SACT_BIND                                  \
  ffi::Ffi::Bind()                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Arg<ffi::Buffer<ffi::F32>>()                \
      .Ret<ffi::Buffer<ffi::F32>>()                \
      .Attrs<ConvAttrs>()

// The forward handlers: (x, w, [index,] [a, b]) -> y, `index` for a stack
// of kernels, `a` and `b` the post-ops' operands.
#define SACT_F32 .Arg<ffi::Buffer<ffi::F32>>()
#define SACT_INDEX .Arg<ffi::Buffer<ffi::S32>>()
#define SACT_BIND_FORWARD(...)                                  \
  ffi::Ffi::Bind() SACT_F32 SACT_F32 __VA_ARGS__                \
      .Ret<ffi::Buffer<ffi::F32>>()                             \
      .Attrs<ConvAttrs>()                                       \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward,
                              SACT_BIND_FORWARD());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForwardStacked, ForwardStacked,
                              SACT_BIND_FORWARD(SACT_INDEX));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForwardAffineRelu, ForwardAffineRelu,
                              SACT_BIND_FORWARD(SACT_F32 SACT_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForwardStackedAffineRelu,
                              ForwardStackedAffineRelu,
                              SACT_BIND_FORWARD(SACT_INDEX SACT_F32 SACT_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForwardAddInto, ForwardAddInto,
                              SACT_BIND_FORWARD(SACT_F32 SACT_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForwardStackedAddInto,
                              ForwardStackedAddInto,
                              SACT_BIND_FORWARD(SACT_INDEX SACT_F32 SACT_F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvInputGrad, InputGrad, SACT_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvKernelGrad, KernelGrad, SACT_BIND);
