"""Ponder maps of image files at their own aspect ratio, and raw export.

Image files (JPEG, PNG) are resized so that their short side is
`image_size` pixels, keeping their aspect ratio: the models are fully
convolutional, so a non-square image runs as it is, without a square crop
that would cut off what the network looks at. Images of one shape run as
one batch.

`save_npz` writes what was computed as plain numpy arrays (no pickles;
`np.load(path, allow_pickle=False)` reads it), one set of keys per image
i = 0 .. N-1, in the order of `names`, and for blocks b = 0 .. B-1:

  names               [N] str: the image's path as given or matched.
  num_blocks          []  int: B (0 for a vanilla model).
  ponder_cost         [N] float32: total ponder cost, the sum over blocks
                      of each block map's mean (as `ponder_cost_total` of
                      the evaluation).
  flops               [N] float64: FLOPs of the forward pass of the image.
  predicted_class     [N] int32: index of the largest logit (for 1001-class
                      ImageNet models 0 is the background class).
  true_class          [N] int32: a dataset image's label in the dataset's
                      numbering (-1 for files and photos).
  image_shape         [N, 2] int32: (height, width) the model ran on.
  image_<i>           [H_i, W_i, 3] uint8: the resized image (dataset
                      images: the preprocessed one by its own range).
  ponder_block<b>_<i> [h_b, w_b] float32: block b's map at block resolution
                      ([1, 1] for ACT, which ponders uniformly).
  ponder_total_<i>    [H_i, W_i] float32: the sum over blocks of their maps,
                      each upsampled to the image by nearest neighbour (as
                      the original export).

For a dataset split, `save_ponder_maps_by_cost` ranks eval images by total
ponder cost and draws the cheapest, the median and the dearest ones, as the
SACT paper's ImageNet figure.
"""

import dataclasses
import glob
import io
import os
from typing import Sequence

from flax import nnx
import jax.numpy as jnp
from matplotlib import figure as mfigure
import numpy as np
from PIL import Image

from sact_jax import data as data_lib
from sact_jax import evaluate
from sact_jax import models
from sact_jax import visualize

# Short side of the images when none is given: the family's training size.
DEFAULT_IMAGE_SIZE = {'cifar': 32, 'imagenet': 224}
COST_GROUPS = ('low', 'median', 'high')


class NoImagesError(ValueError):
  """A pattern matched no file, or no file it matched is an image."""


class NotAnImageError(ValueError):
  """A file that PIL cannot read as an image."""


@dataclasses.dataclass(frozen=True)
class PonderResult:
  """One image's forward pass: its maps, cost and prediction."""
  name: str
  image: np.ndarray  # [H, W, 3], as drawn (uint8 files, or preprocessed).
  block_maps: list[np.ndarray]  # Per block [h_b, w_b].
  total_map: np.ndarray  # [H, W].
  ponder_cost: float
  flops: float
  predicted_class: int
  # Dataset images only: the label (in the dataset's numbering) and the
  # object mask `[H, W]` where the dataset has one.
  true_class: int | None = None
  mask: np.ndarray | None = None


def find_images(patterns: Sequence[str]) -> list[str]:
  """Files named by `patterns`: files, folders (their files) or globs.

  Every file of a folder is taken (hidden ones aside), so that a stray
  non-image is reported by `load_image` rather than silently dropped.

  Raises:
    NoImagesError: a pattern matches no file.
    TypeError: `patterns` is one string (it would be read per character).
  """
  if isinstance(patterns, (str, os.PathLike)):
    raise TypeError(f'patterns must be a list of files, folders or globs, '
                    f'got the single {patterns!r}; pass [{patterns!r}].')
  paths = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = [os.path.join(pattern, name)
               for name in sorted(os.listdir(pattern))
               if not name.startswith('.')]
    else:
      found = sorted(glob.glob(pattern))
    found = [path for path in found if os.path.isfile(path)]
    if not found:
      raise NoImagesError(f'--images={pattern} matches no file.')
    paths += [path for path in found if path not in paths]
  return paths


def resized_shape(height: int, width: int, image_size: int
                  ) -> tuple[int, int]:
  """(height, width) with the short side `image_size`, aspect ratio kept."""
  scale = image_size / min(height, width)
  return (max(1, round(height * scale)), max(1, round(width * scale)))


