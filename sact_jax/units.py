"""Residual units of the reference CIFAR and ImageNet ResNets (SPEC section 3).

Every unit is pre-activation and offers two entry points:

* `__call__(x)`: the whole unit, shortcut included. Used for the first unit
  of a block, which may change stride and width and always runs densely.
* `residual(x)`: the residual branch `f(x)` of a unit whose shortcut is the
  identity, so a block can apply the masked update `x + mask * f(x)`.

`dilated_cost` / `active_cost` are the FLOPs per position of the convs that
must run on the dilated active set (they feed a 3x3 conv) and on the active
set itself.
"""

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

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


class CifarUnit(nnx.Module):
  """Pre-activation basic unit with leaky ReLU 0.1 (cifar_model.py).

  `conv1` is followed by BN and the leaky ReLU *twice* (the slim BN inherits
  the activation and the conv applies it again), as in the reference.
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

  def _branch(self, preact: jax.Array) -> jax.Array:
    y = self.conv1(preact)
    y = layers.leaky_relu(layers.leaky_relu(self.conv1_bn(y)))
    return self.conv2(y)

  def residual(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return self._branch(layers.leaky_relu(self.preact(x_BxHxWxC)))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    preact = layers.leaky_relu(self.preact(x_BxHxWxC))
    shortcut = preact if self.activate_before_residual else x_BxHxWxC
    if self.stride != 1:
      shortcut = _avg_pool_2x2(shortcut)
    if self.cout != self.cin:
      shortcut = _pad_channels(shortcut, self.cout)
    return shortcut + self._branch(preact)

  @property
  def dilated_cost(self) -> int:
    return flops_lib.conv_cost(self.conv1)

  @property
  def active_cost(self) -> int:
    return flops_lib.conv_cost(self.conv2)

  def dense_flops(self, in_hw: int, out_hw: int) -> int:
    """FLOPs of the whole unit; both convs output `out_hw` positions."""
    del in_hw
    return (self.dilated_cost + self.active_cost) * out_hw


class BottleneckUnit(nnx.Module):
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

  def _branch(self, preact: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.conv1_bn(self.conv1(preact)))
    y = jax.nn.relu(self.conv2_bn(self.conv2(y)))
    return self.conv3(y)

  def residual(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return self._branch(jax.nn.relu(self.preact(x_BxHxWxC)))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    preact = jax.nn.relu(self.preact(x_BxHxWxC))
    if self.shortcut is not None:
      shortcut = self.shortcut(preact)
    else:
      shortcut = x_BxHxWxC[:, ::self.stride, ::self.stride, :]
    return shortcut + self._branch(preact)

  @property
  def dilated_cost(self) -> int:
    return flops_lib.conv_cost(self.conv1)

  @property
  def active_cost(self) -> int:
    return flops_lib.conv_cost(self.conv2) + flops_lib.conv_cost(self.conv3)

  def dense_flops(self, in_hw: int, out_hw: int) -> int:
    """FLOPs of the whole unit; conv1 runs at the input resolution."""
    flops = self.dilated_cost * in_hw + self.active_cost * out_hw
    if self.shortcut is not None:
      flops += flops_lib.conv_cost(self.shortcut) * out_hw
    return flops
