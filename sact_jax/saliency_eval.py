"""Ponder maps scored as saliency against two kinds of ground truth.

Three map sources are compared with the metrics of `sact_jax.saliency`:
the model's total ponder maps (through `saliency.ponder_to_saliency`), the
centre-bias baseline and the uniform baseline.

* Datasets with object masks (`sact_shapes`): the mask stands in for where
  people look. Distribution metrics (CC, KL, SIM) use the mask, normalised
  to sum to 1, as the fixation density. Location metrics (AUCs, NSS) need
  discrete fixations, which a mask is not: scoring against every object
  pixel would reward maps that fill the object evenly and make shuffled
  AUC's negatives whole objects. So `num_fixations` points are drawn
  uniformly inside each object (seeded), which mimics fixations that land on
  the salient object.
* CAT2000 folders: the loader's fixation maps, and as densities those maps
  blurred with a Gaussian of about one degree of visual angle.
"""

from collections.abc import Iterable, Sequence
import dataclasses

from flax import nnx
import numpy as np
from PIL import Image
import scipy.ndimage

from sact_jax import ponder_export
from sact_jax import saliency
from sact_jax import visualize

SOURCES = ('sact', 'center_bias', 'uniform')
SOURCE_NAMES = {'sact': 'SACT ponder maps', 'center_bias': 'centre bias',
                'uniform': 'uniform'}
# CAT2000's density blur: 1 degree of visual angle is ~38 px on its
# 1920-pixel-wide stimuli, i.e. 1/50 of the width.
CAT2000_SIGMA_FRACTION = 0.02
# Images per forward pass: bounds memory on large folders.
_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class SaliencyScores:
  """{source: {metric: mean}} and how many images the means are over.

  Fewer than asked where images were skipped (an empty object mask).
  """
  scores: dict[str, dict[str, float]]
  num_images: int


def sample_fixations(mask_HxW, num_fixations: int,
                     rng: np.random.Generator) -> np.ndarray:
  """`num_fixations` distinct pixels drawn uniformly inside the mask.

  Returns a bool `[H, W]` map; an object smaller than `num_fixations` pixels
  is fixated everywhere.
  """
  if num_fixations < 1:
    raise ValueError(f'num_fixations must be >= 1, got {num_fixations}.')
  inside = np.flatnonzero(np.asarray(mask_HxW) > 0)
  if inside.size == 0:
    raise ValueError('The mask is empty: nothing to fixate.')
  chosen = rng.choice(inside, size=min(num_fixations, inside.size),
                      replace=False)
  fixations = np.zeros(np.size(mask_HxW), bool)
  fixations[chosen] = True
  return fixations.reshape(np.shape(mask_HxW))


def _ponder_saliency(result: ponder_export.PonderResult) -> np.ndarray:
  """A ponder result's total map as a distribution at its image's size.

  `total_map` is already at image size, so the blur defaults to half a cell
  of the coarsest block (what `ponder_to_saliency` does for a map at block
  resolution) rather than half a pixel.
  """
  shape = result.total_map.shape
  coarsest = min(result.block_maps, key=lambda m: m.shape[0] * m.shape[1])
  sigma = (0.5 * shape[0] / coarsest.shape[0],
           0.5 * shape[1] / coarsest.shape[1])
  return saliency.ponder_to_saliency(result.total_map, shape,
                                     blur_sigma=sigma)


def _score(ponder_maps: Sequence[np.ndarray],
           fixation_maps: Sequence[np.ndarray],
           densities: Sequence[np.ndarray],
           rng: np.random.Generator) -> SaliencyScores:
  """Every source's means; every source sees the same random draws."""
  seed = int(rng.integers(2**31))
  maps = {
      'sact': ponder_maps,
      'center_bias': [saliency.center_bias(np.shape(m)) for m in ponder_maps],
      'uniform': [saliency.uniform(np.shape(m)) for m in ponder_maps],
  }
  scores = {source: saliency.evaluate_maps(
      maps[source], fixation_maps, densities,
      rng=np.random.default_rng(seed)) for source in SOURCES}
  return SaliencyScores(scores, len(ponder_maps))