def load_image(path: str, image_size: int) -> np.ndarray:
  """An image file as RGB uint8 `[H, W, 3]`, short side `image_size`.

  Raises:
    NotAnImageError: PIL cannot read the file as an image.
  """
  try:
    with Image.open(path) as image:
      if image.mode.startswith('I'):
        # 16-bit greyscale (PNG): PIL's convert clips it at 255, to white.
        image = Image.fromarray(
            (np.asarray(image, np.float64) / 257.0).round().clip(0, 255)
            .astype(np.uint8))
      image = image.convert('RGB')
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise NotAnImageError(f'{path} is not an image PIL can read '
                          f'({type(e).__name__}).') from e
  height, width = resized_shape(image.height, image.width, image_size)
  return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def load_images(paths: Sequence[str], image_size: int
                ) -> tuple[dict[str, np.ndarray], list[str]]:
  """`load_image` of every path; the files that are not images are skipped.

  Returns:
    (path -> image, in the order of `paths`; one message per skipped file).

  Raises:
    NoImagesError: none of `paths` is an image, or `paths` is empty.
    TypeError: `paths` is one string (it would be read per character).
  """
  if isinstance(paths, (str, os.PathLike)):
    raise TypeError(f'paths must be a list of image files, got the single '
                    f'{paths!r}; pass [{paths!r}].')
  if not paths:
    raise NoImagesError('load_images got no paths.')
  images, skipped = {}, []
  for path in paths:
    try:
      images[path] = load_image(path, image_size)
    except NotAnImageError as e:
      skipped.append(str(e))
  if not images:
    raise NoImagesError(f'None of the {len(paths)} files matched is an image '
                        f'PIL can read (e.g. {paths[0]}).')
  return images, skipped


def _group_by_shape(images: Sequence[np.ndarray]) -> list[list[int]]:
  groups = {}
  for i, image in enumerate(images):
    groups.setdefault(image.shape, []).append(i)
  return list(groups.values())


def ponder_results(model: nnx.Module, images: Sequence[np.ndarray],
                   names: Sequence[str], *, preprocess: str | None = None
                   ) -> list[PonderResult]:
  """Forward passes of `images` (any sizes), one batch per image shape.

  Args:
    model: a CIFAR or ImageNet ResNet (run in eval mode; not changed).
    images: `[H, W, 3]` images.
    names: per image, its name.
    preprocess: dataset or model family whose normalisation to apply
      (`data.preprocess_image`); None for images that are already
      normalised (from `data.make_dataset`).

  Returns:
    One `PonderResult` per image, in the order of `images`.

  Raises:
    TypeError: `names` is a string, or `preprocess` is None and an image
      has an integer dtype (raw pixel values).
    ValueError: not one name per image.
  """
  if isinstance(names, str):
    raise TypeError(f'names must be a sequence of names, one per image, got '
                    f'the string {names!r}.')
  if len(names) != len(images):
    raise ValueError(f'Got {len(images)} images but {len(names)} names.')
  if preprocess is None:
    for name, image in zip(names, images):
      dtype = np.asarray(image).dtype
      if not jnp.issubdtype(dtype, jnp.floating):  # bfloat16 too.
        raise TypeError(
            f'Image {name!r} has dtype {dtype}, but preprocess=None takes '
            'images already normalised (floats); pass preprocess=\'cifar\' '
            'or \'imagenet\' (the model family) for raw pixel values.')
  results = [None] * len(images)
  for group in _group_by_shape(images):
    batch = np.stack([
        images[i] if preprocess is None
        else data_lib.preprocess_image(preprocess, images[i])
        for i in group])
    logits, aux = evaluate.predict(model, batch)
    logits = np.asarray(logits)
    flops = np.asarray(aux['flops'], np.float64)
    maps = visualize.ponder_maps(aux)
    shape = batch.shape[1:3]
    for k, i in enumerate(group):
      block_maps = [m[k] for m in maps]
      total = sum((visualize.upsample_nearest(m[None], shape)[0]
                   for m in block_maps), np.zeros(shape, np.float32))
      results[i] = PonderResult(
          name=names[i], image=np.asarray(images[i]), block_maps=block_maps,
          total_map=total.astype(np.float32),
          ponder_cost=float(sum(m.mean() for m in block_maps)),
          flops=float(flops[k]), predicted_class=int(logits[k].argmax()))
  return results


def save_npz(results: Sequence[PonderResult], path: str) -> str:
  """Writes `results` with the keys of the module docstring; returns `path`.

  Written whole or not at all (a temporary file and a rename).
  """
  if not results:
    raise ValueError('No results to save.')
  arrays = {
      'names': np.array([r.name for r in results], dtype=str),
      'num_blocks': np.array(len(results[0].block_maps), np.int32),
      'ponder_cost': np.array([r.ponder_cost for r in results], np.float32),
      'flops': np.array([r.flops for r in results], np.float64),
      'predicted_class': np.array([r.predicted_class for r in results],
                                  np.int32),
      'true_class': np.array([-1 if r.true_class is None else r.true_class
                              for r in results], np.int32),
      'image_shape': np.array([r.image.shape[:2] for r in results],
                              np.int32),
  }
  for i, r in enumerate(results):
    image = np.asarray(r.image)
    if image.dtype != np.uint8:  # Preprocessed (dataset images): as drawn.
      image = np.round(255 * visualize.display_image(image)).astype(np.uint8)
    arrays[f'image_{i}'] = image
    arrays[f'ponder_total_{i}'] = r.total_map
    for b, block_map in enumerate(r.block_maps):
      arrays[f'ponder_block{b}_{i}'] = np.asarray(block_map, np.float32)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp_path = os.path.join(directory, f'.{os.path.basename(path)}.tmp')
  with open(tmp_path, 'wb') as f:
    f.write(buffer.getvalue())
  os.replace(tmp_path, path)
  return path


