"""Convolutions in the formulations XLA:CPU runs fastest, shape by shape.

`conv_general_dilated` is a drop-in replacement for
`lax.conv_general_dilated` (what `nnx.Conv(conv_general_dilated=...)`
expects); `layers.LayerFactory` uses it where the default backend is the
CPU. GPUs and TPUs keep XLA's native convolutions, except the SACT head's
3x3 convolution to one channel, which runs there as `window_sum` (one
fused reduction instead of a library call and its operands; in training,
with the head's BatchNorm, `affine_window_sum`). Each undilated,
ungrouped NHWC/HWIO convolution is a `conv2d` whose forward and backward
passes each run in one of six formulations (`formulation` picks them):

* 'onednn': oneDNN's kernels (those TensorFlow runs) as XLA custom calls,
  built at first use (`onednn.py`). The default for float32 wherever they
  are available (the SACT head's forward stays 'taps', and where oneDNN's
  forward would copy its weights on every call, as without AVX-512, so do
  small ones: see `formulation`): XLA:CPU's convolutions run the narrow
  ResNet shapes far below its dots' speed, oneDNN's near it.
* 'rows': a forward of oneDNN's too, where a convolution has few output
  positions (batch 1 in ImageNet's blocks 3-4): its windows as one image
  row, multiplied as two one-thread matmul halves (see `formulation`).

Where oneDNN's kernels are not available (no compiler, another
platform), the four below, XLA's own:

* 'conv': XLA's convolution. Inside a while loop (every `lax.scan`),
  XLA:CPU leaves the *backward* convolutions in non-canonical layouts that
  run 10-20x slower than the forward ones (the scan trap, BUILD.md), so the
  stride-1 backward is written as two ordinary NHWC/HWIO forward
  convolutions: the input gradient convolves the output gradient with the
  spatially flipped kernel whose in/out channels are swapped; the kernel
  gradient is a convolution in which batch and channel axes trade places.
* 'dot': one dot over the input windows (im2col, `patches`). XLA:CPU runs
  dots near the cores' peak and some convolutions far below it (1x1
  kernels above all).
* 'taps': for kernels with few output channels (the SACT halting head's
  3x3 conv to one channel): one dot from the input channels to every tap's
  outputs, then a sum of the taps shifted to their output positions.
  XLA's convolution spends as long on a 16 -> 1 conv as on a 16 -> 16 one.
* 's2d': strided kernels over few input channels (the ImageNet stem) as a
  stride-1 convolution over blocks of the input moved into channels
  (space-to-depth). `formulation` uses it forward only.

`compiler_options` names the XLA:CPU options under which these run best
(training and inference); `jit` applies them. `pick` and `stacked_unit`
let a loop over a block's stacked units have oneDNN read each unit's
kernel in place instead of a copy XLA would make of it; under
`valid_rows` such a unit's row matmuls skip the padding rows of a sparse
unit's last chunk.
`conv_affine_relu` and `conv_add_into` give a convolution with what
follows it per channel in evaluation (a batch norm and ReLU; a bias and
the sum into the residual stream) as one oneDNN call where oneDNN's
forward runs it.

Values agree up to float rounding; every other convolution falls through
to `lax.conv_general_dilated`.
"""

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sact_jax import onednn

_NHWC = ('NHWC', 'HWIO', 'NHWC')
Padding = tuple[tuple[int, int], tuple[int, int]]


