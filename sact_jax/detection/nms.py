"""Greedy non-maximum suppression with static shapes (for `jit`).

`jax` has no NMS; this one returns a fixed number of indices and a validity
mask, so proposals and detections keep static shapes under `jit` and
`vmap` over a batch.
"""

import jax
from jax import lax
import jax.numpy as jnp

from sact_jax.detection import boxes as boxes_lib


def nms(boxes_Nx4: jax.Array, scores_N: jax.Array, max_outputs: int, *,
        iou_threshold: float = 0.7,
        score_threshold: float = -jnp.inf) -> tuple[jax.Array, jax.Array]:
  """Indices of the kept boxes, best first, and which of them are real.

  Repeatedly keeps the highest-scoring box left and drops every box whose
  IoU with it exceeds `iou_threshold`, as `tf.image.non_max_suppression`.

  Args:
    boxes_Nx4: candidate boxes.
    scores_N: their scores; boxes scoring at most `score_threshold` (or NaN)
      are never kept.
    max_outputs: K, the number of indices returned.
    iou_threshold: suppression threshold.
    score_threshold: minimum score (exclusive).

  Returns:
    `indices_K` (int32; 0 where not valid) and `valid_K` (bool): fewer than
    K boxes survive when the rest are suppressed or below the threshold.
  """
  num = boxes_Nx4.shape[0]
  if num == 0:  # An image without candidates: nothing to keep.
    return (jnp.zeros((max_outputs,), jnp.int32),
            jnp.zeros((max_outputs,), bool))
  iou_NxN = boxes_lib.iou(boxes_Nx4, boxes_Nx4)
  alive_N = (scores_N > score_threshold) & ~jnp.isnan(scores_N)
  masked = jnp.where(alive_N, scores_N, -jnp.inf)

  def body(k, carry):
    alive, indices, valid = carry
    best = jnp.argmax(jnp.where(alive, masked, -jnp.inf))
    ok = alive[best]
    indices = indices.at[k].set(jnp.where(ok, best, 0).astype(jnp.int32))
    valid = valid.at[k].set(ok)
    suppressed = (iou_NxN[best] > iou_threshold) | (jnp.arange(num) == best)
    alive = alive & ~(suppressed & ok)
    return alive, indices, valid

  init = (alive_N, jnp.zeros((max_outputs,), jnp.int32),
          jnp.zeros((max_outputs,), bool))
  _, indices, valid = lax.fori_loop(0, max_outputs, body, init)
  return indices, valid
