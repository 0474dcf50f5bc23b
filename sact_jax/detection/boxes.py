"""Box arithmetic: areas, IoU, clipping and the Faster R-CNN box coder.

Boxes are `(ymin, xmin, ymax, xmax)` on their last axis. Degenerate boxes
(zero or negative extent) have area 0 and IoU 0 with everything, never NaN.
"""

import jax
import jax.numpy as jnp

# The TF Object Detection API's Faster R-CNN box coder scales (y, x, h, w):
# centre offsets are multiplied by 10 and log size ratios by 5, so that the
# regression targets have roughly unit variance.
DEFAULT_SCALES = (10.0, 10.0, 5.0, 5.0)


def area(boxes_Nx4: jax.Array) -> jax.Array:
  """Areas `[...]`; 0 for degenerate boxes."""
  height = jnp.maximum(boxes_Nx4[..., 2] - boxes_Nx4[..., 0], 0.0)
  width = jnp.maximum(boxes_Nx4[..., 3] - boxes_Nx4[..., 1], 0.0)
  return height * width


def iou(boxes_Nx4: jax.Array, boxes_Mx4: jax.Array) -> jax.Array:
  """Pairwise intersection over union `[N, M]`; 0 where the union is 0."""
  a = boxes_Nx4[:, None, :]
  b = boxes_Mx4[None, :, :]
  ymin = jnp.maximum(a[..., 0], b[..., 0])
  xmin = jnp.maximum(a[..., 1], b[..., 1])
  ymax = jnp.minimum(a[..., 2], b[..., 2])
  xmax = jnp.minimum(a[..., 3], b[..., 3])
  inter = jnp.maximum(ymax - ymin, 0.0) * jnp.maximum(xmax - xmin, 0.0)
  union = area(boxes_Nx4)[:, None] + area(boxes_Mx4)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def clip(boxes_Nx4: jax.Array, height: float, width: float) -> jax.Array:
  """Boxes clipped to the window `[0, height] x [0, width]`."""
  limits = jnp.array([height, width, height, width], boxes_Nx4.dtype)
  return jnp.clip(boxes_Nx4, 0.0, limits)


def _centre_size(boxes_Nx4):
  height = boxes_Nx4[..., 2] - boxes_Nx4[..., 0]
  width = boxes_Nx4[..., 3] - boxes_Nx4[..., 1]
  return (boxes_Nx4[..., 0] + 0.5 * height, boxes_Nx4[..., 1] + 0.5 * width,
          height, width)


def encode(boxes_Nx4: jax.Array, anchors_Nx4: jax.Array,
           scales=DEFAULT_SCALES, eps: float = 1e-8) -> jax.Array:
  """Regression targets `[N, 4]` (ty, tx, th, tw) of boxes w.r.t. anchors.

  `ty = 10 (y - ya) / ha`, `th = 5 log(h / ha)` (and the same for x, w),
  as the TF Object Detection API's `FasterRcnnBoxCoder`; sizes are floored
  at `eps` so that degenerate boxes give finite targets.
  """
  y, x, h, w = _centre_size(boxes_Nx4)
  ya, xa, ha, wa = _centre_size(anchors_Nx4)
  h, w = jnp.maximum(h, eps), jnp.maximum(w, eps)
  ha, wa = jnp.maximum(ha, eps), jnp.maximum(wa, eps)
  sy, sx, sh, sw = scales
  return jnp.stack([sy * (y - ya) / ha, sx * (x - xa) / wa,
                    sh * jnp.log(h / ha), sw * jnp.log(w / wa)], axis=-1)


def decode(codes_Nx4: jax.Array, anchors_Nx4: jax.Array,
           scales=DEFAULT_SCALES, max_log_ratio: float = 4.135) -> jax.Array:
  """Boxes `[N, 4]` from regression codes: the inverse of `encode`.

  Log size ratios are clipped at `max_log_ratio` (log(1000 / 16), as
  torchvision and Detectron do) so that an untrained head cannot overflow.
  """
  ya, xa, ha, wa = _centre_size(anchors_Nx4)
  sy, sx, sh, sw = scales
  y = codes_Nx4[..., 0] / sy * ha + ya
  x = codes_Nx4[..., 1] / sx * wa + xa
  h = jnp.exp(jnp.minimum(codes_Nx4[..., 2] / sh, max_log_ratio)) * ha
  w = jnp.exp(jnp.minimum(codes_Nx4[..., 3] / sw, max_log_ratio)) * wa
  return jnp.stack([y - 0.5 * h, x - 0.5 * w, y + 0.5 * h, x + 0.5 * w],
                   axis=-1)
