"""The reference CIFAR ResNet (cifar_model.py): pre-activation basic units.

3x3 stem conv with bias; blocks of widths base x (1, 2, 4, ...), the first
unit of every block after the first strided; zero-padded shortcuts; head
= global mean, then BN + leaky ReLU, then the logits layer.
"""

import functools
from typing import Sequence

from flax import nnx
import jax.numpy as jnp

from sact_jax import act as act_lib
from sact_jax import blocks as blocks_lib
from sact_jax import flops as flops_lib
from sact_jax import halting
from sact_jax import layers
from sact_jax import units as units_lib
from sact_jax.models import base

# Depth -> units per block (depth = 6 n + 2).
CIFAR_PRESETS = {
    20: (3, 3, 3),
    32: (5, 5, 5),
    56: (9, 9, 9),
    110: (18, 18, 18),
}


class CifarResNet(base.AdaptiveResNet):
  """CIFAR ResNet in 'vanilla', 'act' or 'sact' form.

  `unit_cls` and `head_cls` build variants with other units or halting heads
  (subclasses of `CifarUnit` and of `SactHead` / `ActHead`, same
  constructor); None for the head picks the model type's reference head.
  """

  def __init__(self, units: Sequence[int], model_type: str, *,
               num_classes: int = 10, base_channels: int = 16,
               eps: float = act_lib.DEFAULT_EPS,
               remat: bool | str | None = None,
               unroll: bool = False,
               fast_conv_backward: bool | None = None,
               unit_cls: type[units_lib.CifarUnit] = units_lib.CifarUnit,
               head_cls: type[nnx.Module] | None = None,
               rngs: nnx.Rngs):
    self.model_type = model_type
    self.units = tuple(units)
    factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3,
                                  fast_conv_backward=fast_conv_backward)
    self.stem_conv = factory.conv(3, base_channels, 3, use_bias=True,
                                  rngs=rngs)
    if head_cls is None:
      head_cls = (halting.SactHead if model_type == 'sact'
                  else halting.ActHead)
    blocks = []
    cin = base_channels
    for i, n in enumerate(self.units):
      width = base_channels * 2**i
      make_first = functools.partial(
          unit_cls, cin, width, stride=1 if i == 0 else 2,
          activate_before_residual=i == 0, factory=factory)
      make_unit = functools.partial(unit_cls, width, width,
                                    factory=factory)
      make_head = functools.partial(head_cls, width, factory=factory,
                                    activation=layers.leaky_relu)
      blocks.append(blocks_lib.Block(
          make_first, make_unit, make_head, n, model_type, eps=eps,
          remat=remat, unroll=unroll, rngs=rngs))
      cin = width
    self.blocks = nnx.List(blocks)
    self.head_bn = factory.batch_norm(cin, rngs=rngs)
    self.logits = factory.dense(cin, num_classes, rngs=rngs)

  def stem(self, images, counter: flops_lib.FlopCounter):
    x = self.stem_conv(images)
    counter.add_dense_conv(self.stem_conv, x)
    return x

  def head(self, x, counter: flops_lib.FlopCounter):
    pooled = layers.leaky_relu(self.head_bn(jnp.mean(x, axis=(1, 2))))
    counter.add(flops_lib.conv_cost(self.logits))
    return self.logits(pooled)
