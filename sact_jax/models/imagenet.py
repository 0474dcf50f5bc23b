"""The reference ImageNet ResNet-v2 (imagenet_model.py): bottleneck units.

7x7/2 stem conv with bias and 64 channels whatever the base width, 3x3/2 max
pool; blocks of depth 4 x base x 2^i with bottleneck base x 2^i, the stride
in the *first* unit of blocks 2..4; head = BN + ReLU, global mean, logits.
"""

import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from sact_jax import act as act_lib
from sact_jax import blocks as blocks_lib
from sact_jax import flops as flops_lib
from sact_jax import halting
from sact_jax import layers
from sact_jax import units as units_lib
from sact_jax.models import base

IMAGENET_PRESETS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
STEM_CHANNELS = 64


class ImageNetResNet(base.AdaptiveResNet):
  """ImageNet ResNet-v2 in 'vanilla', 'act' or 'sact' form.

  `unit_cls` and `head_cls` build variants with other units or halting heads
  (subclasses of `BottleneckUnit` and of `SactHead` / `ActHead`, same
  constructor); None for the head picks the model type's reference head.
  """

  def __init__(self, units: Sequence[int], model_type: str, *,
               num_classes: int = 1001, base_channels: int = 64,
               eps: float = act_lib.DEFAULT_EPS,
               remat: bool | str | None = None,
               unroll: bool = False,
               fast_conv_backward: bool | None = None,
               unit_cls: type[units_lib.BottleneckUnit] = (
                   units_lib.BottleneckUnit),
               head_cls: type[nnx.Module] | None = None,
               rngs: nnx.Rngs):
    self.model_type = model_type
    self.units = tuple(units)
    factory = layers.LayerFactory(bn_momentum=0.997, bn_epsilon=1e-5,
                                  fast_conv_backward=fast_conv_backward)
    self.stem_conv = factory.conv(3, STEM_CHANNELS, 7, stride=2,
                                  padding=layers.same_padding(7),
                                  use_bias=True, rngs=rngs)
    if head_cls is None:
      head_cls = (halting.SactHead if model_type == 'sact'
                  else halting.ActHead)
    blocks = []
    cin = STEM_CHANNELS
    for i, n in enumerate(self.units):
      depth, bottleneck = 4 * base_channels * 2**i, base_channels * 2**i
      make_first = functools.partial(
          unit_cls, cin, depth, bottleneck,
          stride=1 if i == 0 else 2, factory=factory)
      make_unit = functools.partial(unit_cls, depth, depth, bottleneck,
                                    factory=factory)
      make_head = functools.partial(head_cls, depth, factory=factory,
                                    activation=layers.identity)
      blocks.append(blocks_lib.Block(
          make_first, make_unit, make_head, n, model_type, eps=eps,
          remat=remat, unroll=unroll, rngs=rngs))
      cin = depth
    self.blocks = nnx.List(blocks)
    self.postnorm = factory.batch_norm(cin, rngs=rngs)
    self.logits = factory.dense(cin, num_classes, rngs=rngs)

  def stem(self, images, counter: flops_lib.FlopCounter):
    x = self.stem_conv(images)
    counter.add_dense_conv(self.stem_conv, x)
    return layers.max_pool(x, 3, 2)

  def head(self, x, counter: flops_lib.FlopCounter):
    pooled = jnp.mean(jax.nn.relu(self.postnorm(x)), axis=(1, 2))
    counter.add(flops_lib.conv_cost(self.logits))
    return self.logits(pooled)
