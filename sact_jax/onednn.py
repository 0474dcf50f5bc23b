"""oneDNN's convolutions as XLA:CPU custom calls, built at first use.

Why: on CPUs with AVX-512, XLA:CPU's convolutions run the narrow ResNet
convolutions 1.4-2.8x slower (forward + backward) than oneDNN's, the
kernels TensorFlow uses; a CIFAR ResNet's training step spends most of its
time in them (BUILD.md, "Convolutions on XLA:CPU"). XLA's dots are fast
and its convolutions are not, and no XLA flag changes that.

How: onednn_conv.cc holds XLA FFI handlers of an NHWC x HWIO float32
convolution (forward, forward from a stack of kernels, input gradient,
kernel gradient; the forward also with what follows it per channel in
evaluation, `forward_affine_relu` and `forward_add_into`), row_gather.cc
those of the sparse path's row passes (`row_patches`, `nonzero_rows`,
`update_rows`, `update_dense`, `row_taps`, which need no oneDNN but ride
on this build and cache), and
row_stages.cc a bottleneck unit's two stages at rows as one call each
(`dilated_rows`, `active_rows`: gathers, oneDNN matmuls by packed weights
and the block's update, in tiles on two threads).
`available()` compiles them with the system's C++ compiler against
oneDNN's headers and library (the PyPI packages `onednn-cpu-gomp` /
`onednn-devel-cpu-gomp`, built with GNU OpenMP) and jaxlib's FFI headers,
once per machine: the library is kept under `~/.cache/sact_jax/onednn/`,
keyed by everything that goes into it. It then registers the handlers with
XLA:CPU. Where any of that is missing or fails, `available()` logs one
line saying why and returns False, and `conv` keeps XLA's convolutions
(and `sparse.rows` XLA's gathers and scatters). Set
`SACT_JAX_ONEDNN=0` to keep them anyway (or trace inside `disabled()`).

`forward` and `backward` are the two passes `conv.conv2d` calls for its
'onednn' formulation (each differentiates to any order). `enabled()` says
whether convolutions traced now should use them: not inside `disabled()`
and not where JAX has several devices. onednn_conv.cc runs one pass at a
time in the process, each on as many OpenMP threads as its size pays for;
the forward of one image instead as two one-thread halves, one on XLA's
own thread pool: halves of the output channels for the sparse path's
small row matmuls (`forward_splits`), halves of the output rows for the
rest (`forward_row_halves`). It reads the forward's weights in the
caller's layout where oneDNN's direct kernels take it and the convolution
is too small to pay for a reorder, or where only that layout gets a
brgemm kernel (why: its comments on `Run`,
`RunSplit`, `RowHalves`, `ThreadsForPass` and `Build`, and
`BLOCKED_WEIGHTS_MIN_FLOPS` here). Where they cannot (CPUs without
AVX-512), `forward_copies_weights` says so, and `conv.formulation` keeps
XLA's forward for the convolutions too small to pay for the copy.
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCES = tuple(
    os.path.join(os.path.dirname(__file__), name)
    for name in ('onednn_conv.cc', 'row_gather.cc', 'row_stages.cc'))
# Included by the sources: part of the build's cache key too.
_HEADERS = tuple(
    os.path.join(os.path.dirname(__file__), name)
    for name in ('onednn_common.h', 'row_passes.h', 'run_parts.h'))
_TARGETS = ('OnednnConvForward', 'OnednnConvForwardStacked',
            'OnednnConvForwardAffineRelu',
            'OnednnConvForwardStackedAffineRelu',
            'OnednnConvForwardAddInto', 'OnednnConvForwardStackedAddInto',
            'OnednnConvInputGrad', 'OnednnConvKernelGrad',
            'SactRowPatches3x3', 'SactWindows', 'SactNonzeroRows',
            'SactUpdateRows', 'SactRowTaps', 'SactUpdateDense',
            'SactDilatedRows', 'SactActiveRows')
_LIBRARY = 'libsact_onednn.so'
DISABLE_ENV = 'SACT_JAX_ONEDNN'


class Unavailable(RuntimeError):
  """oneDNN's convolutions cannot be built or loaded here (and why)."""


