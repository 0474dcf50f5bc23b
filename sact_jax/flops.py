"""FLOP accounting in the reference convention (docs/method.md, section 4).

A convolution costs `2 * kh * kw * C_in * C_out` FLOPs per *computed* output
position; biases, BatchNorm, activations, pooling and the halting bookkeeping
are free. Under SACT a conv's computed positions are the active ones, or the
dilated active set where its output feeds a 3x3 conv.

Dense costs are known at trace time and kept as Python ints (exact); costs
that depend on halting are `[B]` float32 arrays. Per-image totals are float32,
which is exact for every realistic network: each term is a multiple of a
large power of two (e.g. all terms of ResNet-101 at 224x224 are multiples of
1024, and its total is below 2**34).
"""

import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


def conv_cost(conv: nnx.Conv | nnx.Linear) -> int:
  """FLOPs per output position of a conv (or of a dense layer, once)."""
  if isinstance(conv, nnx.Linear):
    return 2 * conv.in_features * conv.out_features
  return (2 * math.prod(conv.kernel_size) * conv.in_features
          * conv.out_features)


def spatial_count(mask: jax.Array) -> jax.Array:
  """Positions per image where `mask` is 1: `[B, H, W]` -> `[B]` float32.

  Of a map of counts (units run at each position), their sum; exact while
  it stays below 2**24.
  """
  return jnp.sum(mask.astype(jnp.float32), axis=tuple(range(1, mask.ndim)))


class FlopCounter:
  """Accumulates FLOPs of one forward pass: static ints plus `[B]` arrays."""

  def __init__(self):
    self.static = 0
    self.dynamic = None

  def add(self, flops: Any):
    if isinstance(flops, (int, np.integer)):
      self.static += int(flops)
    else:
      self.dynamic = flops if self.dynamic is None else self.dynamic + flops

  def add_dense_conv(self, conv: nnx.Conv, y_BxHxWxC: jax.Array):
    """Adds a conv computed at every position of its output `y`."""
    self.add(conv_cost(conv) * y_BxHxWxC.shape[1] * y_BxHxWxC.shape[2])

  def per_image(self, batch_size: int) -> jax.Array:
    """Total FLOPs per image, `[B]` float32."""
    total = jnp.full((batch_size,), float(self.static), jnp.float32)
    if self.dynamic is not None:
      total = total + self.dynamic.astype(jnp.float32)
    return total


def param_count(model: nnx.Module) -> int:
  """Number of trainable parameters (works on abstract models too)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(math.prod(x.shape) for x in leaves))


def vanilla_flops(model_fn, image_shape: tuple[int, int, int], *,
                  apply=None) -> int:
  """Dense FLOPs per image of the model `model_fn()` builds, without running it.

  The model is built abstractly (`nnx.eval_shape`) and traced abstractly
  (`jax.eval_shape`), so no weights are initialised and no conv runs; with
  every mask full, all FLOPs are static and land in the counter.

  Args:
    model_fn: a zero-argument function that builds a *vanilla* model.
    image_shape: `(H, W, 3)`.
    apply: `(model, images, counter) -> ...`, the part of the model to
      price (e.g. a detection extractor); None for the whole model.
  """
  abstract = nnx.eval_shape(model_fn)
  abstract.eval()
  graphdef, state = nnx.split(abstract)
  counter = FlopCounter()

  def forward(state, images):
    model = nnx.merge(graphdef, state)
    if apply is not None:
      return apply(model, images, counter)
    return model(images, counter=counter)

  jax.eval_shape(forward, state,
                 jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  if counter.dynamic is not None:
    raise ValueError('vanilla_flops needs a vanilla model; this one has '
                     'halting-dependent FLOPs.')
  return counter.static
