"""Residual units and halting heads evaluated at chosen rows only.

A unit's residual branch splits where SACT's two position sets meet (SPEC
section 2): the *dilated stage* is everything up to the input of the unit's
3x3 conv that reads neighbours (CIFAR: preact + 3x3 conv1 + BN + activation;
ImageNet: preact + 1x1 conv1 + BN + ReLU), evaluated on the dilated active
set; the *active stage* is the rest (CIFAR: conv2; ImageNet: conv2 + BN + ReLU
+ conv3), evaluated on the active set, reading the dilated stage's output at
the neighbours.

Everything is read from the model's own NNX modules and called as they are:
BatchNorm layers (eval mode: a per-channel affine map, so it applies to rows)
and activations run unchanged on `[rows, C]` arrays; only the convolutions
become matmuls on gathered rows (`rows.conv_rows`).
"""

from flax import nnx
import jax
import jax.numpy as jnp

from sact_jax import halting
from sact_jax import layers
from sact_jax import units as units_lib
from sact_jax.sparse import rows as rows_lib


def conv_at_rows(conv: nnx.Conv, src_NxC: jax.Array, idx_S: jax.Array, *,
                 height: int, width: int, pre=None) -> jax.Array:
  """`conv(pre(src))` at rows `idx_S`, bias included: `[S, out]`."""
  if tuple(conv.strides) != (1, 1):
    raise ValueError('Only stride-1 convolutions can run at sparse rows.')
  y = rows_lib.conv_rows(src_NxC, idx_S, conv.kernel[...], height=height,
                         width=width, pre=pre)
  if conv.bias is not None:
    y = y + conv.bias[...]
  return y


def check_unit(unit: nnx.Module):
  """Units 2..L must keep shape (identity shortcut) to run at rows."""
  if isinstance(unit, units_lib.CifarUnit):
    ok = unit.stride == 1 and unit.cin == unit.cout
  elif isinstance(unit, units_lib.BottleneckUnit):
    ok = unit.stride == 1 and unit.shortcut is None
  else:
    raise TypeError(f'No sparse evaluation for units of type '
                    f'{type(unit).__name__}.')
  if not ok:
    raise ValueError('A sparse unit must have stride 1 and an identity '
                     'shortcut.')


def dilated_channels(unit: nnx.Module) -> int:
  """Channels of the dilated stage's output (the 3x3 conv's input)."""
  return unit.conv1.out_features


def dilated_stage(unit: nnx.Module, x_NxC: jax.Array, idx_S: jax.Array, *,
                  height: int, width: int) -> jax.Array:
  """The unit up to its neighbour-reading 3x3 conv, at rows `idx_S`."""
  if isinstance(unit, units_lib.CifarUnit):
    y = conv_at_rows(unit.conv1, x_NxC, idx_S, height=height, width=width,
                     pre=lambda v: layers.leaky_relu(unit.preact(v)))
    return layers.leaky_relu(layers.leaky_relu(unit.conv1_bn(y)))
  y = conv_at_rows(unit.conv1, x_NxC, idx_S, height=height, width=width,
                   pre=lambda v: jax.nn.relu(unit.preact(v)))
  return jax.nn.relu(unit.conv1_bn(y))


def active_stage(unit: nnx.Module, y_N1xD: jax.Array, idx_S: jax.Array, *,
                 height: int, width: int) -> jax.Array:
  """The residual `f(x)` at rows `idx_S`, from the dilated stage's map.

  Args:
    unit: the unit.
    y_N1xD: dilated-stage output, `N + 1` rows with a zero last row; valid at
      every neighbour of `idx_S`.
    idx_S: active rows.
    height, width: the map's spatial shape.
  """
  if isinstance(unit, units_lib.CifarUnit):
    return conv_at_rows(unit.conv2, y_N1xD, idx_S, height=height,
                        width=width)
  z = conv_at_rows(unit.conv2, y_N1xD, idx_S, height=height, width=width)
  z = jax.nn.relu(unit.conv2_bn(z))
  return z @ unit.conv3.kernel[...].reshape(z.shape[-1], -1) + (
      unit.conv3.bias[...])


def head_global(head: halting.SactHead, sum_BxC: jax.Array,
                hw: int) -> jax.Array:
  """The head's global logit `[B]` from per-image sums of the whole map."""
  pooled_BxC = sum_BxC / hw
  return head.global_conv(head.activation(head.global_bn(pooled_BxC)))[:, 0]


def head_taps(head: halting.SactHead, x_SxC: jax.Array) -> jax.Array:
  """Per-tap products of the head's local conv at rows `x_SxC`: `[S, 9]`.

  The local conv has one output channel, so it factors into a `[C, 9]`
  matmul at each row (what every tap of the 3x3 kernel takes from that row)
  and a sum over the 9 neighbours of each output row (`head_local`). This
  beats an im2col of the `[S, 9, C]` neighbour rows for a single output
  channel (measured: 2.5x) and lets the products ride along with the rows
  the unit gathers anyway.
  """
  rows = head.activation(head.local_bn(x_SxC))
  return rows @ head.local_conv.kernel[...].reshape(9, -1).T


def head_local(head: halting.SactHead, taps_N1x9: jax.Array,
               idx_S: jax.Array, *, height: int, width: int) -> jax.Array:
  """The head's local logit `[S]` at rows `idx_S` from the tap products.

  Args:
    head: the halting head.
    taps_N1x9: `head_taps` scattered into a map of `N + 1` rows whose last
      row is zero; valid at every neighbour of `idx_S`.
    idx_S: output rows.
    height, width: the map's spatial shape.
  """
  nbr_Sx9, _ = rows_lib.neighbours(idx_S, height, width,
                                   taps_N1x9.shape[0] - 1)
  # Tap d of neighbour d: one scalar per tap from the flat tap map.
  flat_Sx9 = nbr_Sx9 * 9 + jnp.arange(9, dtype=nbr_Sx9.dtype)
  local_S = jnp.sum(rows_lib.gather(taps_N1x9.reshape(-1), flat_Sx9), axis=1)
  if head.local_conv.bias is not None:
    local_S = local_S + head.local_conv.bias[...][0]
  return local_S


def head_dense(head: halting.SactHead, x_BxHxWxC: jax.Array) -> jax.Array:
  """The halting scores `[B, H, W]` at every position (all running).

  Same as `head(x)`, with the local conv as tap products (a `[C, 9]` matmul
  per position and a neighbour sum), which XLA:CPU runs 1.3-2x faster than
  its 3x3 conv with one output channel (measured).
  """
  batch, height, width, channels = x_BxHxWxC.shape
  num_rows = batch * height * width
  x_NxC = x_BxHxWxC.reshape(num_rows, channels)
  taps = jnp.concatenate(
      [head_taps(head, x_NxC), jnp.zeros((1, 9), x_NxC.dtype)], axis=0)
  local_N = head_local(head, taps, jnp.arange(num_rows, dtype=jnp.int32),
                       height=height, width=width)
  global_B = head_global(head, jnp.sum(x_BxHxWxC, axis=(1, 2)),
                         height * width)
  logit = local_N.reshape(batch, height, width) + global_B[:, None, None]
  return jax.nn.sigmoid(logit)