def explicit_padding(padding, kernel_hw: Sequence[int],
                      strides: Sequence[int] = (1, 1),
                      in_hw: Sequence[int] | None = None) -> Padding | None:
  """((lo, hi), (lo, hi)) as XLA pads, or None if unsupported.

  'SAME' as XLA (and TF) define it: the output has ceil(in / stride)
  positions, the total padding that needs is split with the odd pixel at
  the end. With stride 1 this does not depend on the input size.
  """
  if isinstance(padding, str):
    if padding.upper() == 'VALID':
      return ((0, 0), (0, 0))
    if padding.upper() == 'SAME':
      pads = []
      for axis, (k, s) in enumerate(zip(kernel_hw, strides)):
        if s == 1:
          total = k - 1
        else:
          size = in_hw[axis]
          total = max((-(-size // s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    return None
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    return None
  return pads


def _native(x, w, strides, padding, precision):
  return lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _native_bwd(strides, padding, precision, x_BxHxWxI, w_KxLxIxO,
                g_BxPxQxO):
  """Input and kernel gradients as XLA computes them, in canonical layouts.

  Stride 1: two ordinary NHWC/HWIO forward convolutions (the scan trap
  above). Strided convolutions (first units of blocks, never under `scan`)
  take XLA's own transposes.
  """
  if tuple(strides) != (1, 1):
    _, vjp = jax.vjp(
        lambda x, w: _native(x, w, strides, padding, precision),
        x_BxHxWxI, w_KxLxIxO)
    return vjp(g_BxPxQxO)
  kh, kw = w_KxLxIxO.shape[:2]
  (top, bottom), (left, right) = padding
  del bottom, right
  # Input gradient: "full" correlation of g with the flipped, transposed
  # kernel. Padding k-1-lo before and k-1-hi after restores H x W exactly.
  w_flip_KxLxOxI = jnp.flip(w_KxLxIxO, (0, 1)).transpose(0, 1, 3, 2)
  h, w = x_BxHxWxI.shape[1:3]
  p, q = g_BxPxQxO.shape[1:3]
  dx_pad = ((kh - 1 - top, h - p + top),
            (kw - 1 - left, w - q + left))
  dx = lax.conv_general_dilated(
      g_BxPxQxO, w_flip_KxLxOxI, (1, 1), dx_pad,
      dimension_numbers=_NHWC, precision=precision)
  # Kernel gradient: dw[i,j,c,o] = sum_{b,y,x} xpad[b,y+i,x+j,c] g[b,y,x,o]
  # is a convolution with C as the batch, B as the contracted feature axis
  # and g as a P x Q kernel.
  x_IxHxWxB = x_BxHxWxI.transpose(3, 1, 2, 0)
  g_PxQxBxO = g_BxPxQxO.transpose(1, 2, 0, 3)
  dw_pad = ((top, kh - 1 + p - h - top), (left, kw - 1 + q - w - left))
  dw_IxKxLxO = lax.conv_general_dilated(
      x_IxHxWxB, g_PxQxBxO, (1, 1), dw_pad,
      dimension_numbers=_NHWC, precision=precision)
  return dx, dw_IxKxLxO.transpose(1, 2, 0, 3)


# ---------------------------------------------------------------------------
# Convolutions as dots (im2col)
# ---------------------------------------------------------------------------


def patches(x_BxHxWxI: jax.Array, kernel_hw: Sequence[int],
            strides: Sequence[int], padding: Padding) -> jax.Array:
  """The conv's input windows as rows: `[B, P, Q, kh * kw * I]`.

  Feature `(i * kw + j) * I + c` of output position (p, q) is the padded
  input at (p * sh + i, q * sw + j, c): the row-major HWIO order of
  `w.reshape(-1, O)`. A 1x1 kernel without padding is only a strided view.
  """
  kh, kw = kernel_hw
  sh, sw = strides
  (top, bottom), (left, right) = padding
  if (top, bottom, left, right) != (0, 0, 0, 0):
    x_BxHxWxI = jnp.pad(x_BxHxWxI,
                        ((0, 0), (top, bottom), (left, right), (0, 0)))
  h, w = x_BxHxWxI.shape[1:3]
  p, q = (h - kh) // sh + 1, (w - kw) // sw + 1
  taps = [x_BxHxWxI[:, i:i + (p - 1) * sh + 1:sh, j:j + (q - 1) * sw + 1:sw]
          for i in range(kh) for j in range(kw)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _dot(x, w, strides, padding, precision):
  rows = patches(x, w.shape[:2], strides, padding)
  return lax.dot_general(rows, w.reshape(-1, w.shape[-1]),
                         (((3,), (0,)), ((), ())), precision=precision)


def _dot_bwd(strides, padding, precision, x, w, g_BxPxQxO):
  """`dw = rows^T g` and `drows = g w^T` as dots; `dx` sums `drows` back
  onto the input (the transpose of `patches`). The windows are rebuilt
  from `x` (a copy, cheap next to the dots) instead of being stored."""
  rows, to_x = jax.vjp(
      lambda x_: patches(x_, w.shape[:2], strides, padding), x)
  dw = lax.dot_general(rows, g_BxPxQxO, (((0, 1, 2), (0, 1, 2)), ((), ())),
                       precision=precision)
  drows = lax.dot_general(g_BxPxQxO, w.reshape(-1, w.shape[-1]),
                          (((3,), (1,)), ((), ())), precision=precision)
  (dx,) = to_x(drows.astype(rows.dtype))
  return dx, dw.reshape(w.shape)


# ---------------------------------------------------------------------------
# Convolutions with few output channels as taps
# ---------------------------------------------------------------------------


def _taps_kernel(w_KxLxIxO: jax.Array) -> jax.Array:
  """`[I, kh * kw * O]`: column `(i * kw + j) * O + o` is tap (i, j)'s."""
  kh, kw, cin, cout = w_KxLxIxO.shape
  return w_KxLxIxO.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)


def _taps(x_BxHxWxI, w_KxLxIxO, strides, padding, precision):
  """`y[p, q] = sum_ij z[p*s + i, q*s + j, ij]` with `z = pad(x) w_ij`.

  The dot makes `kh * kw * O` channels per input position (fewer than the
  `I` it reads when `O` is small); the shifted sum is elementwise.
  """
  kh, kw, _, cout = w_KxLxIxO.shape
  sh, sw = strides
  z = lax.dot_general(x_BxHxWxI, _taps_kernel(w_KxLxIxO),
                      (((3,), (0,)), ((), ())), precision=precision)
  (top, bottom), (left, right) = padding
  z = jnp.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0)))
  b, h, w = z.shape[:3]
  z_BxHxWxKLxO = z.reshape(b, h, w, kh * kw, cout)
  p, q = (h - kh) // sh + 1, (w - kw) // sw + 1
  return sum(z_BxHxWxKLxO[:, i:i + (p - 1) * sh + 1:sh,
                          j:j + (q - 1) * sw + 1:sw, i * kw + j]
             for i in range(kh) for j in range(kw))


def _shifted_gradients(strides, padding, x_shape, w_shape, g_BxPxQxO):
  """`[B, H, W, kh * kw * O]`: what each tap of each input position
  received, channel `(i * kw + j) * O + o` for tap (i, j).

  Tap (i, j) of padded position (p * s + i, q * s + j) received g[p, q]:
  its gradient is `g` dilated by the stride and shifted by (i, j), and the
  taps stacked are one elementwise fusion. (Autodiff of the strided slices
  gives one scatter per tap instead, 25x slower on XLA:CPU.)
  """
  kh, kw, _, _ = w_shape
  sh, sw = strides
  (top, bottom), (left, right) = padding
  _, h, w, _ = x_shape
  hp, wp = h + top + bottom, w + left + right
  _, p, q, _ = g_BxPxQxO.shape
  zero = jnp.zeros((), g_BxPxQxO.dtype)
  taps = []
  for i in range(kh):
    for j in range(kw):
      taps.append(lax.pad(g_BxPxQxO, zero, (
          (0, 0, 0), (i, hp - i - (p - 1) * sh - 1, sh - 1),
          (j, wp - j - (q - 1) * sw - 1, sw - 1), (0, 0, 0))))
  return jnp.concatenate(taps, axis=-1)[:, top:top + h, left:left + w]


def _taps_bwd(strides, padding, precision, x_BxHxWxI, w_KxLxIxO, g_BxPxQxO):
  """The transpose of `_taps`, written out so that it stays two dots over
  the shifted gradients (`_shifted_gradients`)."""
  kh, kw, cin, cout = w_KxLxIxO.shape
  dz = _shifted_gradients(strides, padding, x_BxHxWxI.shape,
                          w_KxLxIxO.shape, g_BxPxQxO)
  dx = lax.dot_general(dz, _taps_kernel(w_KxLxIxO),
                       (((3,), (1,)), ((), ())), precision=precision)
  dw_IxT = lax.dot_general(x_BxHxWxI, dz, (((0, 1, 2), (0, 1, 2)), ((), ())),
                           precision=precision)
  return dx, dw_IxT.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


# ---------------------------------------------------------------------------
# Convolutions to one channel on accelerators
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def window_sum(x_BxHxWxI: jax.Array, w_KxLxIx1: jax.Array,
               padding: Padding) -> jax.Array:
  """A stride-1 convolution to one output channel as one reduction.

  `y[p, q] = sum_ij sum_c pad(x)[p + i, q + j, c] w[i, j, c]`, written as
  elementwise products of shifted windows summed over the channels. XLA on
  a GPU or TPU fuses all of it, with the zero padding and whatever
  elementwise ops produce `x` (the SACT head's BatchNorm), into a single
  reduction kernel. XLA's convolution is a library call instead, plus
  kernels that put its operands in place (the kernel sliced out of a
  unit's stack, the bias), each costing a few microseconds in a loop that
  runs at batch 1 (BUILD.md, "ACT and SACT over vanilla on a GPU"). The
  backward pass is the `taps` formulation's (`_window_sum_bwd`). Not for
  XLA:CPU, whose `taps` forward is faster there.
  """
  kh, kw, _, cout = w_KxLxIx1.shape
  if cout != 1:
    raise ValueError(f'window_sum makes one output channel; the kernel '
                     f'{w_KxLxIx1.shape} has {cout}.')
  (top, bottom), (left, right) = padding
  x = jnp.pad(x_BxHxWxI, ((0, 0), (top, bottom), (left, right), (0, 0)))
  p, q = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  products = sum(x[:, i:i + p, j:j + q] * w_KxLxIx1[i, j, :, 0]
                 for i in range(kh) for j in range(kw))
  return jnp.sum(products, axis=-1, keepdims=True)


