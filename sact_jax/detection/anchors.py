"""Anchors over a feature map, as the TF Object Detection API's grid.

One anchor per scale and aspect ratio at every feature-map position: height
`scale * base / sqrt(ratio)`, width `scale * base * sqrt(ratio)`, centred at
`offset + stride * (i, j)` in image pixels. The Faster R-CNN of the SACT
paper uses base 256, stride 16, scales (0.25, 0.5, 1, 2) and ratios
(0.5, 1, 2): 12 anchors per position of the stride-16 map.
"""

from typing import Sequence

import jax.numpy as jnp
import numpy as np

DEFAULT_SCALES = (0.25, 0.5, 1.0, 2.0)
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def grid_anchors(feature_hw: tuple[int, int], *, stride: int = 16,
                 base_size: float = 256.0,
                 scales: Sequence[float] = DEFAULT_SCALES,
                 aspect_ratios: Sequence[float] = DEFAULT_RATIOS,
                 offset: float = 0.0) -> jnp.ndarray:
  """Anchors `[h * w * A, 4]` in pixels, A = scales x ratios per position.

  Ordered position-major (row, column), then scale, then ratio: anchor
  `(i * w + j) * A + k` belongs to feature-map position (i, j), so a head's
  `[h, w, A * 4]` output reshapes onto them.
  """
  height, width = feature_hw
  scales_K = np.repeat(np.asarray(scales, np.float64), len(aspect_ratios))
  ratios_K = np.tile(np.asarray(aspect_ratios, np.float64), len(scales))
  sizes_h = scales_K * base_size / np.sqrt(ratios_K)
  sizes_w = scales_K * base_size * np.sqrt(ratios_K)
  cy = offset + stride * np.arange(height, dtype=np.float64)
  cx = offset + stride * np.arange(width, dtype=np.float64)
  cy_HW, cx_HW = np.meshgrid(cy, cx, indexing='ij')
  cy_N = np.repeat(cy_HW.reshape(-1), len(scales_K))
  cx_N = np.repeat(cx_HW.reshape(-1), len(scales_K))
  h_N = np.tile(sizes_h, height * width)
  w_N = np.tile(sizes_w, height * width)
  return jnp.asarray(np.stack([cy_N - h_N / 2, cx_N - w_N / 2,
                               cy_N + h_N / 2, cx_N + w_N / 2], axis=-1),
                     jnp.float32)
