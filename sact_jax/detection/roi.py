"""Region features by bilinear crop-and-resize, as `tf.image.crop_and_resize`.

The TF Object Detection API's Faster R-CNN (the SACT paper's detector)
crops each proposal from the feature map this way (then max-pools): box
`(y1, x1, y2, x2)` in normalised coordinates samples the map at
`y = y1 (H - 1) + i (y2 - y1) (H - 1) / (h - 1)` for i < h (the box's
centre when h = 1), the same for x, bilinearly; samples outside the map
read `extrapolation_value`.
"""

import jax
import jax.numpy as jnp


def _sample_points(lo, hi, size: int, extent: int):
  """Sample coordinates `[M, size]` along one axis, in map pixels."""
  if size > 1:
    steps = jnp.arange(size, dtype=jnp.float32) / (size - 1)
    return (lo[:, None] + (hi - lo)[:, None] * steps[None, :]) * (extent - 1)
  return (0.5 * (lo + hi) * (extent - 1))[:, None]


def crop_and_resize(features_HxWxC: jax.Array, boxes_Mx4: jax.Array,
                    crop_size: tuple[int, int], *,
                    extrapolation_value: float = 0.0) -> jax.Array:
  """Bilinear crops `[M, h, w, C]` of one feature map at normalised boxes."""
  height, width = features_HxWxC.shape[:2]
  crop_h, crop_w = crop_size
  ys_Mxh = _sample_points(boxes_Mx4[:, 0], boxes_Mx4[:, 2], crop_h, height)
  xs_Mxw = _sample_points(boxes_Mx4[:, 1], boxes_Mx4[:, 3], crop_w, width)
  y0 = jnp.floor(ys_Mxh)
  x0 = jnp.floor(xs_Mxw)
  wy = (ys_Mxh - y0)[:, :, None, None]
  wx = (xs_Mxw - x0)[:, None, :, None]
  y0i, x0i = y0.astype(jnp.int32), x0.astype(jnp.int32)

  def at(yi, xi):
    """Map values at integer (y, x) grids `[M, h, w, C]`, clamped."""
    yc = jnp.clip(yi, 0, height - 1)[:, :, None]
    xc = jnp.clip(xi, 0, width - 1)[:, None, :]
    return features_HxWxC[yc, xc]

  top = at(y0i, x0i) * (1 - wx) + at(y0i, x0i + 1) * wx
  bottom = at(y0i + 1, x0i) * (1 - wx) + at(y0i + 1, x0i + 1) * wx
  crops = top * (1 - wy) + bottom * wy
  inside_y = (ys_Mxh >= 0) & (ys_Mxh <= height - 1)
  inside_x = (xs_Mxw >= 0) & (xs_Mxw <= width - 1)
  inside = inside_y[:, :, None, None] & inside_x[:, None, :, None]
  return jnp.where(inside, crops, extrapolation_value).astype(
      features_HxWxC.dtype)