# Characters of a title line that fit a panel's width.
_TITLE_CHARS = 34


def _shorten(name: str, limit: int) -> str:
  """`name`, cut in the middle to `limit` characters."""
  if len(name) <= limit:
    return name
  keep = max(limit - 3, 2)
  return f'{name[:(keep + 1) // 2]}...{name[len(name) - keep // 2:]}'


def _title(result: PonderResult, class_names: Sequence[str] | None,
           label_offset: int, name: str = '', show_size: bool = True) -> str:
  """Short enough for a panel's width (`name` cut to fit its line)."""
  predicted = result.predicted_class - label_offset
  if class_names is not None and 0 <= predicted < len(class_names):
    predicted_name = class_names[predicted]
  else:
    predicted_name = f'class {predicted}'
  height, width = result.image.shape[:2]
  size = f'{height}x{width}, ' if show_size else ''
  first = f'{size}cost {result.ponder_cost:.3f}'
  if name:
    first = f'{_shorten(name, _TITLE_CHARS - len(first) - 2)}: {first}'
  flops = f'{evaluate.human_count(result.flops)}FLOPs'
  if result.true_class is None:
    return f'{first}\npredicted {predicted_name}, {flops}'
  true_name = visualize.class_name(result.true_class, class_names)
  return f'{first}\npredicted {predicted_name}\ntrue {true_name}, {flops}'


def _figure(results: Sequence[PonderResult], titles: Sequence[str], *,
            label_offset: int, overlay: bool,
            norms=None) -> mfigure.Figure:
  """`visualize.render_ponder_figure` of results: masks where every result
  has one, wrong predictions of dataset images in red."""
  masks = [r.mask for r in results]
  return visualize.render_ponder_figure(
      [r.image for r in results], [r.block_maps for r in results],
      titles=titles, overlay=overlay, norms=norms,
      masks=None if any(m is None for m in masks) else masks,
      highlight=[r.true_class is not None
                 and r.predicted_class - label_offset != r.true_class
                 for r in results])


def ponder_figures(results: Sequence[PonderResult], *,
                   titles: Sequence[str] | None = None,
                   class_names: Sequence[str] | None = None,
                   label_offset: int = 0,
                   overlay: bool = False) -> list[mfigure.Figure]:
  """`visualize.render_ponder_figure` of results, `ROWS_PER_PAGE` a figure.

  Titles default to the name, size, total ponder cost, prediction and
  FLOPs of each image.
  """
  if not results:
    raise ValueError('No results to draw.')
  if titles is not None and len(titles) != len(results):
    raise ValueError(f'Got {len(results)} results but {len(titles)} titles.')
  if titles is None:
    titles = [_title(r, class_names, label_offset, os.path.basename(r.name))
              for r in results]
  norms = visualize.column_norms([r.block_maps for r in results])
  figures = []
  for start in range(0, len(results), visualize.ROWS_PER_PAGE):
    page = slice(start, start + visualize.ROWS_PER_PAGE)
    figures.append(_figure(results[page], titles[page],
                           label_offset=label_offset, overlay=overlay,
                           norms=norms))
  return figures


