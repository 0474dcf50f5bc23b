"""Ponder-cost maps next to their images, as in the SACT paper's figures.

One row per image: the image (min-max scaled for display), then the
ponder-cost map of every block (shown at image size, cells kept visible,
with the object outline where the dataset has masks) and, with several
blocks, their sum (the map of where the network spent its residual units).
Every map column has one colour scale for all rows (and all pages of one
figure), drawn as a colorbar under the column, so rows compare directly;
a wrong prediction's title is red. Drawn with matplotlib's object API on
the Agg canvas: no pyplot state, no display needed.
"""

import os
import re
from typing import Any, Mapping, Sequence

from flax import nnx
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib import figure as mfigure
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from sact_jax import data as data_lib
from sact_jax import evaluate
from sact_jax import models

COLORMAP = 'inferno'
# What a colour bar measures: units run plus the remainder, rho = N + R.
PONDER_COST_LABEL = 'ponder cost (units run + remainder)'
# The narrowest colour scale (ponder-cost units): `shared_norm`.
MIN_SPAN = 1.0
# Size of one panel (inches) and resolution: a figure of R rows and C panel
# columns is (C * PANEL_INCHES * DPI) x ((R * PANEL_INCHES + COLORBAR_INCHES)
# * DPI) pixels (`figure_pixel_size`).
PANEL_INCHES = 2.0
COLORBAR_INCHES = 0.9
# Of which the bar itself (the rest: ticks, label, margin).
_BAR_INCHES = 0.15
DPI = 100
# Opacity of a map drawn over its (grey) image.
_OVERLAY_ALPHA = 0.6
# Images per file of `save_ponder_maps`.
ROWS_PER_PAGE = 8
# Photographs that scikit-image ships with its package (no download).
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'immunohistochemistry',
          'camera')
def figure_pixel_size(num_rows: int, num_columns: int) -> tuple[int, int]:
  """(width, height) in pixels of a figure of `render_ponder_figure`."""
  width = num_columns * PANEL_INCHES * DPI
  height = (num_rows * PANEL_INCHES + COLORBAR_INCHES) * DPI
  return int(round(width)), int(round(height))


