"""Detection post-processing: per-class NMS, score threshold, top-k.

The TF Object Detection API's `batch_multiclass_non_max_suppression` with
static shapes: every class keeps up to `max_per_class` boxes by NMS among
its own scores, then the best `max_total` of all classes are the image's
detections, with a validity mask for the slots left empty.
"""

import jax
import jax.numpy as jnp

from sact_jax.detection import nms as nms_lib


def per_class_nms(boxes_RxKx4: jax.Array, scores_RxK: jax.Array,
                  valid_R: jax.Array, *, score_threshold: float,
                  iou_threshold: float, max_per_class: int,
                  max_total: int) -> dict[str, jax.Array]:
  """One image's detections from per-class boxes and scores of R regions.

  Args:
    boxes_RxKx4: each region's box for each class (pixels).
    scores_RxK: class probabilities (background excluded).
    valid_R: regions that exist (proposals, not padding).
    score_threshold: only scores above it are kept.
    iou_threshold: NMS threshold within a class.
    max_per_class: boxes a class keeps.
    max_total: detections returned.

  Returns:
    `boxes` `[D, 4]`, `scores` `[D]`, `classes` `[D]` (int32, 0-based) and
    `valid` `[D]`, best first, D = `max_total`.
  """
  num_classes = scores_RxK.shape[1]
  scores_RxK = jnp.where(valid_R[:, None], scores_RxK, -jnp.inf)

  def one_class(boxes_Rx4, scores_R):
    keep_P, kept_P = nms_lib.nms(boxes_Rx4, scores_R, max_per_class,
                                 iou_threshold=iou_threshold,
                                 score_threshold=score_threshold)
    return boxes_Rx4[keep_P], jnp.where(kept_P, scores_R[keep_P], -jnp.inf)

  boxes_KxPx4, scores_KxP = jax.vmap(one_class, in_axes=(1, 1))(
      boxes_RxKx4, scores_RxK)
  classes_KxP = jnp.broadcast_to(
      jnp.arange(num_classes, dtype=jnp.int32)[:, None], scores_KxP.shape)
  total = min(max_total, scores_KxP.size)
  scores_D, index_D = jax.lax.top_k(scores_KxP.reshape(-1), total)
  boxes_Dx4 = boxes_KxPx4.reshape(-1, 4)[index_D]
  classes_D = classes_KxP.reshape(-1)[index_D]
  valid_D = scores_D > -jnp.inf
  pad = max_total - total
  if pad:  # Fewer candidates than slots: pad with invalid detections.
    boxes_Dx4 = jnp.pad(boxes_Dx4, ((0, pad), (0, 0)))
    scores_D = jnp.pad(scores_D, (0, pad), constant_values=-jnp.inf)
    classes_D = jnp.pad(classes_D, (0, pad))
    valid_D = jnp.pad(valid_D, (0, pad))
  return {'boxes': jnp.where(valid_D[:, None], boxes_Dx4, 0.0),
          'scores': jnp.where(valid_D, scores_D, 0.0),
          'classes': jnp.where(valid_D, classes_D, 0),
          'valid': valid_D}
