"""Convolutions whose backward pass XLA:CPU runs on its fast path.

Inside a while loop (every `lax.scan`), XLA:CPU leaves the *backward*
convolutions of `lax.conv_general_dilated` in non-canonical layouts that run
10-20x slower than the forward ones (see BUILD.md). `conv_general_dilated`
here is a drop-in replacement (it is what `nnx.Conv(conv_general_dilated=...)`
expects) that gives stride-1, undilated, ungrouped NHWC/HWIO convolutions a
`jax.custom_vjp` whose backward pass is two ordinary NHWC/HWIO forward
convolutions:

* input gradient: the output gradient convolved with the spatially flipped
  kernel whose in/out channels are swapped;
* kernel gradient: a convolution in which batch and channel axes trade places
  (input channels act as the batch, the batch as the contracted feature axis).

Gradients are mathematically identical; every other convolution falls through
to `lax.conv_general_dilated`.
"""

import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')
Padding = tuple[tuple[int, int], tuple[int, int]]


def _explicit_padding(padding, kernel_hw: Sequence[int]) -> Padding | None:
  """Returns ((lo, hi), (lo, hi)) for stride 1, or None if unsupported."""
  if isinstance(padding, str):
    if padding.upper() == 'VALID':
      return ((0, 0), (0, 0))
    if padding.upper() == 'SAME':
      pads = []
      for k in kernel_hw:
        total = k - 1
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    return None
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    return None
  return pads


def _forward(x, w, padding, precision):
  return lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_stride1(x_BxHxWxI, w_KxKxIxO, padding: Padding, precision=None):
  """Stride-1 NHWC/HWIO convolution with a canonical-layout backward pass."""
  return _forward(x_BxHxWxI, w_KxKxIxO, padding, precision)


def _conv_fwd(x, w, padding, precision):
  return _forward(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, g_BxPxQxO):
  x_BxHxWxI, w_KxLxIxO = residuals
  kh, kw = w_KxLxIxO.shape[:2]
  (top, bottom), (left, right) = padding
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
  # Kernel gradient: dw[i, j, c, o] = sum_{b,y,x} xpad[b, y+i, x+j, c] g[b,y,x,o]
  # is a convolution with C as the batch, B as the contracted feature axis
  # and g as a P x Q kernel.
  x_IxHxWxB = x_BxHxWxI.transpose(3, 1, 2, 0)
  g_PxQxBxO = g_BxPxQxO.transpose(1, 2, 0, 3)
  dw_pad = ((top, kh - 1 + p - h - top), (left, kw - 1 + q - w - left))
  dw_IxKxLxO = lax.conv_general_dilated(
      x_IxHxWxB, g_PxQxBxO, (1, 1), dw_pad,
      dimension_numbers=_NHWC, precision=precision)
  dw = dw_IxKxLxO.transpose(1, 2, 0, 3).astype(w_KxLxIxO.dtype)
  return dx.astype(x_BxHxWxI.dtype), dw


conv2d_stride1.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == (
        (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs: Any):
  """`lax.conv_general_dilated` with a fast CPU backward for stride-1 convs.

  Signature-compatible with `lax.conv_general_dilated`, so it can be given to
  `nnx.Conv(conv_general_dilated=...)`.
  """
  simple = (
      lhs.ndim == 4
      and tuple(window_strides) == (1, 1)
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
      and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
      and feature_group_count == 1
      and _is_nhwc(dimension_numbers)
      and kwargs.get('preferred_element_type') is None
      and kwargs.get('out_sharding') is None
  )
  pads = _explicit_padding(padding, rhs.shape[:2]) if simple else None
  if pads is not None:
    return conv2d_stride1(lhs, rhs, pads, precision)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
