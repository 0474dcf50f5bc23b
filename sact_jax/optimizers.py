"""The optimizer, its learning-rate schedules and the weights' moving average.

SGD with heavy-ball momentum as TF's MomentumOptimizer (`v = m v + g`), a
learning rate that is one of the reference's step schedules (piecewise
constant for CIFAR, staircase exponential decay for ImageNet) or a linear
warm-up and cosine decay, and an exponential moving average of the model
variables as TF's `ExponentialMovingAverage`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> Callable[[jax.Array], jax.Array]:
  """The rate of the update made at `step` (0-based).

  'piecewise', as TF `piecewise_constant(step, boundaries, ...)`:
  `learning_rate * scales[i]` where i is the number of boundaries strictly
  below `step` (scale 1 before the first). 'staircase', as TF
  `exponential_decay(..., staircase=True)`: `learning_rate *
  lr_decay_factor ** (step // lr_decay_steps)`, so the rate drops at the
  step that is a multiple of `lr_decay_steps`, one step before 'piecewise'
  with that boundary would. 'cosine': optax's linear warm-up from 0 to
  `learning_rate` over `warmup_steps`, then cosine decay to 0 at
  `num_train_steps`.
  """
  kind = config.get('lr_schedule', 'piecewise')
  if kind == 'staircase':
    return optax.exponential_decay(
        init_value=config.learning_rate,
        transition_steps=config.lr_decay_steps,
        decay_rate=config.lr_decay_factor, staircase=True)
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=0.0)
  boundaries = np.asarray(config.lr_boundaries, np.int64)
  values = config.learning_rate * np.asarray(
      (1.0, *config.lr_scales), np.float32)

  def schedule(step):
    index = jnp.sum(jnp.asarray(step)[..., None] > boundaries, axis=-1)
    return jnp.asarray(values)[index]
  return schedule


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """SGD with (heavy-ball) momentum, as TF's MomentumOptimizer."""
  return optax.sgd(learning_rate_schedule(config), momentum=config.momentum)


def ema_update(ema: Any, new: Any, decay: float, num_updates: jax.Array
               ) -> Any:
  """One step of an exponential moving average, as TF's.

  `tf.train.ExponentialMovingAverage(decay, num_updates)` (what the original
  evaluates its ImageNet models with) uses `min(decay, (1 + n) / (10 + n))`,
  so that early averages are not dominated by the initialisation. Written as
  `ema - (1 - d) * (ema - new)`: a variable that does not change keeps its
  average exactly.
  """
  n = jnp.asarray(num_updates, jnp.float32)
  d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, x: e - (1.0 - d).astype(e.dtype) * (e - x),
                      ema, new)