def _window_sum_fwd(x, w, padding):
  return window_sum(x, w, padding), (x, w)


def _window_sum_bwd(padding, residuals, g_BxPxQx1):
  """The output gradient at every tap's shift (`_shifted_gradients`, a
  small map), where autodiff of the windows makes a kernel per tap.

  The input's gradient is then the sum over the taps of that map times
  the tap's weights, written as elementwise products so that XLA merges
  it into the fusion that adds the input's other gradients: as `_taps_bwd`'s
  dot, a GPU wrote it out as a map and read it back (a SACT head's
  backward pass, a map of the unit's width each way). The kernel's
  gradient stays a dot, which reads the input once.
  """
  x_BxHxWxI, w_KxLxIx1 = residuals
  dz_BxHxWxT, dx = _window_gradients(padding, x_BxHxWxI.shape, w_KxLxIx1,
                                     g_BxPxQx1)
  dw_IxT = lax.dot_general(x_BxHxWxI, dz_BxHxWxT,
                           (((0, 1, 2), (0, 1, 2)), ((), ())))
  return dx, _as_kernel(dw_IxT, w_KxLxIx1.shape)


def _window_gradients(padding, x_shape, w_KxLxIx1, g_BxPxQx1
                      ) -> tuple[jax.Array, jax.Array]:
  """The backward pass of window sums, less the kernel's gradient: the
  output gradient at every tap's shift `[B, H, W, T]`, and the input's
  gradient as its elementwise products with the taps' weights."""
  kh, kw, cin, _ = w_KxLxIx1.shape
  dz_BxHxWxT = _shifted_gradients((1, 1), padding, x_shape, w_KxLxIx1.shape,
                                  g_BxPxQx1)
  w_TxI = w_KxLxIx1.reshape(kh * kw, cin)
  return dz_BxHxWxT, sum(dz_BxHxWxT[..., t:t + 1] * w_TxI[t]
                         for t in range(kh * kw))


def _as_kernel(dw_IxT: jax.Array, w_shape) -> jax.Array:
  """A `[I, kh * kw]` gradient in the one-channel kernel's HWIO layout."""
  kh, kw, cin, _ = w_shape
  return dw_IxT.reshape(cin, kh, kw, 1).transpose(1, 2, 0, 3)


window_sum.defvjp(_window_sum_fwd, _window_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def affine_window_sum(x_BxHxWxI: jax.Array, scale_I: jax.Array,
                      shift_I: jax.Array, w_KxLxIx1: jax.Array,
                      padding: Padding,
                      activation: Callable[[jax.Array], jax.Array]
                      ) -> jax.Array:
  """`window_sum(activation(x * scale + shift), w)`: the SACT head's local
  term in training, its BatchNorm as a per-channel affine map of `x`.

  The backward pass keeps only `x` (which the unit keeps anyway) and
  recomputes the activation from it: the input's gradient is elementwise
  (XLA merges it into the fusion that adds up `x`'s other gradients), the
  kernel's, the scale's and the shift's are sums over the batch and the
  positions of products of `x`'s values with the shifted output
  gradient. Autodiff of the composition kept the normalised map and the
  activation's slopes for every unit and read them back in kernels of
  their own (BUILD.md, "ACT and SACT over vanilla on a GPU"). The
  activation must be elementwise.
  """
  return window_sum(activation(x_BxHxWxI * scale_I + shift_I), w_KxLxIx1,
                    padding)


def _affine_window_sum_fwd(x, scale, shift, w, padding, activation):
  # Scale and shift kept as one array: inside a scan over units every kept
  # value is a store (a kernel on a GPU) per unit.
  return (affine_window_sum(x, scale, shift, w, padding, activation),
          (x, jnp.stack([scale, shift]), w))


def _affine_window_sum_bwd(padding, activation, residuals, g_BxPxQx1):
  x_BxHxWxI, (scale_I, shift_I), w_KxLxIx1 = residuals
  f, activation_vjp = jax.vjp(activation, x_BxHxWxI * scale_I + shift_I)
  dz_BxHxWxT, df = _window_gradients(padding, x_BxHxWxI.shape, w_KxLxIx1,
                                     g_BxPxQx1)
  dy, = activation_vjp(df)
  axes = (0, 1, 2)
  dw_IxT = jnp.sum(f[..., None] * dz_BxHxWxT[..., None, :], axes)
  return (dy * scale_I, jnp.sum(dy * x_BxHxWxI, axes), jnp.sum(dy, axes),
          _as_kernel(dw_IxT, w_KxLxIx1.shape))


affine_window_sum.defvjp(_affine_window_sum_fwd, _affine_window_sum_bwd)


# ---------------------------------------------------------------------------
# Strided convolutions with few input channels on a space-to-depth input
# ---------------------------------------------------------------------------


def _s2d(x_BxHxWxI, w_KxLxIxO, strides, padding, precision):
  """A stride-s conv as a stride-1 conv on `s x s` blocks of the input.

  Block (p, q) of the padded input holds its `sh * sw * I` values as
  channels, and the kernel, zero-padded to whole blocks, is cut the same
  way, so output (p, q) reads the same products: the ImageNet stem (7x7,
  stride 2, 3 channels) becomes a 4x4 conv over 12 channels, which XLA:CPU
  runs faster than the 7x7 one despite the zero taps (64 vs 49).
  """
  kh, kw, cin, cout = w_KxLxIxO.shape
  sh, sw = strides
  b, h, w, _ = x_BxHxWxI.shape
  (top, bottom), (left, right) = padding
  p = (h + top + bottom - kh) // sh + 1
  q = (w + left + right - kw) // sw + 1
  bh, bw = -(-kh // sh), -(-kw // sw)  # The kernel in blocks.
  hp, wp = (p - 1 + bh) * sh, (q - 1 + bw) * sw  # The rows output p reads.
  # Negative high padding crops rows that no output reads.
  x = lax.pad(x_BxHxWxI, jnp.zeros((), x_BxHxWxI.dtype), (
      (0, 0, 0), (top, hp - top - h, 0), (left, wp - left - w, 0),
      (0, 0, 0)))
  x = x.reshape(b, hp // sh, sh, wp // sw, sw, cin).transpose(
      0, 1, 3, 2, 4, 5).reshape(b, hp // sh, wp // sw, sh * sw * cin)
  k = jnp.pad(w_KxLxIxO, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0),
                          (0, 0)))
  k = k.reshape(bh, sh, bw, sw, cin, cout).transpose(
      0, 2, 1, 3, 4, 5).reshape(bh, bw, sh * sw * cin, cout)
  return lax.conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0)),
                                  dimension_numbers=_NHWC,
                                  precision=precision)