def display_image(image_HxWxC: np.ndarray) -> np.ndarray:
  """Maps an image (e.g. standardised) to [0, 1] by its own min and max."""
  image = np.asarray(image_HxWxC, np.float64)
  lo, hi = image.min(), image.max()
  return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def upsample_nearest(map_Bxhxw: np.ndarray, shape: tuple[int, int]
                     ) -> np.ndarray:
  """Nearest-neighbour resize of maps to `shape` (any sizes)."""
  h, w = map_Bxhxw.shape[1:]
  rows = ((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int)
  cols = ((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int)
  return map_Bxhxw[:, rows][:, :, cols]


def ponder_maps(aux: Mapping[str, Any]) -> list[np.ndarray]:
  """Per-block ponder costs of a forward pass as `[B, h, w]` numpy maps.

  ACT's one value per image becomes a 1x1 map (ACT ponders uniformly);
  vanilla models have none.
  """
  maps = []
  for ponder in aux['ponder_cost']:
    ponder = np.asarray(ponder, np.float32)
    maps.append(ponder[:, None, None] if ponder.ndim == 1 else ponder)
  return maps


def shared_norm(values: Sequence[np.ndarray]) -> mcolors.Normalize:
  """One colour scale for a column: the range of all its values.

  At least `MIN_SPAN` wide (centred on the values): a nearly flat map (an
  untrained model's, or ACT's) looks nearly flat, instead of 2.966 and
  2.971 being drawn as the colormap's two ends.
  """
  if not len(values):
    raise ValueError('shared_norm needs at least one map.')
  lo = min(float(v.min()) for v in values)
  hi = max(float(v.max()) for v in values)
  if hi - lo < MIN_SPAN:
    middle = 0.5 * (lo + hi)
    lo, hi = middle - 0.5 * MIN_SPAN, middle + 0.5 * MIN_SPAN
  return mcolors.Normalize(lo, hi)


def map_columns(maps: Sequence[Sequence[np.ndarray]]
                ) -> tuple[list[list[np.ndarray]], list[str]]:
  """The map columns of a figure and their names.

  Args:
    maps: per image, one `[h, w]` ponder map per block.

  Returns:
    `(columns, names)`: per block the maps of every image, then (with
    several blocks) their sum on each image's finest grid.
  """
  if not len(maps):
    raise ValueError('No maps to draw.')
  for image_maps in maps:
    # `ponder_maps` is per block: passed as is, it would be drawn transposed
    # (silently where the batch has as many images as the model blocks).
    if getattr(image_maps, 'ndim', None) == 3:
      raise ValueError(
          'maps must hold, per image, a list of [h, w] block maps; got a '
          f'{list(image_maps.shape)} array (visualize.ponder_maps is per '
          'block: use [[m[i] for m in maps] for i in range(B)]).')
    for block_map in image_maps:
      if np.ndim(block_map) != 2:
        raise ValueError('Every ponder map must be 2-D [h, w], got shape '
                         f'{np.shape(block_map)}.')
  num_blocks = len(maps[0])
  if any(len(m) != num_blocks for m in maps):
    raise ValueError('Every image needs the same number of ponder maps.')
  columns = [[np.asarray(m[b], np.float64) for m in maps]
             for b in range(num_blocks)]
  names = [f'block {b + 1}' for b in range(num_blocks)]
  if num_blocks > 1:
    total = []
    for row_maps in maps:
      finest = max((m.shape for m in row_maps), key=lambda s: s[0] * s[1])
      total.append(sum(upsample_nearest(np.asarray(m, np.float64)[None],
                                        finest)[0] for m in row_maps))
    columns.append(total)
    names.append('sum over blocks')
  return columns, names


def column_norms(maps: Sequence[Sequence[np.ndarray]]
                 ) -> list[mcolors.Normalize]:
  """The colour scale of each map column (`map_columns`) over all `maps`:
  pass them to every page of a figure split over several files."""
  return [shared_norm(column) for column in map_columns(maps)[0]]


def render_ponder_figure(images: Sequence[np.ndarray],
                         maps: Sequence[Sequence[np.ndarray]], *,
                         titles: Sequence[str] | None = None,
                         masks: Sequence[np.ndarray] | None = None,
                         overlay: bool = False,
                         norms: Sequence[mcolors.Normalize] | None = None,
                         highlight: Sequence[bool] | None = None
                         ) -> mfigure.Figure:
  """Draws images and their ponder-cost maps, one image per row.

  Args:
    images: N images `[H, W, 3]` (any range; each is min-max scaled). They
      may differ in size.
    maps: per image, one `[h, w]` ponder map per block (any resolution; shown
      stretched over the image).
    titles: per image, a title for its image panel.
    masks: per image, an `[H, W]` object mask whose outline is drawn on
      every map panel of the row.
    overlay: draw each map translucently over its image instead of alone.
    norms: the colour scale of each map column (default: `column_norms` of
      these maps).
    highlight: per image, whether its title is drawn in red (e.g. a wrong
      prediction).

  Returns:
    A matplotlib Figure of `figure_pixel_size(N, columns)` pixels, where
    columns = 1 + blocks (+ 1 for the sum over blocks when blocks > 1).
  """
  num_rows = len(images)
  if num_rows == 0:
    raise ValueError('No images to draw.')
  if len(maps) != num_rows:
    raise ValueError(f'Got {num_rows} images but maps for {len(maps)}.')
  for name, values in (('titles', titles), ('masks', masks),
                       ('highlight', highlight)):
    if values is not None and len(values) != num_rows:
      raise ValueError(f'Got {num_rows} images but {len(values)} {name}.')
  columns, names = map_columns(maps)
  if norms is None:
    norms = [shared_norm(column) for column in columns]
  if len(norms) != len(columns):
    raise ValueError(f'Got {len(norms)} colour scales for {len(columns)} map '
                     'columns.')
  num_columns = 1 + len(columns)

  width, height = figure_pixel_size(num_rows, num_columns)
  fig = mfigure.Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
  backend_agg.FigureCanvasAgg(fig)
  # Room above each row for its title (two lines, or more).
  lines = max([2] + [t.count('\n') + 1 for t in titles or ()])
  grid = fig.add_gridspec(
      num_rows + 1, num_columns,
      height_ratios=[PANEL_INCHES] * num_rows + [_BAR_INCHES],
      left=0.02, right=0.98, top=1 - (0.15 + 0.15 * lines) / (height / DPI),
      bottom=0.4 / (height / DPI),
      wspace=0.08, hspace=0.175 * lines)

  for row in range(num_rows):
    image = display_image(images[row])
    img_h, img_w = image.shape[:2]
    extent = (0, img_w, img_h, 0)
    mask = None if masks is None else np.asarray(masks[row], np.float64)
    ax = fig.add_subplot(grid[row, 0])
    # No outline here: it would hide thin objects (a ring) under its line.
    ax.imshow(image, extent=extent, interpolation='nearest')
    if titles is not None:
      ax.set_title(titles[row], fontsize=8,
                   color='red' if highlight is not None and highlight[row]
                   else 'black')
    ax.set_axis_off()
    for col, (column, norm) in enumerate(zip(columns, norms)):
      ax = fig.add_subplot(grid[row, col + 1])
      if overlay:
        ax.imshow(image.mean(axis=-1), cmap='gray', extent=extent,
                  interpolation='nearest')
      ax.imshow(column[row], cmap=COLORMAP, norm=norm, extent=extent,
                interpolation='nearest',
                alpha=_OVERLAY_ALPHA if overlay else 1.0)
      _outline(ax, mask, extent)
      ax.set_xlim(0, img_w)
      ax.set_ylim(img_h, 0)
      ax.set_axis_off()
      if row == 0:
        h, w = column[row].shape
        ax.set_title(f'{names[col]} ({h}x{w})', fontsize=8)

  for col, norm in enumerate(norms):
    # The bar spans the middle of its column, so that the end tick labels
    # of neighbouring bars do not run into each other.
    cell = grid[num_rows, col + 1].subgridspec(1, 3,
                                               width_ratios=[1, 8, 1])
    colorbar = fig.colorbar(_scalar_mappable(norm),
                            cax=fig.add_subplot(cell[0, 1]),
                            orientation='horizontal')
    colorbar.locator = ticker.MaxNLocator(nbins=4)
    colorbar.update_ticks()
    colorbar.ax.tick_params(labelsize=7)
    colorbar.set_label(PONDER_COST_LABEL, fontsize=7)
    if overlay:  # The maps' colours as drawn: translucent over mid grey.
      colorbar.ax.set_facecolor('0.5')
      colorbar.solids.set_alpha(_OVERLAY_ALPHA)
  return fig


def _scalar_mappable(norm: mcolors.Normalize) -> cm.ScalarMappable:
  return cm.ScalarMappable(norm=norm, cmap=COLORMAP)


def _outline(ax, mask: np.ndarray | None, extent) -> None:
  """Draws the 0.5 level of `mask` (the object's edge), if there is one."""
  if mask is None or mask.min() == mask.max():
    return
  h, w = mask.shape
  ys = (np.arange(h) + 0.5) * (extent[2] / h)
  xs = (np.arange(w) + 0.5) * (extent[1] / w)
  ax.contour(xs, ys, mask, levels=[0.5], colors='cyan', linewidths=0.8)


def save_figure(fig: mfigure.Figure, path: str) -> str:
  """Writes `fig` as a PNG of exactly its pixel size; returns `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # A temporary name and a rename: a reader never sees half a PNG.
  tmp_path = os.path.join(directory, f'.{os.path.basename(path)}.tmp')
  fig.savefig(tmp_path, dpi=DPI, format='png')
  os.replace(tmp_path, path)
  return path


def class_name(index: int, names: Sequence[str] | None) -> str:
  """The label's name, or 'class <index>' where no name is known."""
  if names is not None and 0 <= index < len(names):
    return names[index]
  return f'class {index}'


def check_num_images(config, num_images: int) -> None:
  """Raises ValueError if the eval split has fewer than `num_images` images.

  (Only for the dataset's own eval split; a config's other split is known
  only once read.)
  """
  info = data_lib.dataset_info(config.dataset)
  size = info.eval_size(config.get('eval_split', None))
  if size is not None and num_images > size:
    raise ValueError(
        f'{num_images} images asked for, but the {info.eval_split} split of '
        f'{config.dataset} has {size}.')


def eval_images(config, num_images: int, batch_size: int | None = None):
  """The first `num_images` eval images of `config.dataset`, preprocessed.

  Batches of `batch_size` (default: all in one) with `image`, `label` and,
  where the dataset has them, `mask`.
  """
  check_num_images(config, num_images)
  info = data_lib.dataset_info(config.dataset)
  split = info.split_to_evaluate(config.get('eval_split', None))
  return data_lib.make_dataset(
      config.dataset, f'{split}[:{num_images}]',
      batch_size=batch_size or num_images, train=False,
      data_dir=config.get('data_dir', None),
      image_size=config.get('image_size', None))


def ponder_figures(model: nnx.Module, config, *, num_images: int = 8,
                   overlay: bool = False) -> list[mfigure.Figure]:
  """Ponder maps of the first eval images of `config.dataset`, as figures.

  Args:
    model: a CIFAR or ImageNet ResNet (run in eval mode; not changed).
    config: ConfigDict with `dataset`, `data_dir` and optionally
      `eval_split` and `image_size` (ImageNet).
    num_images: images to draw, `ROWS_PER_PAGE` per figure.
    overlay: draw maps over their images.
  """
  if num_images < 1:
    raise ValueError(f'num_images must be >= 1, got {num_images}.')
  batch = next(iter(eval_images(config, num_images)))
  spec = models.ModelSpec.from_model(model)
  label_offset = data_lib.label_offset(config.dataset, spec.num_classes)
  logits, aux = evaluate.predict(model, batch['image'])
  logits = np.asarray(logits)
  flops = np.asarray(aux['flops'])
  maps = ponder_maps(aux)
  names = data_lib.dataset_info(config.dataset).class_names
  titles, wrong = [], []
  for i, label in enumerate(np.asarray(batch['label'])):
    predicted = int(logits[i].argmax()) - label_offset
    titles.append(f'predicted {class_name(predicted, names)}\n'
                  f'true {class_name(int(label), names)}, '
                  f'{evaluate.human_count(flops[i])}FLOPs')
    wrong.append(predicted != int(label))
  images = list(batch['image'])
  masks = list(batch['mask']) if 'mask' in batch else None
  count = len(images)
  image_maps = [[m[i] for m in maps] for i in range(count)]
  norms = column_norms(image_maps)  # One scale for every page.
  figures = []
  for start in range(0, count, ROWS_PER_PAGE):
    rows = slice(start, start + ROWS_PER_PAGE)
    figures.append(render_ponder_figure(
        images[rows], image_maps[rows], titles=titles[rows],
        masks=None if masks is None else masks[rows], overlay=overlay,
        norms=norms, highlight=wrong[rows]))
  return figures


def save_ponder_maps(model: nnx.Module, config, out_dir: str, *,
                     num_images: int = 8, overlay: bool = False
                     ) -> list[str]:
  """Writes `ponder_figures` as PNGs into `out_dir` (created if needed).

  Returns:
    Paths of the PNGs written: `ponder_maps.png`, or `ponder_maps_<k>.png`
    for k = 0, 1, ... when there are more than `ROWS_PER_PAGE` images.
  """
  return save_figures(ponder_figures(model, config, num_images=num_images,
                                     overlay=overlay), out_dir, 'ponder_maps')


def save_figures(figures: Sequence[mfigure.Figure], out_dir: str,
                 stem: str) -> list[str]:
  """`<stem>.png`, or `<stem>_<k>.png` for several figures; their paths.

  Pages of an earlier `<stem>` set that these do not replace (a training
  run's 16 images on two pages, then an export of 4 on one) are removed
  once these are written: a directory never mixes two sets of one name.
  """
  if not figures:
    return []
  names = ([f'{stem}.png'] if len(figures) == 1
           else [f'{stem}_{k}.png' for k in range(len(figures))])
  paths = [save_figure(fig, os.path.join(out_dir, name))
           for fig, name in zip(figures, names)]
  page = re.compile(rf'{re.escape(stem)}(_\d+)?\.png')
  for name in os.listdir(out_dir):
    if page.fullmatch(name) and name not in names:
      os.remove(os.path.join(out_dir, name))
  return paths


def figure_array(fig: mfigure.Figure) -> np.ndarray:
  """The figure rendered as an RGB uint8 array [H, W, 3] (for TensorBoard)."""
  canvas = fig.canvas
  if not isinstance(canvas, backend_agg.FigureCanvasAgg):
    canvas = backend_agg.FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'Expected an RGB image [H, W, 3] (or grayscale '
                     f'[H, W]), got shape {image.shape}.')
  return image[..., :3]


def load_photos(names: Sequence[str] = PHOTOS, size: int = 128
                ) -> dict[str, np.ndarray]:
  """Photographs shipped with scikit-image, centre-cropped to `size`^2.

  Args:
    names: functions of `skimage.data` that need no download.
    size: side of the square output.

  Returns:
    name -> uint8 `[size, size, 3]`.
  """
  # Lazy: only the photo pictures need scikit-image and PIL.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top
  photos = {}
  for name in names:
    loader = getattr(skimage.data, name, None)
    if loader is None:
      raise ValueError(f'skimage.data has no image {name!r}; try one of '
                       f'{", ".join(PHOTOS)}.')
    image = _as_rgb(loader()).astype(np.uint8)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    photos[name] = np.asarray(square.resize((size, size), Image.BILINEAR))
  return photos
