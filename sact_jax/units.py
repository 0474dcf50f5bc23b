"""Residual units of the reference CIFAR and ImageNet ResNets.

Every unit is pre-activation and offers two entry points:

* `__call__(x)`: the whole unit, shortcut included. Used for the first unit
  of a block, which may change stride and width and always runs densely.
* `residual(x)`: the residual branch `f(x)` of a unit whose shortcut is the
  identity, so a block can apply the masked update `x + mask * f(x)`.

`residual_and_bias` and `split_output` give the same with the last convs'
biases apart, for the sparse path's passes over the map that add them on
the way (`sparse.rows.update_dense`).

The branch is written once, as `ResidualUnit` splits it where SACT's two
position sets meet: everything up to the input of the 3x3 conv that reads
neighbours runs on the dilated active set, the rest on the active set.
`dilated_rows` / `active_rows` compute the two parts at chosen rows (for
`sact_jax.sparse`) with the same methods the dense branch uses, so a
subclass that changes a nonlinearity changes both. `dilated_cost` /
`active_cost` are the FLOPs per position of the two parts.
"""

from typing import NamedTuple

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

from sact_jax import conv as conv_lib
from sact_jax import flops as flops_lib
from sact_jax import layers


def _pad_channels(x: jax.Array, cout: int) -> jax.Array:
  """Zero channels before and after, as the reference's shortcut does."""
  extra = cout - x.shape[-1]
  before = extra // 2
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
  """TF `avg_pool(2, 2, SAME)`: padded cells are not counted.

  For even sizes this is the reference's VALID pooling; for odd sizes it
  keeps the shortcut the shape of the stride-2 SAME conv.
  """
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = lax.reduce_window(x, 0.0, lax.add, window, strides, 'SAME')
  count = lax.reduce_window(jnp.ones_like(x[:1, ..., :1]), 0.0, lax.add,
                            window, strides, 'SAME')
  return total / count


