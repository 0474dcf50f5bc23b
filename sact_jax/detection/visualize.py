"""Detections next to the extractor's ponder map: the SACT paper's Figure 1.

One row per image: the image with its detections (one colour per class,
'class score' labels) and, optionally, the ground truth as dashed white
boxes; then, where given, the feature extractor's ponder-cost map stretched
over the image with its cells kept visible, so that one sees SACT spend its
residual units on the objects it found. All ponder panels share one colour
scale (one colorbar under the column), so rows compare directly. Drawn with
matplotlib's object API on the Agg canvas, as `sact_jax.visualize`, whose
helpers (display scaling, colour scale, PNG writing) this reuses.
"""

from typing import Any, Mapping, Sequence

from matplotlib import cm
from matplotlib import colormaps
from matplotlib import figure as mfigure
from matplotlib import patches
from matplotlib import patheffects
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from sact_jax import visualize
from sact_jax.detection import coco_eval

# Width of one panel (inches); its height follows the images' aspect ratio.
PANEL_INCHES = 4.0
_COLORBAR_INCHES = 0.8
_BAR_INCHES = 0.15
# Patch gids, so that tests and callers can tell the boxes apart.
DETECTION_GID = 'detection'
GROUND_TRUTH_GID = 'ground_truth'


# Drawn under boxes and label text.
_EDGE = (patheffects.withStroke(linewidth=3, foreground='black'),)


