"""Training targets of Faster R-CNN: matching boxes to ground truth, sampling.

Both stages learn from a few hundred candidates per image (anchors for the
RPN, proposals for the box classifier), each matched to the ground-truth box
it overlaps most: positive above an IoU threshold, negative below another,
ignored in between. A fixed-size minibatch is then sampled with a bounded
fraction of positives, because nearly every candidate is background. Shapes
are static (masks and weights instead of variable-length index lists), so
all of it runs under `jit` and `vmap` over a batch.
"""

import jax
import jax.numpy as jnp

from sact_jax.detection import boxes as boxes_lib

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def match(candidates_Nx4: jax.Array, gt_boxes_Mx4: jax.Array,
          gt_valid_M: jax.Array, *, positive_iou: float,
          negative_iou: float, force_match: bool = False
          ) -> tuple[jax.Array, jax.Array]:
  """Each candidate's best ground-truth box and its label.

  Args:
    candidates_Nx4: anchors or proposals (pixels).
    gt_boxes_Mx4: ground truth (pixels); rows where `gt_valid_M` is False
      (padding, crowd, degenerate boxes) are never matched.
    gt_valid_M: bool.
    positive_iou: IoU at or above which a candidate is POSITIVE.
    negative_iou: IoU below which it is NEGATIVE (IGNORED in between).
    force_match: also make POSITIVE, for every ground-truth box, the
      candidate(s) overlapping it most (the RPN rule, so that no object is
      left without an anchor), when that overlap is above 0.

  Returns:
    `matched_N` (int32 index into the ground truth; 0 where nothing
    overlaps) and `labels_N` (int32, POSITIVE / NEGATIVE / IGNORED). An image
    without valid ground truth has every candidate NEGATIVE.
  """
  iou_NxM = jnp.where(gt_valid_M[None, :],
                      boxes_lib.iou(candidates_Nx4, gt_boxes_Mx4), -1.0)
  best_iou_N = jnp.max(iou_NxM, axis=1, initial=-1.0)
  matched_N = jnp.argmax(iou_NxM, axis=1) if gt_boxes_Mx4.shape[0] else (
      jnp.zeros(candidates_Nx4.shape[:1], jnp.int32))
  labels_N = jnp.where(best_iou_N >= positive_iou, POSITIVE,
                       jnp.where(best_iou_N < negative_iou, NEGATIVE,
                                 IGNORED))
  if force_match and gt_boxes_Mx4.shape[0]:
    best_per_gt_M = jnp.max(iou_NxM, axis=0)
    # Candidates tying with a box's best overlap; the candidate is matched
    # to that box even when another overlaps it more (as the TF Object
    # Detection API's matcher).
    is_best_NxM = ((iou_NxM >= best_per_gt_M[None, :])
                   & (best_per_gt_M[None, :] > 0) & gt_valid_M[None, :])
    forced_N = jnp.any(is_best_NxM, axis=1)
    matched_N = jnp.where(forced_N, jnp.argmax(is_best_NxM, axis=1),
                          matched_N)
    labels_N = jnp.where(forced_N, POSITIVE, labels_N)
  return matched_N.astype(jnp.int32), labels_N.astype(jnp.int32)


def _rank(priority_N: jax.Array, member_N: jax.Array) -> jax.Array:
  """Each member's 0-based rank by descending priority (members first)."""
  num = priority_N.shape[0]
  order = jnp.argsort(jnp.where(member_N, -priority_N, jnp.inf))
  rank = jnp.zeros((num,), jnp.int32).at[order].set(
      jnp.arange(num, dtype=jnp.int32))
  return rank


def sample(labels_N: jax.Array, key: jax.Array, *, batch_size: int,
           positive_fraction: float) -> jax.Array:
  """A random minibatch of labelled candidates: bool `[N]`, selected.

  At most `round(batch_size * positive_fraction)` positives, the rest of
  the `batch_size` negatives (fewer when there are not enough of either);
  IGNORED candidates are never selected.
  """
  priority_N = jax.random.uniform(key, labels_N.shape)
  positive_N = labels_N == POSITIVE
  negative_N = labels_N == NEGATIVE
  max_positives = int(round(batch_size * positive_fraction))
  take_positive_N = positive_N & (_rank(priority_N, positive_N)
                                  < max_positives)
  num_negatives = batch_size - jnp.sum(take_positive_N)
  take_negative_N = negative_N & (_rank(priority_N, negative_N)
                                  < num_negatives)
  return take_positive_N | take_negative_N