def _s2d_bwd(strides, padding, precision, x, w, g_BxPxQxO):
  _, vjp = jax.vjp(lambda x, w: _s2d(x, w, strides, padding, precision),
                   x, w)
  return vjp(g_BxPxQxO)


# ---------------------------------------------------------------------------
# Few output positions: one row matmul over the windows
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _windows(x_BxHxWxI, kernel_hw, strides, padding):
  """`patches` as one custom call (`onednn.windows`) where `_rows` runs:
  XLA's pad, slices and concatenation are passes of their own (row_gather.cc's
  `Windows` says what they cost). Differentiated like `patches`."""
  return onednn.windows(x_BxHxWxI, kernel_hw, strides, padding)


def _windows_fwd(x, kernel_hw, strides, padding):
  return _windows(x, kernel_hw, strides, padding), x


def _windows_bwd(kernel_hw, strides, padding, x, g):
  _, to_x = jax.vjp(lambda x_: patches(x_, kernel_hw, strides, padding), x)
  return to_x(g)


_windows.defvjp(_windows_fwd, _windows_bwd)


def _rows(x_BxHxWxI, w_KxLxIxO, strides, padding, precision=None,
          index=None, affine=None):
  """oneDNN's forward as a 1x1 convolution over one image row of windows.

  The windows (`patches`) become `[1, 1, B * P * Q, kh * kw * I]`, which
  oneDNN runs as two one-thread matmul halves, one on XLA's thread pool
  (`onednn.forward_splits`), instead of its direct convolution on a team
  of OpenMP threads. With `index`, `w` is a stack `[U, kh, kw, I, O]` and
  kernel `index` of it is read in place (`onednn.forward_stacked`). With
  `affine` `(scale, shift)`, `relu(y * scale + shift)`
  (`onednn.forward_affine_relu`, not differentiable).
  """
  kernel_hw = tuple(w_KxLxIxO.shape[-4:-2])
  if kernel_hw == (1, 1):  # The map itself (`_subsampled` ran before).
    rows = patches(x_BxHxWxI, kernel_hw, strides, padding)
  else:
    rows = _windows(x_BxHxWxI, kernel_hw, tuple(strides),
                    tuple(map(tuple, padding)))
  batch, p, q, depth = rows.shape
  row = rows.reshape(1, 1, batch * p * q, depth)
  w = w_KxLxIxO.reshape(*w_KxLxIxO.shape[:-4], 1, 1, depth,
                        w_KxLxIxO.shape[-1])
  unpadded = ((0, 0), (0, 0))
  if affine is not None:
    y = onednn.forward_affine_relu(row, w, *affine, (1, 1), unpadded, index)
  elif index is None:
    y = onednn.forward(row, w, (1, 1), unpadded, precision)
  else:
    y = onednn.forward_stacked(row, w, index, (1, 1), unpadded)
  return y.reshape(batch, p, q, w.shape[-1])


# ---------------------------------------------------------------------------
# One convolution, each pass in its formulation
# ---------------------------------------------------------------------------

FORMULATIONS = ('conv', 'dot', 'taps', 's2d', 'onednn', 'rows')
_FORWARD = {'conv': _native, 'dot': _dot, 'taps': _taps, 's2d': _s2d,
            'onednn': onednn.forward, 'rows': _rows}
_BACKWARD = {'conv': _native_bwd, 'dot': _dot_bwd, 'taps': _taps_bwd,
             's2d': _s2d_bwd, 'onednn': onednn.backward,
             'rows': onednn.backward}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv2d(x_BxHxWxI, w_KxLxIxO, strides: tuple[int, int], padding: Padding,
           precision=None, forward: str = 'conv', backward: str = 'conv'):
  """An NHWC/HWIO convolution whose passes each run in a formulation.

  'conv': XLA's convolution (stride-1 backward as two canonical-layout
  forward convolutions). 'dot': one dot over the input windows (`patches`).
  'taps': a dot to every tap's outputs and a shifted sum (few output
  channels). 's2d': a stride-1 conv over space-to-depth blocks (strided,
  few input channels). 'onednn': oneDNN's kernels (float32, where
  `onednn.supported`). 'rows': oneDNN's 1x1 forward over the windows as
  one image row, where the convolution is not differentiated (else, and
  backward, 'onednn'). The values are the same up to float rounding; only
  the speed differs. Every backward pass keeps only `x` and `w` as
  residuals.
  """
  return _FORWARD[forward](x_BxHxWxI, w_KxLxIxO, strides, padding,
                           precision).astype(x_BxHxWxI.dtype)


def _conv2d_fwd(x, w, strides, padding, precision, forward, backward):
  # 'rows' serves inference: differentiated, the forward runs as oneDNN's
  # convolution, which its backward passes follow faster (BUILD.md, "Few
  # output positions as one row matmul").
  forward = 'onednn' if forward == 'rows' else forward
  y = conv2d(x, w, strides, padding, precision, forward, backward)
  return y, (x, w)


