"""The training loss's terms besides the ponder cost (the model reports that).

The loss is `cross_entropy + tau * ponder_loss + weight_decay_penalty`, with
the reference's conventions for label smoothing and weight decay.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax


def _is_kernel(path: tuple[Any, ...]) -> bool:
  return str(path[-1]) == 'kernel'


def weight_decay_penalty(params: nnx.State, weight_decay: float) -> jax.Array:
  """`weight_decay * sum(w^2) / 2` over conv and dense kernels.

  This is slim's `l2_regularizer(weight_decay)`, which the reference puts on
  every conv (logits and halting convs included); BatchNorm parameters and
  biases are not decayed.
  """
  total = jnp.zeros((), jnp.float32)
  for path, variable in nnx.to_flat_state(params):
    if _is_kernel(path):
      total += jnp.sum(jnp.square(variable[...]))
  return 0.5 * weight_decay * total


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy with TF-style label smoothing.

  Targets are `onehot * (1 - s) + s / K`, as `tf.losses.softmax_cross_entropy`
  with `label_smoothing=s`.
  """
  num_classes = logits_BxK.shape[-1]
  targets_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets_BxK = (targets_BxK * (1 - label_smoothing)
                   + label_smoothing / num_classes)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxK, targets_BxK))