def select_by_cost(costs: Sequence[float], per_group: int
                   ) -> list[tuple[str, int]]:
  """(group, index) of the cheapest, median and dearest `per_group` costs.

  In increasing order of cost; with fewer than 3 * `per_group` costs, all
  of them, split into the groups as evenly as possible.
  """
  order = [int(i) for i in np.argsort(np.asarray(costs), kind='stable')]
  count = len(order)
  if count <= len(COST_GROUPS) * per_group:
    bounds = np.linspace(0, count, len(COST_GROUPS) + 1).round().astype(int)
    starts = bounds[:-1]
    sizes = np.diff(bounds)
  else:
    starts = [0, (count - per_group) // 2, count - per_group]
    sizes = [per_group] * len(COST_GROUPS)
  return [(group, order[j]) for group, start, size
          in zip(COST_GROUPS, starts, sizes)
          for j in range(start, start + size)]


def ponder_figure_by_cost(model: nnx.Module, config, *,
                          num_images: int = 64, per_group: int = 3,
                          overlay: bool = False
                          ) -> tuple[mfigure.Figure, list[PonderResult]]:
  """The first `num_images` eval images, ranked by total ponder cost.

  Args:
    model: a CIFAR or ImageNet ResNet (run in eval mode; not changed).
    config: ConfigDict with `dataset`, `data_dir` and optionally
      `eval_split` and `image_size` (ImageNet).
    num_images: eval images to rank.
    per_group: rows of low, median and high cost.
    overlay: draw maps over their images.

  Returns:
    (the figure, one row per drawn image in increasing cost; the drawn
    results in that order).
  """
  if num_images < 1 or per_group < 1:
    raise ValueError(f'num_images and per_group must be >= 1, got '
                     f'{num_images} and {per_group}.')
  info = data_lib.dataset_info(config.dataset)
  results = dataset_results(model, config, num_images)
  selected = select_by_cost([r.ponder_cost for r in results], per_group)
  offset = data_lib.label_offset(
      config.dataset, models.ModelSpec.from_model(model).num_classes)
  drawn = [results[i] for _, i in selected]
  titles = [_title(results[i], info.class_names, offset,
                   f'{group}: {results[i].name}', show_size=False)
            for group, i in selected]
  return _figure(drawn, titles, label_offset=offset, overlay=overlay), drawn


def save_ponder_maps_by_cost(model: nnx.Module, config, out_dir: str, *,
                             num_images: int = 64, per_group: int = 3,
                             overlay: bool = False) -> str:
  """Writes `ponder_figure_by_cost` as `ponder_maps_by_cost.png`."""
  fig, _ = ponder_figure_by_cost(model, config, num_images=num_images,
                                 per_group=per_group, overlay=overlay)
  return visualize.save_figure(
      fig, os.path.join(out_dir, 'ponder_maps_by_cost.png'))


def image_results(model: nnx.Module, images: dict[str, np.ndarray]
                  ) -> list[PonderResult]:
  """Forward passes of RGB uint8 images (files, photos), by name."""
  family = models.ModelSpec.from_model(model).family
  return ponder_results(model, list(images.values()), list(images),
                        preprocess=family)


def dataset_results(model: nnx.Module, config, num_images: int
                    ) -> list[PonderResult]:
  """Forward passes of the first `num_images` eval images of the dataset.

  Named `<split>[<i>]`; their `image` is the preprocessed one the model
  ran on (`save_npz` stores it as uint8 by its own range, as drawn).
  """
  batch = next(iter(visualize.eval_images(config, num_images)))
  split = data_lib.dataset_info(config.dataset).split_to_evaluate(
      config.get('eval_split', None))
  images = list(np.asarray(batch['image']))
  results = ponder_results(model, images,
                           [f'{split}[{i}]' for i in range(len(images))])
  labels = np.asarray(batch['label'])
  masks = np.asarray(batch['mask']) if 'mask' in batch else None
  return [dataclasses.replace(
      r, true_class=int(labels[i]),
      mask=None if masks is None else masks[i])
          for i, r in enumerate(results)]


def save_result_figures(model: nnx.Module, results: Sequence[PonderResult],
                        out_dir: str, *, config=None, overlay: bool = False,
                        stem: str = 'images') -> list[str]:
  """Draws results as `<stem>.png` (`<stem>_<k>.png` for several).

  Args:
    model: the model that computed them (for its number of classes).
    results: from `image_results` or `dataset_results`.
    out_dir: where the PNGs go.
    config: optional ConfigDict whose `dataset` names the classes (and
      says whether logit 0 is a background class).
    overlay: draw maps over their images.
    stem: file name without `.png`.
  """
  class_names, offset = None, 0
  if config is not None:
    num_classes = models.ModelSpec.from_model(model).num_classes
    class_names = data_lib.dataset_info(config.dataset).class_names
    offset = data_lib.label_offset(config.dataset, num_classes)
  return visualize.save_figures(
      ponder_figures(results, class_names=class_names, label_offset=offset,
                     overlay=overlay), out_dir, stem)


def save_image_maps(model: nnx.Module, images: dict[str, np.ndarray],
                    out_dir: str, *, config=None, export: str | None = None,
                    overlay: bool = False) -> list[str]:
  """Draws (and exports) the ponder maps of `load_images`' images.

  Args:
    model: a CIFAR or ImageNet ResNet (run in eval mode; not changed).
    images: name -> RGB uint8 image in [0, 255], any size.
    out_dir: directory for `images.png` (`images_<k>.png` for several).
    config: optional ConfigDict whose `dataset` names the classes.
    export: optional `.npz` path for `save_npz`.
    overlay: draw maps over their images.

  Returns:
    Paths written: the PNGs, then the npz.
  """
  results = image_results(model, images)
  written = save_result_figures(model, results, out_dir, config=config,
                                overlay=overlay)
  if export is not None:
    written.append(save_npz(results, export))
  return written