def _conv2d_bwd(strides, padding, precision, forward, backward, residuals,
                g_BxPxQxO):
  del forward
  x, w = residuals
  dx, dw = _BACKWARD[backward](strides, padding, precision, x, w,
                               g_BxPxQxO)
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == (
        (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


# Where oneDNN's kernels are built (`onednn.available()`) they run every
# float32 convolution but two kinds, forward and backward: measured with
# `benchmarks/conv_formulations.py --formulations=conv,dot,taps,onednn` on
# a 2-core AVX-512 CPU (BUILD.md, "Convolutions on XLA:CPU"), against the
# formulation picked below without them, over the 47 shapes of the CIFAR
# and ImageNet ResNets at batch 1, 32 and 128: the backward 1.0-12.6x
# faster at 44 (0.67-0.92x at three), the forward 0.58-9.4x, as fast or
# faster at 34; a CIFAR ResNet's training step gains more than any single
# shape loses (0.64-0.94x the time). The two kinds:
# * the SACT head's 3x3 conv to one channel runs its forward as taps,
#   2.3-3.3x faster, and over at most 64 channels (CIFAR) its backward too:
#   alone about as fast as oneDNN's, but oneDNN's passes run one at a time
#   in the process, and the head's small memory-bound ones queued beside
#   the units' convolutions (CIFAR SACT training steps 0-8% faster with
#   taps, 3-5% in most runs; ImageNet's 9% slower: BUILD.md, "oneDNN's
#   kernels");
# * where oneDNN's forward copies its weights into its own layout on every
#   call (CPUs without AVX-512: `onednn.forward_copies_weights`), 1x1
#   convolutions and those with few output rows run XLA's formulation
#   below. A 2-core AVX2 EPYC (same benchmark, batch 1 / 32, GFLOP/s of
#   XLA's vs oneDNN's forward): 1x1 126 vs 112, 120 vs 91, 118 vs 96 at
#   3136 / 3136 / 196 rows and 132 vs 91, 143 vs 124 at batch 32; 3x3 at
#   49 / 196 rows 75 vs 33, 112 vs 91, and from 784 rows on oneDNN as fast
#   or faster (the stem 131 vs 75). The ImageNet ResNet-101 at batch 1
#   then ran at 0.97-1.00 of XLA's time against 1.07-1.14 with oneDNN's
#   forward everywhere in a slow phase of that shared VM (all within 1.5%
#   in a fast one: the copies cost most where memory bandwidth is short),
#   `sparse.apply` at 0.86-0.90 of its time before in both; batch 32 equal.
#
# Where oneDNN's forward has few output positions (at most 256, or 4096
# for 1x1 kernels) and is not differentiated, it runs as 'rows': the
# windows as one image row, which oneDNN multiplies as two one-thread
# matmul halves, one on XLA's thread pool (`onednn.forward_splits`),
# where its direct convolution would wake an OpenMP team from one of XLA's
# threads (onednn_conv.cc, `RunSplit`). On a 2-core Intel Xeon (AVX-512)
# the ImageNet ResNet-101's dense batch-1 forward took 0.83 of its time
# and `sparse.apply` 0.93-0.95; 3x3 kernels over 784 positions lost (the
# windows' copy), and differentiated convolutions' backward passes ran
# slower after it (BUILD.md, "Few output positions as one row matmul").
# Since one image's direct forward runs as two one-thread halves of its
# output rows (`onednn.forward_row_halves`), no team either, kernels wider
# than 1x1 keep it there: the ImageNet ResNet-101's dense batch-1 forward
# (its 14x14 and 7x7 3x3 convolutions) then took 0.947-0.949 of its time
# on a 2-core Zen 4, `sparse.apply` 0.995-1.005 (two processes in
# lockstep, 40 rounds each way; BUILD.md, "Halves of a batch-1
# convolution").
#
# Without oneDNN, where a dot beats XLA:CPU's convolution (the same
# benchmark, before oneDNN):
# * 1x1 kernels: a 1x1 convolution is a dot already, which XLA's emitter
#   runs 1.2-6x slower than its dot (29 vs 148 GFLOP/s at 56x56x256 ->
#   64, batch 32); strided ones forward need a strided copy first, which
#   costs as much as it saves.
# * Backward of wide 3x3 convolutions on few rows (ImageNet blocks 2-4 at
#   batch 1): 1.3-3.4x faster as dots. Everywhere else (narrow channels,
#   many rows, every forward 3x3) the windows' copy costs more than the
#   dot saves: XLA's convolution stays.
# * Few output channels (kh * kw * O <= I: the SACT head's 3x3 conv to one
#   channel) as taps: 16 -> 1 at 32x32, batch 128, forward / backward:
#   4.2 / 6.6 ms as XLA's conv (Eigen), 0.7 / 2.7 ms as taps; 64 -> 1 at
#   8x8: 0.8 / 1.4 ms vs 0.2 / 0.6 ms.
# * Strided kernels over at most 16 channels once in blocks (the ImageNet
#   stem, 7x7 / 2 over 3 channels) forward as 's2d': 224x224, batch 1 / 32,
#   3.5 / 157 ms against XLA's 4.5 / 171 ms (AVX2 EPYC). Backward, the
#   kernel gradient (all that training needs of the stem) was 5-9% slower
#   as 's2d' (batch 8 / 32, forward + kernel gradient 94.5 / 380 ms vs
#   90.2 / 348), so it stays XLA's; only the unused input gradient gained.
_ONEDNN_COPY_MIN_ROWS = 512
_DOT_BACKWARD_MAX_ROWS = 1024
_DOT_BACKWARD_MIN_CHANNELS = 128
_S2D_MAX_CHANNELS = 16
_TAPS_BACKWARD_MAX_CHANNELS = 64
_ROWS_FORWARD_MAX_ROWS = 256
_ROWS_FORWARD_MAX_ROWS_1X1 = 4096


def formulation(x_shape: Sequence[int], w_shape: Sequence[int],
                strides: Sequence[int], use_onednn: bool = False,
                onednn_copies_weights: bool = False,
                onednn_splits_rows: bool = False,
                onednn_row_halves: bool = False) -> tuple[str, str]:
  """(forward, backward) formulations of a convolution on XLA:CPU.

  Args:
    x_shape: `[B, H, W, I]` input shape.
    w_shape: `[kh, kw, I, O]` kernel shape.
    strides: `(sh, sw)`.
    use_onednn: whether oneDNN's kernels may run it (built, float32,
      supported padding: `conv_general_dilated` decides).
    onednn_copies_weights: whether oneDNN's forward would copy the weights
      into its own layout on every call (`onednn.forward_copies_weights`).
    onednn_splits_rows: whether oneDNN would run the windows as one image
      row in two matmul halves (`onednn.forward_splits`).
    onednn_row_halves: whether oneDNN's direct forward would run as two
      halves of its output rows (`onednn.forward_row_halves`): then a
      kernel wider than 1x1 keeps it rather than 'rows'.

  Returns:
    Each of the two passes' formulation, 'conv', 'dot', 'taps', 's2d',
    'onednn' or 'rows' (see `conv2d`).
  """
  kh, kw, cin, cout = w_shape
  few_outputs = (kh, kw) != (1, 1) and kh * kw * cout <= cin
  out_rows = x_shape[0] * math.prod(
      -(-size // stride) for size, stride in zip(x_shape[1:3], strides))
  if use_onednn:
    if few_outputs:
      return ('taps', 'taps' if cin <= _TAPS_BACKWARD_MAX_CHANNELS
              else 'onednn')
    if onednn_copies_weights and ((kh, kw) == (1, 1)
                                  or out_rows < _ONEDNN_COPY_MIN_ROWS):
      return (formulation(x_shape, w_shape, strides)[0], 'onednn')
    one_row = tuple(x_shape[:2]) == (1, 1) and (kh, kw) == (1, 1)
    max_rows = (_ROWS_FORWARD_MAX_ROWS_1X1 if (kh, kw) == (1, 1)
                else _ROWS_FORWARD_MAX_ROWS)
    direct_halves = onednn_row_halves and (kh, kw) != (1, 1)
    if (onednn_splits_rows and not one_row and out_rows <= max_rows
        and not direct_halves):
      return ('rows', 'onednn')
    return ('onednn', 'onednn')
  if few_outputs:
    return ('taps', 'taps')
  if (kh, kw) == (1, 1):
    return ('conv' if tuple(strides) != (1, 1) else 'dot', 'dot')
  wide_and_few = (out_rows <= _DOT_BACKWARD_MAX_ROWS
                  and cin >= _DOT_BACKWARD_MIN_CHANNELS)
  few_in_blocks = (tuple(strides) != (1, 1)
                   and cin * math.prod(strides) <= _S2D_MAX_CHANNELS)
  return ('s2d' if few_in_blocks else 'conv',
          'dot' if wide_and_few else 'conv')


def chosen_formulation(x_shape: Sequence[int], w_shape: Sequence[int],
                       strides: Sequence[int], padding: Padding,
                       dtype) -> tuple[str, str]:
  """`formulation` as `conv_general_dilated` asks it here and now: with
  oneDNN where it runs this convolution (`dtype` None: the operands'
  dtypes differ), whether its forward would copy the weights, whether it
  would split the windows as one row and whether its direct forward would
  run as two halves of its rows."""
  use_onednn = (dtype is not None
                and onednn.supported(x_shape, w_shape, strides, padding,
                                     dtype)
                and onednn.enabled())
  copies = use_onednn and onednn.forward_copies_weights(
      tuple(x_shape), tuple(w_shape), tuple(strides), padding)
  splits = use_onednn and not copies and onednn.windows_split(
      x_shape, w_shape, strides, padding)
  halves = splits and tuple(w_shape[:2]) != (1, 1) and (
      onednn.forward_row_halves(tuple(x_shape), tuple(w_shape),
                                tuple(strides), padding))
  return formulation(x_shape, w_shape, strides, use_onednn, copies, splits,
                     halves)


# ---------------------------------------------------------------------------
# Kernels read from their stack
# ---------------------------------------------------------------------------

# Units 2..L of a block keep their parameters stacked along a leading axis,
# and a loop over them slices unit i's out of the stacks. XLA:CPU copies a
# slice before a custom call reads it: for oneDNN's forward that is every
# kernel of every unit on every call (4.4 MB per ImageNet ResNet-101 block-3
# unit; 9.8 ms of a 100 ms batch-1 forward, against none when the loop is
# unrolled). `pick` leaves those kernels stacked, and `conv_general_dilated`
# then has oneDNN read unit `stacked_unit`'s kernel where it lies.
_UNIT = contextvars.ContextVar('sact_jax_conv_unit', default=None)


def kernels_read_in_place(module: nnx.Module, prefix: tuple[str, ...] = ()
                          ) -> frozenset[tuple[str, ...]]:
  """Paths of `module`'s conv kernels that `pick` may leave stacked.

  Those of its `nnx.Conv`s that run through `conv_general_dilated` while
  oneDNN's kernels are enabled (elsewhere nothing reads a stack in place),
  named as `nnx.split` of a module that holds `module` at `prefix` does.
  Only for modules that use their kernels through their convs alone.
  """
  if not onednn.enabled():
    return frozenset()
  return frozenset(
      (*prefix, *(str(p) for p in path), 'kernel')
      for path, node in nnx.iter_graph(module)
      if isinstance(node, nnx.Conv)
      and node.conv_general_dilated is conv_general_dilated)


def _names(key_path) -> tuple[str, ...]:
  names = tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(
      k, 'idx', k)))) for k in key_path)
  return names[:-1] if names and names[-1] == 'value' else names