def class_colour(index: int) -> tuple[float, float, float, float]:
  """A fixed colour per class: tab20's ten dark hues first, then the light."""
  return colormaps['tab20']((2 * index) % 20 + (index // 10) % 2)


def _display(image_HxWx3: np.ndarray) -> np.ndarray:
  """uint8 / [0, 1] images as they are; others (normalised) min-max scaled."""
  image = np.asarray(image_HxWx3)
  if np.issubdtype(image.dtype, np.integer):
    return image.astype(np.float64) / 255.0
  image = image.astype(np.float64)
  if image.size and image.min() >= 0.0 and image.max() <= 1.0:
    return image
  return visualize.display_image(image)


def _draw_detections(ax, boxes_Kx4, scores_K, classes_K, class_names,
                     height: int) -> None:
  # Best last, so that its box and label lie on top.
  for k in np.argsort(scores_K, kind='stable'):
    ymin, xmin, ymax, xmax = boxes_Kx4[k]
    colour = class_colour(int(classes_K[k]))
    # A black edge around each box and label: a box of a dark class colour
    # stays visible on dark clutter.
    ax.add_patch(patches.Rectangle(
        (xmin, ymin), xmax - xmin, ymax - ymin, fill=False,
        edgecolor=colour, linewidth=1.5, gid=DETECTION_GID,
        path_effects=_EDGE))
    # Above the box, or inside it where the image's top edge leaves no room.
    inside = ymin < 0.04 * height
    ax.text(xmin, ymin,
            f'{visualize.class_name(int(classes_K[k]), class_names)} '
            f'{scores_K[k]:.2f}',
            fontsize=8, color='white', va='top' if inside else 'bottom',
            clip_on=True, path_effects=_EDGE,
            bbox={'facecolor': colour, 'alpha': 0.8, 'pad': 1.0,
                  'edgecolor': 'none'})


def _draw_ground_truth(ax, boxes_Mx4, labels_M) -> None:
  for (ymin, xmin, ymax, xmax), label in zip(boxes_Mx4, labels_M):
    if label < 0:  # Padding row.
      continue
    ax.add_patch(patches.Rectangle(
        (xmin, ymin), xmax - xmin, ymax - ymin, fill=False,
        edgecolor='white', linestyle='--', linewidth=0.8,
        gid=GROUND_TRUTH_GID))


def _as_maps(ponder_maps_Nxhxw, num_images: int) -> np.ndarray:
  maps = np.asarray(ponder_maps_Nxhxw, np.float64)
  if maps.ndim == 1:  # ACT: one ponder cost per image, a 1x1 map.
    maps = maps[:, None, None]
  if maps.ndim != 3 or maps.shape[0] != num_images:
    raise ValueError(f'ponder_maps_Nxhxw should be [{num_images}, h, w], '
                     f'got shape {maps.shape}.')
  return maps


def detection_figure(images_NxHxWx3: np.ndarray,
                     detections: Mapping[str, Any], *,
                     class_names: Sequence[str] | None,
                     ponder_maps_Nxhxw: np.ndarray | None = None,
                     ground_truth: Mapping[str, Any] | None = None,
                     score_threshold: float = 0.5,
                     max_images: int = 8) -> mfigure.Figure:
  """Draws the first images' detections, and their ponder maps if given.

  Args:
    images_NxHxWx3: uint8 images, or floats; floats outside [0, 1] (e.g.
      normalised network inputs) are min-max scaled per image for display.
    detections: `boxes` `[N, K, 4]` in pixels `(ymin, xmin, ymax, xmax)`,
      `scores` and `classes` `[N, K]`, `valid` `[N, K]`, as the detector
      returns them (see `coco_eval.coco_metrics`).
    class_names: names of the classes for the labels (indices past its end,
      or None, are shown as 'class <index>').
    ponder_maps_Nxhxw: the feature extractor's ponder cost per position
      (any grid, e.g. 6x6; `[N]` for ACT), stretched over the image.
    ground_truth: optional `boxes` `[N, M, 4]` (pixels) and `labels`
      `[N, M]` (-1 = padding), drawn as dashed white boxes.
    score_threshold: valid detections scoring above it are drawn.
    max_images: draw at most this many of the first images, one per row.

  Returns:
    A Figure whose axes are, per row, the detection panel and (with ponder
    maps) the ponder panel, then the ponder colorbar: `n` or `2 n + 1`
    axes for n = min(N, max_images) images.
  """
  images = np.asarray(images_NxHxWx3)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images_NxHxWx3 should be [N, H, W, 3], got shape '
                     f'{images.shape}.')
  num_images = images.shape[0]
  if num_images == 0 or max_images < 1:
    raise ValueError(f'Nothing to draw: {num_images} images, max_images '
                     f'{max_images}.')
  dets = coco_eval.check_detections(detections, num_images)
  maps = (None if ponder_maps_Nxhxw is None
          else _as_maps(ponder_maps_Nxhxw, num_images))
  if ground_truth is not None:
    gt_boxes = np.asarray(ground_truth['boxes'], np.float64)
    gt_labels = np.asarray(ground_truth['labels'])
    if (gt_boxes.ndim != 3 or gt_boxes.shape[0] != num_images
        or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]):
      raise ValueError(f'ground_truth boxes [{num_images}, M, 4] and labels '
                       f'[{num_images}, M] expected, got {gt_boxes.shape} '
                       f'and {gt_labels.shape}.')

  rows = min(num_images, max_images)
  height, width = images.shape[1:3]
  panel_h = PANEL_INCHES * height / width
  columns = 1 if maps is None else 2
  bar = 0.0 if maps is None else _COLORBAR_INCHES
  fig_w, fig_h = columns * PANEL_INCHES, rows * (panel_h + 0.3) + bar + 0.1
  fig = mfigure.Figure(figsize=(fig_w, fig_h), dpi=visualize.DPI)
  backend_agg.FigureCanvasAgg(fig)
  ratios = [panel_h] * rows + ([_BAR_INCHES] if maps is not None else [])
  grid = fig.add_gridspec(
      len(ratios), columns, height_ratios=ratios, left=0.01, right=0.99,
      top=1 - 0.3 / fig_h, bottom=(0.45 if maps is not None else 0.05) / fig_h,
      wspace=0.04, hspace=0.3 / panel_h)
  extent = (0, width, height, 0)  # Pixel (y, x) lands on data (y, x).
  norm = None if maps is None else visualize.shared_norm(list(maps[:rows]))

  for row in range(rows):
    ax = fig.add_subplot(grid[row, 0])
    ax.imshow(_display(images[row]), extent=extent, interpolation='nearest')
    if ground_truth is not None:
      _draw_ground_truth(ax, gt_boxes[row], gt_labels[row])
    shown = dets['valid'][row] & (dets['scores'][row] > score_threshold)
    _draw_detections(ax, dets['boxes'][row][shown],
                     dets['scores'][row][shown], dets['classes'][row][shown],
                     class_names, height)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    count = int(shown.sum())
    ax.set_title(f'{count} detection{"" if count == 1 else "s"} (score > '
                 f'{score_threshold:g})'
                 + ('; dashed: ground truth' if ground_truth is not None
                    else ''), fontsize=8)
    if maps is None:
      continue
    ax = fig.add_subplot(grid[row, 1])
    ax.imshow(maps[row], cmap=visualize.COLORMAP, norm=norm, extent=extent,
              interpolation='nearest')
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    ax.set_title(f'extractor ponder cost, mean {maps[row].mean():.2f}',
                 fontsize=8)

  if maps is not None:
    cell = grid[rows, 1].subgridspec(1, 3, width_ratios=[1, 8, 1])
    colorbar = fig.colorbar(
        cm.ScalarMappable(norm=norm, cmap=visualize.COLORMAP),
        cax=fig.add_subplot(cell[0, 1]), orientation='horizontal')
    colorbar.locator = ticker.MaxNLocator(nbins=4)
    colorbar.update_ticks()
    colorbar.ax.tick_params(labelsize=7)
    colorbar.set_label(visualize.PONDER_COST_LABEL, fontsize=7)
  return fig