def _chunks(items: Iterable, size: int) -> Iterable[list]:
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def evaluate_saliency_on_dataset(model: nnx.Module, config, *,
                                 num_images: int, rng: np.random.Generator,
                                 num_fixations: int = 10
                                 ) -> SaliencyScores:
  """Saliency metrics on the first eval images of a dataset with masks.

  Args:
    model: a SACT ResNet (eval mode; not changed).
    config: ConfigDict with `dataset` (one with a `mask` feature),
      `data_dir` and optionally `eval_split`, `image_size`,
      `eval_batch_size`.
    num_images: eval images to use; those with an empty mask are skipped.
    rng: draws the fixations and the metrics' random negatives.
    num_fixations: points sampled inside each object (see module docstring).

  Returns:
    The means of metrics `saliency.METRICS` for sources `SOURCES`.
  """
  if num_images < 2:
    raise ValueError(f'num_images must be >= 2, got {num_images}.')
  dataset = visualize.eval_images(
      config, num_images,
      batch_size=min(num_images, config.get('eval_batch_size', None) or 100))
  ponder_maps, fixation_maps, densities = [], [], []
  for batch in dataset:
    if 'mask' not in batch:
      raise ValueError(f'Dataset {config.dataset} has no object masks.')
    masks = np.asarray(batch['mask'], np.float64)
    keep = [i for i in range(len(masks)) if masks[i].any()]
    images = np.asarray(batch['image'])
    results = ponder_export.ponder_results(
        model, [images[i] for i in keep], [str(i) for i in keep])
    for i, result in zip(keep, results):
      ponder_maps.append(_ponder_saliency(result))
      fixation_maps.append(sample_fixations(masks[i], num_fixations, rng))
      densities.append(masks[i] / masks[i].sum())
  if len(ponder_maps) < 2:
    raise ValueError(f'Only {len(ponder_maps)} of the first {num_images} '
                     'images have a non-empty mask; need at least 2.')
  return _score(ponder_maps, fixation_maps, densities, rng)


def cat2000_density(fixation_map_HxW,
                    sigma_fraction: float = CAT2000_SIGMA_FRACTION
                    ) -> np.ndarray:
  """Fixations blurred with std `sigma_fraction` of the width, sum 1."""
  fixations = np.asarray(fixation_map_HxW, np.float64) > 0
  sigma = sigma_fraction * fixations.shape[1]
  density = scipy.ndimage.gaussian_filter(fixations.astype(np.float64),
                                          sigma, mode='constant')
  return density / density.sum()


def evaluate_saliency_on_cat2000(model: nnx.Module, family: str, root: str,
                                 *, image_size: int,
                                 rng: np.random.Generator
                                 ) -> SaliencyScores:
  """Saliency metrics on a CAT2000-layout folder (`saliency.load_cat2000`).

  Args:
    model: a SACT ResNet (eval mode; not changed).
    family: 'cifar' or 'imagenet': whose normalisation the images get.
    root: the folder (with `Stimuli/` and fixations).
    image_size: short side the images are resized to for the model; maps are
      scored at the fixation maps' full resolution.
    rng: draws the metrics' random negatives.

  Returns:
    The means over the stimuli, as `evaluate_saliency_on_dataset`.
  """
  ponder_maps, fixation_maps, densities = [], [], []
  for chunk in _chunks(saliency.load_cat2000(root), _CHUNK):
    images = []
    for _, pixels, fixations in chunk:
      height, width = ponder_export.resized_shape(*pixels.shape[:2],
                                                  image_size)
      images.append(np.asarray(Image.fromarray(pixels).resize(
          (width, height), Image.Resampling.BILINEAR)))
    results = ponder_export.ponder_results(
        model, images, [name for name, _, _ in chunk], preprocess=family)
    for result, (_, _, fixations) in zip(results, chunk):
      ponder_maps.append(_ponder_saliency(result))
      fixation_maps.append(fixations)
      densities.append(cat2000_density(fixations).astype(np.float32))
  if len(ponder_maps) < 2:
    raise ValueError(f'{root} has {len(ponder_maps)} stimuli; need at '
                     'least 2.')
  return _score(ponder_maps, fixation_maps, densities, rng)


def markdown_table(scores: SaliencyScores, model_type: str = 'sact') -> str:
  """Rows: the sources; columns: the metrics.

  The ponder maps' row names the model type that drew them (the 'sact'
  source may hold an ACT model's maps, uniform per image).
  """
  names = dict(SOURCE_NAMES, sact=f'{model_type.upper()} ponder maps')
  lines = ['| maps | ' + ' | '.join(saliency.METRICS) + ' |',
           '| --- |' + ' ---: |' * len(saliency.METRICS)]
  for source in SOURCES:
    lines.append(f'| {names[source]} | ' + ' | '.join(
        f'{scores.scores[source][m]:.3f}' for m in saliency.METRICS) + ' |')
  return '\n'.join(lines)