def pick(stacked_state, index: jax.Array,
         in_place: frozenset[tuple[str, ...]] = frozenset()):
  """Slice `index` (traced) of stacked variables, inside a loop.

  The kernels at `in_place` (`kernels_read_in_place`) stay whole: run the
  module merged from the result under `stacked_unit(index)`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a if _names(path) in in_place
      else lax.dynamic_index_in_dim(a, index, keepdims=False), stacked_state)


def current_unit() -> jax.Array | None:
  """The index of the enclosing `stacked_unit`, else None: the unit whose
  matrices a custom call reads from a stack `pick` left whole."""
  return _UNIT.get()


@contextlib.contextmanager
def stacked_unit(index: jax.Array):
  """Within: a conv whose kernel has a leading stack axis uses kernel `index`.

  (Of the stacks `pick` left whole.) Where oneDNN's forward runs the conv it
  reads that kernel in place; anywhere else the kernel is sliced as before.
  """
  token = _UNIT.set(index)
  try:
    yield
  finally:
    _UNIT.reset(token)


_ROWS = contextvars.ContextVar('sact_jax_conv_rows', default=None)


@contextlib.contextmanager
def valid_rows(count: jax.Array | int | None):
  """Within: the positions of a row matmul from `count` on are padding.

  A convolution with a stacked kernel (`stacked_unit`) over one row of
  positions (`onednn.is_row`: the sparse path's row matmuls) that oneDNN's
  forward runs computes its first `count` positions only and writes zeros
  at the others (`onednn.forward_stacked`); elsewhere every position is
  computed. For the last chunk of a sparse unit's rows, whose bucketed
  size adds padding rows (`sparse.rows.row_loop`). None: no count. Read
  when a function is traced, as `stacked_unit` is.
  """
  token = _ROWS.set(count)
  try:
    yield
  finally:
    _ROWS.reset(token)


def _rows_of(x_shape, w_shape, strides, padding):
  """`valid_rows`' count where it applies to this convolution, else None."""
  count = _ROWS.get()
  if count is None or not onednn.is_row(x_shape, w_shape, strides, padding):
    return None
  return jnp.asarray(count, jnp.int32)


def _unit_of_stack(lhs, rhs) -> jax.Array | None:
  """`stacked_unit`'s index where `rhs` is a stack of kernels that `pick`
  left whole (one axis more than `lhs`), else None."""
  if rhs.ndim != lhs.ndim + 1:
    return None
  unit = _UNIT.get()
  if unit is None:
    raise ValueError(f'A stack of kernels {rhs.shape} outside '
                     '`conv.stacked_unit`.')
  return unit


def _subsampled(x_BxHxWxI, w_shape, strides, pads, dtype):
  """A strided unpadded 1x1 convolution's input subsampled, stride 1.

  Such a convolution (the ImageNet ResNets' projection shortcuts) reads
  every `s`-th position only, and over an even size it skips the last
  row and column, which oneDNN's kernels do not take (`onednn.supported`):
  it ran as XLA's convolution, 1.2-1.5x slower than oneDNN's at batch 32
  and, at batch 1, beside oneDNN's next convolution on another thread,
  which it then slowed 3x (BUILD.md, "oneDNN's kernels"). The strided slice
  first is exact and leaves a stride-1 1x1 convolution, which oneDNN runs
  where its forward reads the weights in place; elsewhere nothing changes.
  """
  if (tuple(w_shape[:2]) != (1, 1) or tuple(strides) == (1, 1)
      or pads != ((0, 0), (0, 0))):
    return x_BxHxWxI, strides
  sh, sw = strides
  x_sub = x_BxHxWxI[:, ::sh, ::sw]
  if chosen_formulation(x_sub.shape, w_shape, (1, 1), pads,
                        dtype)[0] not in ('onednn', 'rows'):
    return x_BxHxWxI, strides
  return x_sub, (1, 1)


def conv_general_dilated(lhs, rhs, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs: Any):
  """`lax.conv_general_dilated` in the formulations XLA:CPU runs fastest.

  Signature-compatible with `lax.conv_general_dilated`, so it can be given to
  `nnx.Conv(conv_general_dilated=...)`. Undilated, ungrouped NHWC/HWIO
  convolutions run as `formulation` says; anything else falls through to
  `lax.conv_general_dilated`.
  """
  unit = _unit_of_stack(lhs, rhs)
  if unit is not None:
    # Where oneDNN's forward runs, the slice is unused (XLA drops it).
    stack, rhs = rhs, lax.dynamic_index_in_dim(rhs, unit, keepdims=False)
  strides = tuple(int(s) for s in window_strides)
  simple = (
      lhs.ndim == 4
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
      and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
      and feature_group_count == 1
      and _is_nhwc(dimension_numbers)
      and kwargs.get('preferred_element_type') is None
      and kwargs.get('out_sharding') is None
  )
  pads = (explicit_padding(padding, rhs.shape[:2], strides, lhs.shape[1:3])
          if simple else None)
  if pads is not None:
    dtype = lhs.dtype if rhs.dtype == lhs.dtype else None
    lhs, strides = _subsampled(lhs, rhs.shape, strides, pads, dtype)
    forward, backward = chosen_formulation(lhs.shape, rhs.shape, strides,
                                           pads, dtype)
    if unit is not None and forward == 'rows':
      return _rows(lhs, stack, strides, pads, index=unit).astype(lhs.dtype)
    if unit is not None and (forward, backward) == ('onednn', 'onednn'):
      return onednn.forward_stacked(
          lhs, stack, unit, strides, pads,
          _rows_of(lhs.shape, stack.shape, strides, pads)).astype(lhs.dtype)
    return conv2d(lhs, rhs, strides, pads, precision, forward, backward)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


# ---------------------------------------------------------------------------
# A convolution and what follows it per channel, in evaluation
# ---------------------------------------------------------------------------

# In evaluation a bottleneck unit's conv1 and conv2 are each followed by a
# batch norm (a per-channel affine map) and a ReLU, and its conv3 by its
# bias and the sum into the residual stream. As XLA's fusions each is a pass
# over a map; as oneDNN's post-ops they are applied to the output while it
# is in cache (BUILD.md, "Batch norm, ReLU and the residual sum inside
# oneDNN's convolutions").


def _onednn_route(lhs, rhs, window_strides, padding):
  """`(x, strides, pads, unit, forward)` where oneDNN's forward runs this
  convolution (`forward` 'onednn' or 'rows', `x` and `strides` after
  `_subsampled`, `unit` the `stacked_unit` index where `rhs` is a stack),
  else None."""
  strides = tuple(int(s) for s in window_strides)
  kernel_shape = rhs.shape[-4:]
  unit = _unit_of_stack(lhs, rhs)
  pads = explicit_padding(padding, kernel_shape[:2], strides, lhs.shape[1:3])
  if lhs.ndim != 4 or pads is None or rhs.dtype != lhs.dtype:
    return None
  x, strides = _subsampled(lhs, kernel_shape, strides, pads, lhs.dtype)
  forward = chosen_formulation(x.shape, kernel_shape, strides, pads,
                               lhs.dtype)[0]
  if forward not in ('onednn', 'rows'):
    return None
  return x, strides, pads, unit, forward


def conv_affine_relu(lhs, rhs, window_strides, padding, scale_O, shift_O,
                     precision=None):
  """`relu(conv(lhs, rhs) * scale + shift)`, `conv` as
  `conv_general_dilated` runs it (NHWC/HWIO; `rhs` may be a stack that
  `pick` left whole).

  Where oneDNN's forward runs the convolution, the affine map and the ReLU
  are its post-ops, one custom call; under differentiation the steps run
  apart, the convolution in its differentiable formulation. Elsewhere
  three steps.
  """
  return _conv_then('affine_relu', (scale_O, shift_O), ('onednn', 'rows'),
                    lhs, rhs, window_strides, padding, precision)


def conv_add_into(lhs, rhs, window_strides, padding, bias_O, into_BxPxQxO,
                  precision=None):
  """`into + conv(lhs, rhs) + bias` (a residual unit's last convolution
  and the sum into the residual stream), `conv` as `conv_affine_relu`'s.

  Where oneDNN's direct forward runs the convolution ('onednn'), one custom
  call that adds into `into`'s buffer (XLA copies `into` first where it is
  used after). 'rows' keeps the sum apart: there the sum made oneDNN's
  matmul halves slower than they and XLA's sum took (the ImageNet
  ResNet-101 at batch 1 1.065x its time).
  """
  return _conv_then('add_into', (bias_O, into_BxPxQxO), ('onednn',), lhs,
                    rhs, window_strides, padding, precision)


def _conv_then(post, operands, fused_forwards, lhs, rhs, window_strides,
               padding, precision):
  """The convolution and `post` (`_post_ops`) as one oneDNN call where
  oneDNN's forward runs it in one of `fused_forwards`, else apart."""
  route = _onednn_route(lhs, rhs, window_strides, padding)
  if route is not None and route[4] in fused_forwards:
    x, strides, pads, unit, forward = route
    return _fused(x, rhs, operands, unit, post, strides, pads, forward)
  return _post_ops(post, conv_general_dilated(
      lhs, rhs, window_strides, padding, dimension_numbers=_NHWC,
      precision=precision), operands)


def _post_ops(post, y, operands):
  """What follows the convolution's output `y`, as XLA's operations:
  'affine_relu' (`operands` the scale and the shift) or 'add_into' (the
  bias and `into`)."""
  if post == 'affine_relu':
    scale, shift = operands
    return jax.nn.relu(y * scale + shift)
  bias, into = operands
  return into + (y + bias)


def _unfused(x, w, operands, index, post, strides, padding):
  """`_fused` as separate steps, the convolution differentiable (oneDNN's
  'onednn' passes)."""
  if index is None:
    y = conv2d(x, w, strides, padding, None, 'onednn', 'onednn')
  else:
    y = onednn.forward_stacked(x, w, index, strides, padding)
  return _post_ops(post, y, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x, w, operands, index, post, strides, padding, forward):
  """The convolution and its `post` ('affine_relu': `operands` the scale
  and the shift; 'add_into': the bias and `into`) in one oneDNN call, run
  as `forward` ('onednn' or 'rows')."""
  if forward == 'rows':  # Only `conv_affine_relu` sends 'rows'.
    return _rows(x, w, strides, padding, index=index, affine=operands)
  if post == 'affine_relu':
    return onednn.forward_affine_relu(x, w, *operands, strides, padding,
                                      index)
  return onednn.forward_add_into(x, w, *operands, strides, padding, index)


def _fused_fwd(x, w, operands, index, post, strides, padding, forward):
  del forward
  y, to_inputs = jax.vjp(
      lambda x, w, operands: _unfused(x, w, operands, index, post, strides,
                                      padding), x, w, operands)
  return y, (to_inputs, index)


def _fused_bwd(post, strides, padding, forward, residuals, g):
  del post, strides, padding, forward
  to_inputs, index = residuals
  index_grad = (None if index is None
                else np.zeros(np.shape(index), jax.dtypes.float0))
  return (*to_inputs(g), index_grad)


_fused.defvjp(_fused_fwd, _fused_bwd)


# `rows_matmul` hands matrices that are not stacked to oneDNN only for
# fewer rows than this (see there).
_ROWS_MATMUL_ONEDNN_MAX = 4096


def rows_matmul(x_SxK: jax.Array, w_KxO: jax.Array,
                precision=None) -> jax.Array:
  """`x @ w` for the gathered rows of a sparse unit (`layers.patch_conv`).

  A 1x1 convolution over one image row of S positions, so that it runs in
  `conv_general_dilated`'s formulation: oneDNN's forward where it reads the
  weights in place (CPUs with AVX-512), XLA's dot where it would copy them
  or where oneDNN is not built. `w` may be a stack `[U, K, O]` that `pick`
  left whole (inside a loop over units): unit `stacked_unit`'s matrix is
  used, read in place by oneDNN, where XLA's dot would need a copy of it.
  A plain `w` with 4096 rows or more goes to XLA's dot. oneDNN runs the
  smaller ones as two one-thread halves, one on XLA's thread pool
  (`onednn.forward_splits`), where they have the FLOPs for two threads.

  On a 2-core AVX-512 EPYC, 16-196 rows by a ResNet-101 block-3 matrix
  (1024 -> 256, 2304 -> 256, 256 -> 1024) took 0.31-0.70 of XLA's dot's
  time alone; ImageNet ResNet-101 at batch 32 (the host loop, plain
  matrices, chunks of 128-1024 rows) took 1.02-1.05x its time with oneDNN
  for every row matmul, 1.015x under 256 rows, 1.00x under 128; at batch 1
  (a device loop per block, stacks) 0.88-0.94x with oneDNN for every row
  matmul, 1.01x with XLA's dot from 128 rows on (BUILD.md, "Sparse
  inference"). Those figures came before the halves; with them, on a
  2-core Intel Xeon, oneDNN up to 4096 rows instead of 256 made
  `sparse.apply` at batch 32 take 0.973-0.978 of its time (BUILD.md, "On
  an Intel Xeon VM").
  """
  rows, depth = x_SxK.shape
  if rows >= _ROWS_MATMUL_ONEDNN_MAX and w_KxO.ndim == 2:
    return lax.dot(x_SxK, w_KxO, precision=precision)
  y = conv_general_dilated(
      x_SxK.reshape(1, 1, rows, depth),
      w_KxO.reshape(*w_KxO.shape[:-2], 1, 1, *w_KxO.shape[-2:]),
      (1, 1), ((0, 0), (0, 0)), dimension_numbers=_NHWC,
      precision=precision)
  return y.reshape(rows, w_KxO.shape[-1])


# ---------------------------------------------------------------------------
# Compiler options
# ---------------------------------------------------------------------------

# jaxlib 0.10 hands XLA:CPU's convolutions to YNNPACK by default. Its kernel
# gradient is 2-3.5x slower than XLA's older (Eigen) convolution at every
# shape the models train (measured with benchmarks/conv_formulations.py:
# e.g. 56x56x64 at batch 32, 60 ms vs 210 ms), and a CIFAR ResNet-32
# training step runs 1.3x faster without it. Inference gains too where the
# maps are large (one process, dense models: CIFAR ResNet-110 batch 128
# 0.74-0.82x the time, batch 32 0.80x, ImageNet ResNet-101 batch 32
# 0.91-0.93x, batch 1 0.92-0.95x) and loses at most 5% at CIFAR batch 1
# (1.00-1.05x). Keeping only YNNPACK's reductions (BatchNorm statistics)
# is what this option says.
_CPU_OPTIONS = (
    ('xla_cpu_experimental_ynn_fusion_type', 'LIBRARY_FUSION_TYPE_REDUCE'),)


@functools.cache
def options_supported(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this jaxlib's XLA:CPU knows `options` (older ones may not)."""
  try:
    x = jax.device_put(jnp.zeros((), jnp.float32),
                       jax.local_devices(backend='cpu')[0])
    jax.jit(lambda x: x + 1,
            compiler_options=dict(options)).lower(x).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """XLA options for sact_jax's jitted programs on `backend` (default one).

  For `jax.jit(..., compiler_options=...)` of training steps and inference:
  on the CPU, XLA's own convolutions instead of YNNPACK's (see above); None
  elsewhere, or where this jaxlib does not know the option.
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu' or not options_supported(_CPU_OPTIONS):
    return None
  return dict(_CPU_OPTIONS)


def jit(fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)` with `compiler_options()`.

  The options are looked up at the first call, so that a module jitting at
  import time does not start a backend.
  """
  jitted = None

  @functools.wraps(fn)
  def call(*args, **kwargs):
    nonlocal jitted
    if jitted is None:
      jitted = jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)
    return jitted(*args, **kwargs)
  return call