class ResidualUnit(nnx.Module):
  """A pre-activation unit whose branch splits at its neighbour-reading conv.

  `f(x) = post_conv2(conv2(post_conv1(conv1(preactivation(x)))))`, where
  `conv2` is a 3x3 conv: `post_conv1(conv1(...))` is needed at every
  neighbour of an active position (the dilated set), `post_conv2(conv2(...))`
  at the active positions only. Subclasses build `conv1`, `conv2` and `cin`
  and define the three elementwise-or-rowwise steps; they must accept maps
  `[B, H, W, C]` and rows `[S, C]` alike (BatchNorm in eval mode is a
  per-channel affine map, so it does).
  """
  cin: int
  conv1: nnx.Conv
  conv2: nnx.Conv

  def preactivation(self, x_XxC: jax.Array) -> jax.Array:
    """conv1's input, elementwise."""
    raise NotImplementedError

  def post_conv1(self, y_XxD: jax.Array) -> jax.Array:
    """conv1's output to conv2's input, per position."""
    raise NotImplementedError

  def post_conv2(self, z_XxD: jax.Array) -> jax.Array:
    """conv2's output to the residual, per position."""
    raise NotImplementedError

  @property
  def identity_shortcut(self) -> bool:
    """Whether `self(x) == x + self.residual(x)` (units 2..L of a block)."""
    raise NotImplementedError

  # Whether `row_matrices` describes the unit (the sparse path then runs
  # its stages as one custom call each where it can, `sparse.stages`).
  row_stages = False

  def row_matrices(self) -> 'RowMatrices':
    """The unit as `RowMatrices` (units with `row_stages`)."""
    raise NotImplementedError

  def _branch(self, preact_BxHxWxC: jax.Array) -> jax.Array:
    y = self.post_conv1(self.conv1(preact_BxHxWxC))
    return self.post_conv2(self.conv2(y))

  def residual(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return self._branch(self.preactivation(x_BxHxWxC))

  def plus_residual(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """`x + residual(x)`: the unit where nothing masks its update."""
    return x_BxHxWxC + self.residual(x_BxHxWxC)

  def residual_and_bias(self, x_BxHxWxC: jax.Array
                        ) -> tuple[jax.Array, jax.Array | None]:
    """`residual(x)` less the bias its last conv adds, and that bias `[C]`
    (None: the residual whole), for a caller that adds the bias where it
    reads the residual anyway (`sparse.rows.update_dense`)."""
    return self.residual(x_BxHxWxC), None

  def split_output(self, x_BxHxWxC: jax.Array
                   ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """`self(x)` as `(shortcut, residual, bias)`: `self(x) = shortcut +
    residual + bias` up to rounding, `bias` `[C]` the biases of the
    shortcut's and the branch's last convs (None: none), for a caller that
    adds the three in a pass of its own (`sparse.rows.update_dense`).
    `residual` None: `shortcut` is the whole output (no split)."""
    return self(x_BxHxWxC), None, None

  def dilated_rows(self, x_SxKxC: jax.Array, valid_SxK: jax.Array
                   ) -> jax.Array:
    """conv2's input at rows, from patches of the unit input: `[S, D]`.

    Args:
      x_SxKxC: per row, the unit input at the `K` positions of conv1's
        window (`dilated_kernel_size` squared), row-major.
      valid_SxK: where the window lies inside the image; elsewhere conv1
        reads zero after the pre-activation (SAME padding).
    """
    preact = jnp.where(valid_SxK[..., None], self.preactivation(x_SxKxC),
                       0.0)
    return self.dilated_rows_preactivated(preact)

  def dilated_rows_preactivated(self, preact_SxKxC: jax.Array) -> jax.Array:
    """`dilated_rows` from patches of the pre-activated unit input (zero
    outside the image)."""
    return self.post_conv1(layers.patch_conv(self.conv1, preact_SxKxC))

  def active_rows(self, y_Sx9xD: jax.Array) -> jax.Array:
    """The residual at rows from 3x3 patches of `dilated_rows`: `[S, C]`.

    Args:
      y_Sx9xD: per row, conv2's input at its 9 neighbours, row-major, zero
        outside the image.
    """
    return self.post_conv2(layers.patch_conv(self.conv2, y_Sx9xD))

  @property
  def dilated_kernel_size(self) -> int:
    """Side of conv1's window: the neighbourhood `dilated_rows` reads."""
    return self.conv1.kernel_size[0]

  @property
  def dilated_channels(self) -> int:
    """Channels of conv2's input (what `dilated_rows` returns)."""
    return self.conv1.out_features

  @property
  def dilated_cost(self) -> int:
    return flops_lib.conv_cost(self.conv1)


class RowMatrices(NamedTuple):
  """A bottleneck unit as matrices and per-channel affine maps, for the
  sparse path's row stages in one custom call each (`sparse.stages`):

  * conv1's input `a = relu(x * s0 + t0)`,
  * conv2's input `b = relu(a @ w1 * s1 + t1)` (at every position),
  * conv3's input `c = relu(p @ w2 * s2 + t2)`, `p` the 3x3 windows of `b`,
  * the residual `c @ w3 + b3`.

  BatchNorm in evaluation as `layers.batch_norm_affine`, each conv's bias
  folded into the shift after it. A matrix keeps a leading stack axis where
  its kernel is a stack `conv.pick` left whole.
  """
  s0: jax.Array
  t0: jax.Array
  w1: jax.Array
  s1: jax.Array
  t1: jax.Array
  w2: jax.Array
  s2: jax.Array
  t2: jax.Array
  w3: jax.Array
  b3: jax.Array


def _matrix(conv: nnx.Conv) -> jax.Array:
  """`conv`'s kernel `[..., kh, kw, I, O]` as a matrix `[..., kh kw I, O]`
  (rows in HWIO order: a row-major window's taps)."""
  kernel = conv.kernel[...]
  return kernel.reshape(*kernel.shape[:-4], -1, kernel.shape[-1])


def _pointwise(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """A 1x1 conv on a map `[B, H, W, C]` or on rows `[S, C]`."""
  if x.ndim == 2:
    return layers.patch_conv(conv, x[:, None, :])
  return conv(x)


class CifarUnit(ResidualUnit):
  """Pre-activation basic unit with leaky ReLU 0.1 (cifar_model.py).

  `conv1` is followed by BN and the leaky ReLU *twice* (the slim BN inherits
  the activation and the conv applies it again), as in the reference.
  Subclasses may change the nonlinearity through `activation`.
  """

  def __init__(self, cin: int, cout: int, *, stride: int = 1,
               activate_before_residual: bool = False,
               factory: layers.LayerFactory, rngs: nnx.Rngs):
    self.cin, self.cout, self.stride = cin, cout, stride
    self.activate_before_residual = activate_before_residual
    self.preact = factory.batch_norm(cin, rngs=rngs)
    self.conv1 = factory.conv(cin, cout, 3, stride=stride, rngs=rngs)
    self.conv1_bn = factory.batch_norm(cout, rngs=rngs)
    self.conv2 = factory.conv(cout, cout, 3, use_bias=True, rngs=rngs)

  def activation(self, x: jax.Array) -> jax.Array:
    return layers.leaky_relu(x)

  def preactivation(self, x_XxC: jax.Array) -> jax.Array:
    return self.activation(self.preact(x_XxC))

  def post_conv1(self, y_XxD: jax.Array) -> jax.Array:
    return self.activation(self.activation(self.conv1_bn(y_XxD)))

  def post_conv2(self, z_XxD: jax.Array) -> jax.Array:
    return z_XxD

  @property
  def identity_shortcut(self) -> bool:
    return (self.stride == 1 and self.cin == self.cout
            and not self.activate_before_residual)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    preact = self.preactivation(x_BxHxWxC)
    shortcut = preact if self.activate_before_residual else x_BxHxWxC
    if self.stride != 1:
      shortcut = _avg_pool_2x2(shortcut)
    if self.cout != self.cin:
      shortcut = _pad_channels(shortcut, self.cout)
    return shortcut + self._branch(preact)

  @property
  def active_cost(self) -> int:
    return flops_lib.conv_cost(self.conv2)

  def dense_flops(self, in_hw: int, out_hw: int) -> int:
    """FLOPs of the whole unit; both convs output `out_hw` positions."""
    del in_hw
    return (self.dilated_cost + self.active_cost) * out_hw


# The methods whose arithmetic `BottleneckUnit.row_matrices` restates.
_BOTTLENECK_STEPS = ('activation', 'preactivation', 'post_conv1',
                     'post_conv2', '_conv3_input', 'row_matrices')


class BottleneckUnit(ResidualUnit):
  """Pre-activation ResNet-v2 bottleneck (imagenet_model.py).

  The stride sits in the 3x3 `conv2` of the *first* unit of a block, which
  uses the reference's symmetric `conv2d_same` padding when strided.
  """

  def __init__(self, cin: int, depth: int, bottleneck: int, *,
               stride: int = 1, factory: layers.LayerFactory,
               rngs: nnx.Rngs):
    self.cin, self.depth, self.stride = cin, depth, stride
    self.preact = factory.batch_norm(cin, rngs=rngs)
    if depth != cin:
      self.shortcut = factory.conv(cin, depth, 1, stride=stride,
                                   use_bias=True, rngs=rngs)
    else:
      self.shortcut = None
    self.conv1 = factory.conv(cin, bottleneck, 1, rngs=rngs)
    self.conv1_bn = factory.batch_norm(bottleneck, rngs=rngs)
    padding = 'SAME' if stride == 1 else layers.same_padding(3)
    self.conv2 = factory.conv(bottleneck, bottleneck, 3, stride=stride,
                              padding=padding, rngs=rngs)
    self.conv2_bn = factory.batch_norm(bottleneck, rngs=rngs)
    self.conv3 = factory.conv(bottleneck, depth, 1, use_bias=True, rngs=rngs)

  def activation(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)

  def preactivation(self, x_XxC: jax.Array) -> jax.Array:
    return self.activation(self.preact(x_XxC))

  @property
  def row_stages(self) -> bool:
    """`row_matrices` and row_stages.cc hold this class's math (ReLUs, BN
    affines), not that of a subclass that changes a step."""
    cls = type(self)
    return all(getattr(cls, name) is getattr(BottleneckUnit, name)
               for name in _BOTTLENECK_STEPS)

  def row_matrices(self) -> 'RowMatrices':
    s0, t0 = layers.batch_norm_affine(self.preact)
    s1, t1 = layers.conv_bn_affine(self.conv1, self.conv1_bn)
    s2, t2 = layers.conv_bn_affine(self.conv2, self.conv2_bn)
    bias = self.conv3.bias
    return RowMatrices(
        s0=s0, t0=t0, w1=_matrix(self.conv1), s1=s1, t1=t1,
        w2=_matrix(self.conv2), s2=s2, t2=t2, w3=_matrix(self.conv3),
        b3=(jnp.zeros((self.depth,)) if bias is None else bias[...]))

  def post_conv1(self, y_XxD: jax.Array) -> jax.Array:
    return self.activation(self.conv1_bn(y_XxD))

  def post_conv2(self, z_XxD: jax.Array) -> jax.Array:
    return _pointwise(self.conv3, self._conv3_input(z_XxD))

  def _conv3_input(self, z_XxD: jax.Array) -> jax.Array:
    return self.activation(self.conv2_bn(z_XxD))

  def _fuses(self) -> bool:
    """Whether the unit runs its convolutions with what follows them as
    one oneDNN call each where oneDNN runs them: in evaluation, on the
    CPU's routed convolutions, with this class's steps after them (a
    subclass that changes one keeps them apart)."""
    cls = type(self)
    return (self.conv1_bn.use_running_average
            and self.conv1.conv_general_dilated
            is conv_lib.conv_general_dilated
            and cls.activation is BottleneckUnit.activation
            and cls.post_conv1 is BottleneckUnit.post_conv1
            and cls._conv3_input is BottleneckUnit._conv3_input)

  def _add_branch(self, preact_BxHxWxC: jax.Array,
                  into_BxPxQxD: jax.Array) -> jax.Array:
    """`into + _branch(preact)` (conv3 adds into `into` where `_fuses`:
    `layers.conv_add_into`)."""
    if self._fuses():
      return layers.conv_add_into(
          self.conv3, self._conv3_input_from(preact_BxHxWxC), into_BxPxQxD)
    return into_BxPxQxD + self._branch(preact_BxHxWxC)

  def plus_residual(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return self._add_branch(self.preactivation(x_BxHxWxC), x_BxHxWxC)

  def _conv3_input_from(self, preact_BxHxWxC: jax.Array) -> jax.Array:
    """conv3's input from the pre-activated unit input: conv1 and
    `post_conv1`, conv2 and `_conv3_input` (each as `layers.conv_bn_relu`
    where `_fuses`)."""
    if self._fuses():
      y = layers.conv_bn_relu(self.conv1, self.conv1_bn, preact_BxHxWxC)
      return layers.conv_bn_relu(self.conv2, self.conv2_bn, y)
    y = self.post_conv1(self.conv1(preact_BxHxWxC))
    return self._conv3_input(self.conv2(y))

  def _branch(self, preact_BxHxWxC: jax.Array) -> jax.Array:
    return _pointwise(self.conv3, self._conv3_input_from(preact_BxHxWxC))

  def residual_and_bias(self, x_BxHxWxC: jax.Array
                        ) -> tuple[jax.Array, jax.Array | None]:
    return self._branch_and_bias(self.preactivation(x_BxHxWxC))

  def _branch_and_bias(self, preact_BxHxWxC: jax.Array
                       ) -> tuple[jax.Array, jax.Array | None]:
    """`_branch` with conv3's bias apart."""
    return layers.conv_without_bias(self.conv3,
                                    self._conv3_input_from(preact_BxHxWxC))

  def split_output(self, x_BxHxWxC: jax.Array):
    preact = self.preactivation(x_BxHxWxC)
    if self.shortcut is not None:
      shortcut, shortcut_bias = layers.conv_without_bias(self.shortcut,
                                                         preact)
    else:
      shortcut = x_BxHxWxC[:, ::self.stride, ::self.stride, :]
      shortcut_bias = None
    residual, bias = self._branch_and_bias(preact)
    if shortcut_bias is not None:
      bias = shortcut_bias if bias is None else bias + shortcut_bias
    return shortcut, residual, bias

  @property
  def identity_shortcut(self) -> bool:
    return self.stride == 1 and self.shortcut is None

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    preact = self.preactivation(x_BxHxWxC)
    if self.shortcut is not None:
      shortcut = self.shortcut(preact)
    else:
      shortcut = x_BxHxWxC[:, ::self.stride, ::self.stride, :]
    return self._add_branch(preact, shortcut)

  @property
  def active_cost(self) -> int:
    return flops_lib.conv_cost(self.conv2) + flops_lib.conv_cost(self.conv3)

  def dense_flops(self, in_hw: int, out_hw: int) -> int:
    """FLOPs of the whole unit; conv1 runs at the input resolution."""
    flops = self.dilated_cost * in_hw + self.active_cost * out_hw
    if self.shortcut is not None:
      flops += flops_lib.conv_cost(self.shortcut) * out_hw
    return flops
