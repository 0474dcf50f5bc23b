"""Halting branches: the small heads that score when to stop (SPEC section 2).

* ACT (per image): `sigmoid(global_conv(act(global_bn(mean_HW(x)))))`.
* SACT (per position): `sigmoid(local_conv(act(local_bn(x))) +
  global_conv(act(global_bn(mean_HW(x)))))`, where `local_conv` is a 3x3 conv
  with bias and `global_conv` a 1x1 conv without bias broadcast over space.

`act` is the model's nonlinearity on CIFAR and the identity on ImageNet. The
halting bias starts at -3, so a fresh network uses every unit.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from sact_jax import flops as flops_lib
from sact_jax import layers

INIT_BIAS = -3.0


class ActHead(nnx.Module):
  """One halting score per image."""

  def __init__(self, channels: int, *, factory: layers.LayerFactory,
               activation: layers.Activation, rngs: nnx.Rngs):
    self.activation = activation
    self.global_bn = factory.batch_norm(channels, rngs=rngs)
    self.global_conv = factory.dense(channels, 1, bias_init=INIT_BIAS,
                                     rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the halting probability `[B]`."""
    pooled_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
    logit_Bx1 = self.global_conv(self.activation(self.global_bn(pooled_BxC)))
    return jax.nn.sigmoid(logit_Bx1[:, 0])

  def flops(self, running_B: jax.Array) -> jax.Array:
    """ACT counts the head of a unit iff the unit ran."""
    return running_B * flops_lib.conv_cost(self.global_conv)


class SactHead(nnx.Module):
  """One halting score per spatial position."""

  def __init__(self, channels: int, *, factory: layers.LayerFactory,
               activation: layers.Activation, rngs: nnx.Rngs):
    self.activation = activation
    self.local_bn = factory.batch_norm(channels, rngs=rngs)
    self.local_conv = factory.conv(channels, 1, 3, use_bias=True,
                                   bias_init=INIT_BIAS, rngs=rngs)
    self.global_bn = factory.batch_norm(channels, rngs=rngs)
    self.global_conv = factory.dense(channels, 1, use_bias=False, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the halting probability `[B, H, W]`."""
    local_BxHxWx1 = self.local_conv(self.activation(self.local_bn(x_BxHxWxC)))
    pooled_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
    global_Bx1 = self.global_conv(self.activation(self.global_bn(pooled_BxC)))
    logit_BxHxW = local_BxHxWx1[..., 0] + global_Bx1[:, :, None]
    return jax.nn.sigmoid(logit_BxHxW)

  def flops(self, running_BxHxW: jax.Array) -> jax.Array:
    """The local conv counts active positions; the global conv always."""
    return (flops_lib.spatial_count(running_BxHxW)
            * flops_lib.conv_cost(self.local_conv)
            + flops_lib.conv_cost(self.global_conv))