def _package_file(distribution: str, suffix: str) -> str:
  """The installed file of `distribution` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.distribution(distribution).files or ()
  except importlib.metadata.PackageNotFoundError as e:
    raise Unavailable(f'{distribution} is not installed') from e
  for file in files:
    if str(file).endswith(suffix):
      path = os.path.realpath(file.locate())
      if os.path.exists(path):
        return path
  raise Unavailable(f'{distribution} has no {suffix}')


def _cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'sact_jax', 'onednn')


def _build(header: str, library: str) -> str:
  """Path of the compiled handlers, built now unless already cached."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which(
      'c++')
  if not compiler:
    raise Unavailable('no C++ compiler (g++) on PATH')
  include = header[:-len('oneapi/dnnl/dnnl.hpp')]
  lib_dir = os.path.dirname(library)
  command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp',
             '-w', f'-I{include}', f'-I{jax.ffi.include_dir()}', *_SOURCES,
             f'-L{lib_dir}', '-l:' + os.path.basename(library),
             f'-Wl,-rpath,{lib_dir}']
  key = hashlib.sha256()
  for source in (*_SOURCES, *_HEADERS):
    with open(source, 'rb') as f:
      key.update(f.read())
  for part in (*command, jax.__version__, jax.lib.__version__,
               str(os.path.getmtime(library)), str(os.path.getmtime(header))):
    key.update(part.encode())
  out_dir = os.path.join(_cache_dir(), key.hexdigest()[:16])
  out = os.path.join(out_dir, _LIBRARY)
  if os.path.exists(out):
    return out
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError:
    out_dir = tempfile.mkdtemp(prefix='sact_jax_onednn_')
    out = os.path.join(out_dir, _LIBRARY)
  # Built under a temporary name and renamed: concurrent first uses (test
  # workers) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out_dir)
  os.close(fd)
  logging.info('sact_jax: building oneDNN convolutions (once): %s', out)
  try:
    build = subprocess.run(command + ['-o', tmp], capture_output=True,
                           text=True, check=False)
  except OSError as e:
    os.unlink(tmp)
    raise Unavailable(f'running {compiler} failed: {e}') from e
  if build.returncode != 0:
    os.unlink(tmp)
    lines = (build.stderr or build.stdout).strip().splitlines()
    errors = [line for line in lines if 'error' in line] or lines
    raise Unavailable(f'building {_LIBRARY} failed: '
                      f'{errors[0] if errors else build.returncode}')
  os.replace(tmp, out)
  return out


_library = []  # The loaded handlers, once `available()`.


def _load() -> None:
  if os.environ.get(DISABLE_ENV, '1') == '0':
    raise Unavailable(f'{DISABLE_ENV}=0')
  if platform.system() != 'Linux' or platform.machine() != 'x86_64':
    raise Unavailable('only built on x86-64 Linux')
  header = _package_file('onednn-devel-cpu-gomp', 'oneapi/dnnl/dnnl.hpp')
  library = _package_file('onednn-cpu-gomp', 'libdnnl.so')
  handlers = ctypes.cdll.LoadLibrary(_build(header, library))
  _library.append(handlers)
  for target in _TARGETS:
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(handlers, target)),
        platform='cpu')


@functools.cache
def available() -> bool:
  """Whether oneDNN's convolutions are built and registered (at first call).

  False, after one logged line saying why, where oneDNN, a compiler or an
  x86-64 Linux host is missing, or `SACT_JAX_ONEDNN=0`.
  """
  try:
    _load()
  except (Unavailable, OSError) as e:
    logging.warning("sact_jax: oneDNN convolutions unavailable (%s); "
                    "using XLA's.", e)
    return False
  return True


_disabled = []


@contextlib.contextmanager
def disabled():
  """Convolutions traced inside keep XLA's kernels.

  For measuring both in one process (benchmarks/train_step.py's `xlaconv`
  variant); `SACT_JAX_ONEDNN=0` does it for a whole process.
  """
  _disabled.append(True)
  try:
    yield
  finally:
    _disabled.pop()


def enabled() -> bool:
  """Whether convolutions traced now run oneDNN's kernels (if supported).

  Only where the CPU is JAX's default backend (a GPU or TPU process never
  builds or loads the library). Not while disabled, and not where JAX has
  more than one device: XLA cannot partition a custom call, so under a
  data-parallel mesh it would run every device's convolution on the whole
  batch, and a process of 8 CPU devices running 8 OpenMP teams on 2 cores
  stalled until XLA's collectives timed out.
  """
  return (not _disabled and jax.default_backend() == 'cpu'
          and jax.device_count() == 1 and available())


def _out_hw(x_shape, w_shape, strides, padding) -> tuple[int, int]:
  """Output height and width (`w_shape` `[..., kh, kw, I, O]`)."""
  return tuple((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(
      x_shape[1:3], w_shape[-4:-2], strides, padding))


def supported(x_shape, w_shape, strides, padding, dtype) -> bool:
  """Whether the handlers compute this convolution.

  Float32, with zero padding of at most `k - 1` on every side (SAME and
  VALID: what the models use), that does not crop the input (reads its
  last row and column). oneDNN's input gradient was wrong with wider
  padding (3 before and 1 after a 3x3 kernel).
  """
  if np.dtype(dtype) != np.float32:
    return False
  for size, k, s, (lo, hi), out in zip(
      x_shape[1:3], w_shape[:2], strides, padding,
      _out_hw(x_shape, w_shape, strides, padding)):
    after = (out - 1) * s + k - size - lo  # The padding oneDNN applies.
    if not (0 <= lo < k and 0 <= hi < k and out >= 1 and 0 <= after):
      return False
  return True


def _handlers() -> ctypes.CDLL:
  """The loaded handlers; raises where they are not `available()`."""
  if not available():
    raise Unavailable("oneDNN's convolutions are unavailable (the warning "
                      'logged says why)')
  return _library[0]


def _call(target, result_shape, operands, strides, padding,
          blocked_weights=False, aliases=None):
  _handlers()
  attrs = {'stride_h': strides[0], 'stride_w': strides[1],
           'pad_top': padding[0][0], 'pad_left': padding[1][0],
           'blocked_weights': int(blocked_weights)}
  return jax.ffi.ffi_call(
      target, jax.ShapeDtypeStruct(result_shape, operands[0].dtype),
      vmap_method='sequential', input_output_aliases=aliases)(
          *operands, **{k: np.int64(v) for k, v in attrs.items()})


def _c_shape(x_shape, w_shape, strides, padding):
  """The 13 numbers of onednn_conv.cc's `Shape` (its layout flag left out)."""
  out_h, out_w = _out_hw(x_shape, w_shape, strides, padding)
  kh, kw, cin, cout = w_shape
  return (ctypes.c_int64 * 13)(
      x_shape[0], x_shape[1], x_shape[2], cin, cout, kh, kw, strides[0],
      strides[1], padding[0][0], padding[1][0], out_h, out_w)


@functools.cache
def forward_copies_weights(x_shape, w_shape, strides, padding) -> bool:
  """Whether the forward copies its HWIO weights into another layout on
  every call, even below `BLOCKED_WEIGHTS_MIN_FLOPS` (below).

  oneDNN's direct kernels on AVX-512 read HWIO in place; on CPUs without
  it (AVX2) only im2col + gemm would, so the forward reorders the weights
  to a blocked layout first, a pass over them that a small convolution
  does not pay back (`conv.formulation`). Asks oneDNN, which decides when
  the process starts; the primitive is the one the call will run.
  """
  answer = _handlers().SactOnednnForwardCopiesWeights(
      _c_shape(x_shape, w_shape, strides, padding))
  if answer < 0:
    raise Unavailable(f'oneDNN has no forward for {x_shape} x {w_shape}')
  return bool(answer)


def forward_kernel(x_shape, w_shape, strides, padding,
                   blocked_weights: bool) -> str:
  """oneDNN's name for the kernel the forward runs ("brgconv:avx512_core").

  With `blocked_weights` the forward reads the weights in the layout
  oneDNN prefers, unless only HWIO gets a brgemm kernel (onednn_conv.cc,
  `Build`, says where). For tests and `ONEDNN_VERBOSE`-free inspection.
  """
  name = ctypes.create_string_buffer(128)
  if _handlers().SactOnednnForwardKernel(
      _c_shape(x_shape, w_shape, strides, padding), int(blocked_weights),
      name, len(name)) < 0:
    raise Unavailable(f'oneDNN has no forward for {x_shape} x {w_shape}')
  return name.value.decode()


def forward_splits(x_shape, w_shape) -> bool:
  """Whether a stride-1 unpadded forward runs as two one-thread matmuls.

  One image row of at most 4096 positions with enough FLOPs for two
  threads does (the sparse path's row matmuls, `conv.rows_matmul`, and
  convolutions with few output positions, `conv.formulation`'s 'rows'):
  one half of the output channels on the calling thread and one on XLA's
  thread pool (onednn_conv.cc, `RunSplit`, says why).
  """
  return bool(_handlers().SactOnednnForwardSplits(
      _c_shape(x_shape, w_shape, (1, 1), ((0, 0), (0, 0)))))


@functools.cache
def forward_row_halves(x_shape, w_shape, strides, padding) -> bool:
  """Whether a forward runs as two one-thread convolutions over the halves
  of its output rows.

  One image with at least two output rows and enough FLOPs for two threads
  does, unless it is a row matmul that `forward_splits` halves by channels:
  one half on the calling thread and one on XLA's thread pool
  (onednn_conv.cc, `RowHalves`, says why).
  """
  answer = _handlers().SactOnednnForwardRowHalves(
      _c_shape(x_shape, w_shape, strides, padding))
  if answer < 0:
    raise Unavailable(f'oneDNN has no forward for {x_shape} x {w_shape}')
  return bool(answer)


def tap_sums(x_C: np.ndarray, kernel_9xC: np.ndarray, c0: int, c1: int,
             width: int) -> np.ndarray:
  """`acc[t] = sum of x[c] * kernel[t, c]` over channels [c0, c1), t < 9,
  by row_gather.cc's `TapSums` body on vectors of `width` floats (16:
  AVX-512, 8: AVX2, 4: SSE), for tests: a CPU runs only the widest body it
  has, so each is checked where the CPU has its instructions (the caller
  makes sure it does)."""
  x = np.ascontiguousarray(x_C, np.float32)
  kernel = np.ascontiguousarray(kernel_9xC, np.float32)
  if kernel.shape != (9, x.shape[0]) or not 0 <= c0 <= c1 <= x.shape[0]:
    raise ValueError(f'Expected x [C], kernel [9, C] and 0 <= c0 <= c1 <= '
                     f'C, got {x.shape}, {kernel.shape}, [{c0}, {c1}).')
  acc = np.zeros(9, np.float32)
  pointer = ctypes.POINTER(ctypes.c_float)
  status = _handlers().SactTapSums(
      ctypes.c_int(width), x.ctypes.data_as(pointer),
      kernel.ctypes.data_as(pointer), ctypes.c_int64(x.shape[0]),
      ctypes.c_int64(c0), ctypes.c_int64(c1), acc.ctypes.data_as(pointer))
  if status != 0:
    raise ValueError(f'width must be 16, 8 or 4, got {width}.')
  return acc


def windows_split(x_shape, w_shape, strides, padding) -> bool:
  """Whether a convolution's windows, laid out as one image row of
  `kh * kw * I` features (`conv`'s 'rows'), run as two one-thread matmuls
  (`forward_splits`)."""
  out_h, out_w = _out_hw(x_shape, w_shape, strides, padding)
  kh, kw, cin, cout = w_shape[-4:]
  depth = kh * kw * cin
  return forward_splits((1, 1, x_shape[0] * out_h * out_w, depth),
                        (1, 1, depth, cout))


# The forward reorders the HWIO weights to oneDNN's blocked layout on every
# call when the convolution does at least this many FLOPs, and reads them as
# they are otherwise. The reorder costs in proportion to the weights, the
# blocked kernels gain in proportion to the FLOPs: on a 2-core AVX-512 VM
# the blocked layout made an ImageNet ResNet-101 at batch 32 (every
# convolution 1.6-7.5 GFLOP) 3% faster, while at batch 1 (at most 0.24
# GFLOP) it lost up to 1.6x on the 7x7x512 shapes (`BUILD.md`, "oneDNN's
# kernels"). Where the blocked layout would cost the brgemm kernel HWIO
# gets (the ImageNet stem's 3 input channels), HWIO stays (`Build`).
BLOCKED_WEIGHTS_MIN_FLOPS = 1e9


def _forward(x_BxHxWxI, w_KxLxIxO, strides, padding, blocked_weights=None,
             index=None, affine=None, add_into=None, rows=None):
  """The forward pass; `blocked_weights` None: by the FLOPs (above).

  With `index`, `w_KxLxIxO` is a stack `[U, kh, kw, I, O]` and the pass
  convolves with kernel `index` of it (`forward_stacked`; with `rows`, its
  first rows only). With `affine`
  `(scale_O, shift_O)`, it returns `relu(y * scale + shift)`
  (`forward_affine_relu`); with `add_into` `(bias_O, into)`, `into + y +
  bias` (`forward_add_into`).
  """
  batch = x_BxHxWxI.shape[0]
  kh, kw, cin, cout = w_KxLxIxO.shape[-4:]
  out_hw = _out_hw(x_BxHxWxI.shape, w_KxLxIxO.shape, strides, padding)
  if blocked_weights is None:
    flops = 2.0 * batch * out_hw[0] * out_hw[1] * kh * kw * cin * cout
    blocked_weights = flops >= BLOCKED_WEIGHTS_MIN_FLOPS
  operands = (x_BxHxWxI, w_KxLxIxO)
  if index is not None:
    operands += (index.astype(np.int32) if rows is None else
                 jnp.stack([index, rows]).astype(np.int32),)
  post_ops, aliases = None, None
  if affine is not None:
    post_ops = 'AffineRelu'
    operands += tuple(a.astype(x_BxHxWxI.dtype) for a in affine)
  elif add_into is not None:
    post_ops = 'AddInto'
    operands += (add_into[0].astype(x_BxHxWxI.dtype), add_into[1])
    aliases = {len(operands) - 1: 0}
  target = {(False, None): 'OnednnConvForward',
            (True, None): 'OnednnConvForwardStacked',
            (False, 'AffineRelu'): 'OnednnConvForwardAffineRelu',
            (True, 'AffineRelu'): 'OnednnConvForwardStackedAffineRelu',
            (False, 'AddInto'): 'OnednnConvForwardAddInto',
            (True, 'AddInto'): 'OnednnConvForwardStackedAddInto'}[
                index is not None, post_ops]
  return _call(target, (batch, *out_hw, cout), operands, strides, padding,
               blocked_weights, aliases)


# The three passes are linear in each operand, and each one's derivatives
# are the other two: so they differentiate to any order (what
# `jax.test_util.check_grads(order=2)` asks of `conv.conv2d`'s backward).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def forward(x_BxHxWxI, w_KxLxIxO, strides, padding, precision=None):
  """The convolution (oneDNN computes float32 at full precision)."""
  del precision
  return _forward(x_BxHxWxI, w_KxLxIxO, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _input_grad(g_BxPxQxO, w_KxLxIxO, strides, padding, x_shape):
  return _call('OnednnConvInputGrad', x_shape, (g_BxPxQxO, w_KxLxIxO),
               strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _kernel_grad(x_BxHxWxI, g_BxPxQxO, strides, padding, w_shape):
  return _call('OnednnConvKernelGrad', w_shape, (x_BxHxWxI, g_BxPxQxO),
               strides, padding)


def _forward_bwd(strides, padding, precision, residuals, c_BxPxQxO):
  del precision
  x, w = residuals
  return (_input_grad(c_BxPxQxO, w, strides, padding, x.shape),
          _kernel_grad(x, c_BxPxQxO, strides, padding, w.shape))


def _input_grad_bwd(strides, padding, x_shape, residuals, c_BxHxWxI):
  del x_shape
  g, w = residuals
  return (forward(c_BxHxWxI, w, strides, padding),
          _kernel_grad(c_BxHxWxI, g, strides, padding, w.shape))


def _kernel_grad_bwd(strides, padding, w_shape, residuals, c_KxLxIxO):
  del w_shape
  x, g = residuals
  return (_input_grad(g, c_KxLxIxO, strides, padding, x.shape),
          forward(x, c_KxLxIxO, strides, padding))


forward.defvjp(lambda x, w, strides, padding, precision: (
    forward(x, w, strides, padding, precision), (x, w)), _forward_bwd)
_input_grad.defvjp(lambda g, w, strides, padding, x_shape: (
    _input_grad(g, w, strides, padding, x_shape), (g, w)), _input_grad_bwd)
_kernel_grad.defvjp(lambda x, g, strides, padding, w_shape: (
    _kernel_grad(x, g, strides, padding, w_shape), (x, g)),
                    _kernel_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def forward_stacked(x_BxHxWxI, w_UxKxLxIxO, index, strides, padding,
                    rows=None):
  """`forward` with kernel `index` of a stack, read in place (no copy).

  Inside a loop over a block's units, slicing a unit's kernel out of the
  stack makes XLA copy it before each custom call: 4.4 MB per ImageNet
  ResNet-101 block-3 unit. The gradients (rarely wanted: evaluation) slice
  it and put the kernel gradient back into a stack of zeros.

  With `rows` (a traced count), `x` must be one row of positions `[1, 1,
  S, I]` under a 1x1 kernel, stride 1, unpadded: only its first `rows`
  positions are computed (rounded up to a few), and the output is zero at
  the others (`conv.valid_rows`: the padding of a sparse unit's last chunk
  of rows).
  """
  if rows is not None and not is_row(x_BxHxWxI.shape, w_UxKxLxIxO.shape,
                                     strides, padding):
    raise ValueError(
        f'A count of rows needs one row of positions [1, 1, S, I] under a '
        f'1x1 kernel, stride 1, unpadded; got {x_BxHxWxI.shape} x '
        f'{w_UxKxLxIxO.shape[-4:]}, strides {tuple(strides)}, padding '
        f'{tuple(map(tuple, padding))}.')
  return _forward(x_BxHxWxI, w_UxKxLxIxO, strides, padding, index=index,
                  rows=rows)


def is_row(x_shape, w_shape, strides, padding) -> bool:
  """Whether a convolution is a matmul over one row of positions: `x`
  `[1, 1, S, I]`, a 1x1 kernel (`w_shape` `[..., 1, 1, I, O]`), stride 1,
  unpadded (what `forward_stacked` takes a count of rows for)."""
  return (tuple(x_shape[:2]) == (1, 1) and tuple(w_shape[-4:-2]) == (1, 1)
          and tuple(strides) == (1, 1)
          and all(tuple(p) == (0, 0) for p in padding))


def _forward_stacked_fwd(x, w_stack, index, strides, padding, rows):
  return (forward_stacked(x, w_stack, index, strides, padding, rows),
          (x, w_stack, index, rows))


def _forward_stacked_bwd(strides, padding, residuals, c_BxPxQxO):
  x, w_stack, index, rows = residuals
  if rows is not None:  # The output is zero after the first `rows`.
    kept_S = jnp.arange(c_BxPxQxO.shape[2]) < rows
    c_BxPxQxO = jnp.where(kept_S[:, None], c_BxPxQxO, 0)
  w = jax.lax.dynamic_index_in_dim(w_stack, index, keepdims=False)
  dx, dw = _forward_bwd(strides, padding, None, (x, w), c_BxPxQxO)
  dw_stack = jax.lax.dynamic_update_index_in_dim(
      jnp.zeros_like(w_stack), dw, index, 0)
  return (dx, dw_stack, np.zeros(np.shape(index), jax.dtypes.float0),
          None if rows is None
          else np.zeros(np.shape(rows), jax.dtypes.float0))


forward_stacked.defvjp(_forward_stacked_fwd, _forward_stacked_bwd)


def forward_affine_relu(x_BxHxWxI, w_KxLxIxO, scale_O, shift_O, strides,
                        padding, index=None):
  """`relu(forward(x, w) * scale + shift)` in one call: the affine map
  and the ReLU are oneDNN's post-ops, applied while the output is in cache
  (onednn_conv.cc, `PostOps`). With `index`, kernel `index` of a
  stack `[U, kh, kw, I, O]`, read in place (`forward_stacked`).

  Not differentiable: `conv.conv_affine_relu` differentiates the three
  steps apart instead.
  """
  return _forward(x_BxHxWxI, w_KxLxIxO, strides, padding, index=index,
                  affine=(scale_O, shift_O))


def forward_add_into(x_BxHxWxI, w_KxLxIxO, bias_O, into_BxPxQxO, strides,
                     padding, index=None):
  """`into + forward(x, w) + bias` in one call, written over `into`'s
  buffer: oneDNN adds the output into it and the bias as post-ops
  (onednn_conv.cc, `PostOps`). With `index`, kernel `index` of a stack, read
  in place. Not differentiable (`conv.conv_add_into` is).
  """
  return _forward(x_BxHxWxI, w_KxLxIxO, strides, padding, index=index,
                  add_into=(bias_O, into_BxPxQxO))


def backward(strides, padding, precision, x_BxHxWxI, w_KxLxIxO, g_BxPxQxO):
  """(input gradient, kernel gradient) of `forward` at `g`."""
  del precision
  return (_input_grad(g_BxPxQxO, w_KxLxIxO, strides, padding,
                      x_BxHxWxI.shape),
          _kernel_grad(x_BxHxWxI, g_BxPxQxO, strides, padding,
                       w_KxLxIxO.shape))


def row_patches(src_RxC: jax.Array, idx_S: jax.Array, *, height: int,
                width: int, num_rows: int) -> jax.Array:
  """The `[S, 9, C]` 3x3 windows of `src` at rows `idx_S` (row_gather.cc).

  What `sparse.rows.patches` computes with XLA's gather (same values:
  copies of rows), 4-6x faster on the CPU: a neighbour outside the image,
  or any neighbour of a padding index (`>= num_rows`), reads row
  `num_rows`, clipped to `src`'s last row. Indices are non-negative.
  Float32 on the CPU only, and no gradient: the sparse path is inference.
  """
  _handlers()
  return jax.ffi.ffi_call(
      'SactRowPatches3x3',
      jax.ShapeDtypeStruct((idx_S.shape[0], 9, src_RxC.shape[1]),
                           src_RxC.dtype), vmap_method='sequential')(
          src_RxC, idx_S.astype(jnp.int32), height=np.int64(height),
          width=np.int64(width), num_rows=np.int64(num_rows))


def windows(x_BxHxWxI: jax.Array, kernel_hw, strides, padding) -> jax.Array:
  """A convolution's input windows as rows, `[B, P, Q, kh * kw * I]`, in
  one pass (row_gather.cc): what `conv.patches` computes with XLA's pad,
  slices and concatenation (same values: copies, zeros outside the map).
  Float32 on the CPU only, and no gradient (`conv._windows` has one)."""
  _handlers()
  (kh, kw), (sh, sw) = kernel_hw, strides
  top, left = padding[0][0], padding[1][0]
  batch, channels = x_BxHxWxI.shape[0], x_BxHxWxI.shape[3]
  out_h, out_w = _out_hw(x_BxHxWxI.shape, (kh, kw, channels, 1), strides,
                         padding)
  return jax.ffi.ffi_call(
      'SactWindows',
      jax.ShapeDtypeStruct((batch, out_h, out_w, kh * kw * channels),
                           x_BxHxWxI.dtype), vmap_method='sequential')(
          x_BxHxWxI, kh=np.int64(kh), kw=np.int64(kw), stride_h=np.int64(sh),
          stride_w=np.int64(sw), pad_top=np.int64(top),
          pad_left=np.int64(left))


def nonzero_rows(mask_N: jax.Array, length: int) -> jax.Array:
  """Sorted flat indices of `mask_N > 0`, padded with `N + 1` to `length`
  (row_gather.cc): `jnp.nonzero(mask_N > 0, size=length, fill_value=N +
  1)`, as `sparse.rows.indices` computes it with XLA. On the CPU only; the
  mask is read as float32."""
  _handlers()
  return jax.ffi.ffi_call(
      'SactNonzeroRows', jax.ShapeDtypeStruct((length,), jnp.int32),
      vmap_method='sequential')(mask_N.astype(jnp.float32))


def _tap_operands(tap_affine, channels: int) -> tuple[jax.Array, jax.Array]:
  """A head's tap kernel `[9, C]` and shift `[9]` (`SactHead.taps_affine`)
  as float32 operands, or empty ones (`[0, C]`, `[0]`) for no taps."""
  if tap_affine is None:
    return jnp.zeros((0, channels), jnp.float32), jnp.zeros((0,), jnp.float32)
  return tuple(a.astype(jnp.float32) for a in tap_affine)


def update_rows(x_NxC: jax.Array, out_NxC: jax.Array, xsum_BxC: jax.Array,
                taps_Nx9: jax.Array, idx_S: jax.Array,
                residual_SxC: jax.Array, weight_S: jax.Array,
                tap_affine: tuple[jax.Array, jax.Array] | None, *, hw: int,
                update_x: bool, with_rows: bool):
  """The active rows' update of a SACT block's maps (row_gather.cc).

  What `sparse.rows.update_rows` computes with XLA's scatters, in one
  pass: `(x, out, xsum, taps, rows)`; `taps` rewritten at the rows from
  `tap_affine` (`[9, C]` kernel, `[9]` shift) if given, `rows` the new `x`
  at the rows (`[S, C]`, 0 at padding indices) or None without
  `with_rows`. The maps are updated in place where the caller donates
  them. Float32 on the CPU only, and no gradient: the sparse path is
  inference.
  """
  _handlers()
  f32 = jnp.float32
  channels = x_NxC.shape[1]
  tap_affine = _tap_operands(tap_affine, channels)
  rows_shape = (idx_S.shape[0] if with_rows else 0, channels)
  maps = (x_NxC, out_NxC, xsum_BxC, taps_Nx9)
  *maps, rows = jax.ffi.ffi_call(
      'SactUpdateRows',
      (*(jax.ShapeDtypeStruct(m.shape, f32) for m in maps),
       jax.ShapeDtypeStruct(rows_shape, f32)),
      input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3},
      vmap_method='sequential')(
          *maps, residual_SxC, idx_S.astype(jnp.int32), weight_S.astype(f32),
          *tap_affine, hw=np.int64(hw),
          update_x=np.int64(update_x))
  return (*maps, rows if with_rows else None)


def update_dense(x_XxC: jax.Array, out_XxC: jax.Array | None,
                 residual_XxC: jax.Array | None, weight_X: jax.Array | None,
                 tap_affine: tuple[jax.Array, jax.Array], *, hw: int,
                 bias_C: jax.Array | None = None):
  """A densely run unit's update of a SACT block's maps (row_gather.cc).

  Maps `[..., C]` of any rank (rows of `C`; `hw` rows an image), `weight_X`
  their shape without `C`. Where `weight != 0` (the running positions),
  `out += weight * residual` and `x += residual`; then the per-image sums
  of the new `x` and its tap products `x @ kernel.T + shift`
  (`tap_affine`: `[9, C]`, `[9]`) at every row, in one pass: `(x, out,
  xsum_BxC, taps_Xx9)`. With `residual_XxC` None only the sums and taps of
  `x` (`out` None). With `out_XxC` None and a residual, `out` starts as `x`
  (written fresh: aliased to `x` XLA would copy it). With `weight_X` None
  and a residual, `x += residual` at every row and no `out` (None). With
  `bias_C`, the residual is `residual + bias` (added as each row is read).
  The maps are updated in place where the caller donates them. Float32 on
  the CPU only, no gradient.
  """
  _handlers()
  f32 = jnp.float32
  channels = x_XxC.shape[-1]
  rows = x_XxC.shape[:-1]
  update = residual_XxC is not None
  writes_out = update and weight_X is not None  # Else no `out` at all.
  reads_out = writes_out and out_XxC is not None  # Else it starts as `x`.
  empty = jnp.zeros((0, channels), f32)
  # Without an update `x` is only read: no aliased result (XLA would copy
  # it). An `out` written fresh from `x` is not aliased to anything.
  map_result = jax.ShapeDtypeStruct(x_XxC.shape if update else empty.shape,
                                    f32)
  out_result = map_result if writes_out else jax.ShapeDtypeStruct(
      empty.shape, f32)
  aliases = ({0: 0, 1: 1} if reads_out else {0: 0}) if update else {}
  new_x, new_out, xsum_BxC, taps_Xx9 = jax.ffi.ffi_call(
      'SactUpdateDense',
      (map_result, out_result,
       jax.ShapeDtypeStruct((math.prod(rows) // hw, channels), f32),
       jax.ShapeDtypeStruct((*rows, 9), f32)),
      input_output_aliases=aliases, vmap_method='sequential')(
          x_XxC, out_XxC if reads_out else empty,
          residual_XxC if update else empty,
          (weight_X if writes_out else jnp.zeros((0,), f32)).astype(f32),
          jnp.zeros((0,), f32) if bias_C is None else bias_C.astype(f32),
          *_tap_operands(tap_affine, channels), hw=np.int64(hw))
  return (new_x if update else x_XxC, new_out if writes_out else None,
          xsum_BxC, taps_Xx9)


def row_taps(x_NxC: jax.Array, idx_S: jax.Array, tap_affine,
             taps_Nx9: jax.Array) -> jax.Array:
  """`taps` with rows `idx_S` (those inside the map) set to `x[idx] @
  kernel.T + shift` (`tap_affine`: `[9, C]`, `[9]`), in one pass
  (row_gather.cc); in place where the caller donates `taps`. Float32 on
  the CPU only, no gradient."""
  _handlers()
  return jax.ffi.ffi_call(
      'SactRowTaps', jax.ShapeDtypeStruct(taps_Nx9.shape, jnp.float32),
      input_output_aliases={4: 0}, vmap_method='sequential')(
          x_NxC, idx_S.astype(jnp.int32),
          *_tap_operands(tap_affine, x_NxC.shape[1]), taps_Nx9)


def _unit_operand(unit) -> jax.Array:
  """The unit index of stacked matrices (`[1]`), or none (`[0]`)."""
  if unit is None:
    return jnp.zeros((0,), jnp.int32)
  return jnp.reshape(unit, (1,)).astype(jnp.int32)


def dilated_rows(x_NxC: jax.Array, y_RxD: jax.Array, idx_S: jax.Array,
                 matrices, unit=None, taps_Nx9: jax.Array | None = None,
                 tap_affine: tuple[jax.Array, jax.Array] | None = None):
  """A bottleneck unit's dilated stage at rows `idx_S`, written into `y`
  (row_stages.cc): `y[i] = relu(relu(x[i] * s0 + t0) @ w1 * s1 + t1)` for
  the indices inside `x` (`matrices`: `units.RowMatrices`; `unit` indexes
  stacked matrices). With `taps_Nx9` and `tap_affine` (`[9, C]`, `[9]`)
  also a head's tap products `x[i] @ kernel.T + shift` written into
  `taps` at the same rows: returns `(y, taps)`, else `y`. In place where
  the caller donates the maps. Float32 on the CPU only, no gradient."""
  _handlers()
  f32 = jnp.float32
  m = matrices
  with_taps = taps_Nx9 is not None
  if with_taps != (tap_affine is not None):
    raise ValueError('dilated_rows takes taps and tap_affine together.')
  kernel_9xC, shift_9 = _tap_operands(tap_affine, x_NxC.shape[1])
  if not with_taps:
    taps_Nx9 = jnp.zeros((0, 9), f32)
  y, taps = jax.ffi.ffi_call(
      'SactDilatedRows', (jax.ShapeDtypeStruct(y_RxD.shape, f32),
                          jax.ShapeDtypeStruct(taps_Nx9.shape, f32)),
      input_output_aliases={8: 0, 11: 1}, vmap_method='sequential')(
          x_NxC, idx_S.astype(jnp.int32),
          *(a.astype(f32) for a in (m.s0, m.t0, m.w1, m.s1, m.t1)),
          _unit_operand(unit), y_RxD, kernel_9xC, shift_9,
          taps_Nx9.astype(f32))
  return (y, taps) if with_taps else y


def active_rows(y_N1xD: jax.Array, idx_S: jax.Array, matrices, unit,
                cumulative_N: jax.Array, x_NxC: jax.Array, out_NxC: jax.Array,
                xsum_BxC: jax.Array, taps_Nx9: jax.Array,
                tap_affine: tuple[jax.Array, jax.Array] | None, *,
                height: int, width: int, update_x: bool):
  """A bottleneck unit's active stage and the block's update at rows
  `idx_S` (row_stages.cc): the residual `relu(p @ w2 * s2 + t2) @ w3 + b3`
  from the 3x3 windows `p` of `y` (`N + 1` rows, the last zero), then what
  `update_rows` does with it, weighted `1 - cumulative_N[i]` at row `i`:
  `(x, out, xsum, taps)`. The maps are updated
  in place where the caller donates them. Float32 on the CPU only, no
  gradient."""
  _handlers()
  f32 = jnp.float32
  m = matrices
  channels = x_NxC.shape[1]
  tap_affine = _tap_operands(tap_affine, channels)
  maps = (x_NxC, out_NxC, xsum_BxC, taps_Nx9)
  return tuple(jax.ffi.ffi_call(
      'SactActiveRows', tuple(jax.ShapeDtypeStruct(a.shape, f32)
                              for a in maps),
      input_output_aliases={9: 0, 10: 1, 11: 2, 12: 3},
      vmap_method='sequential')(
          y_N1xD, idx_S.astype(jnp.int32),
          *(a.astype(f32) for a in (m.w2, m.s2, m.t2, m.w3, m.b3)),
          _unit_operand(unit), cumulative_N.astype(f32), *maps,
          *tap_affine, height=np.int64(height),
          width=np.int64(width), update_x=np.int64(update_x)))
