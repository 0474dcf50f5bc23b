"""Ponder maps as saliency: fixation-prediction metrics and post-processing.

The metrics follow the definitions of the MIT/Tuebingen saliency benchmark
(Bylinskii et al., "What do different evaluation metrics tell us about
saliency models?", and the benchmark's reference MATLAB code):

* Location-based, against a binary fixation map: `auc_judd`, `auc_borji`,
  `auc_shuffled`, `nss`.
* Distribution-based, against a continuous fixation density: `cc`, `kl_div`,
  `similarity`.

Every metric first resizes the saliency map to the fixation map's size. The
benchmark uses MATLAB's bicubic `imresize`; we resize bilinearly (with
anti-aliasing when shrinking), which cannot overshoot, so a non-negative map
stays non-negative and KL and SIM stay defined.

The post-processing turns a total ponder map into a saliency distribution as
the SACT paper does (upsample, blur, softmax with temperature 1/5), with an
optional centre-bias mixture.
"""

from collections.abc import Iterator, Sequence
import os

import numpy as np
from PIL import Image
import scipy.io
import scipy.ndimage
import skimage.transform

# MATLAB's `eps`, the benchmark's regulariser in KL.
_EPS = np.finfo(np.float64).eps
# Threshold step of the benchmark's AUC-Borji and shuffled AUC, applied to
# the map normalised to [0, 1].
_AUC_STEP = 0.1


def _as_2d(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f'{name} must be a 2-D [H, W] array, got shape '
                     f'{array.shape}.')
  if array.size == 0:
    raise ValueError(f'{name} is empty.')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name} has non-finite values.')
  return array


def _fixations(fixation_map, name: str = 'fixation_map') -> np.ndarray:
  """A binary fixation map (bool, 0/1 or counts) as bool.

  Fractional values are refused: a blurred fixation density is > 0 almost
  everywhere and would score as fixated everywhere.
  """
  array = _as_2d(fixation_map, name)
  if (np.issubdtype(array.dtype, np.floating)
      and (array != np.round(array)).any()):
    raise ValueError(
        f'{name} has fractional values (in [{array.min():.3g}, '
        f'{array.max():.3g}]): a fixation density? The location metrics take '
        'a binary map; pass densities to cc, kl_div and similarity.')
  fixations = array > 0
  if not fixations.any():
    raise ValueError(f'{name} has no fixations.')
  return fixations


def _check_rng(rng) -> None:
  """A seed would fail later as `'int' object has no attribute 'integers'`."""
  if not isinstance(rng, np.random.Generator):
    raise TypeError('rng must be a numpy Generator (e.g. '
                    f'np.random.default_rng(0)), got {type(rng).__name__}.')


def _density(fixation_density) -> np.ndarray:
  density = _as_2d(fixation_density, 'fixation_density').astype(np.float64)
  if (density < 0).any():
    raise ValueError('fixation_density has negative values.')
  if not density.any():
    raise ValueError('fixation_density is all zeros.')
  return density


def _resized(saliency_map, shape: tuple[int, int]) -> np.ndarray:
  """The saliency map as float64, resized to `shape` if it differs."""
  saliency = _as_2d(saliency_map, 'saliency_map').astype(np.float64)
  if saliency.shape != tuple(shape):
    saliency = skimage.transform.resize(
        saliency, shape, order=1, mode='edge', preserve_range=True,
        anti_aliasing=saliency.shape[0] > shape[0]
        or saliency.shape[1] > shape[1])
  return saliency


def _unit_range(values: np.ndarray) -> np.ndarray:
  """Min-max normalisation to [0, 1]; a constant map becomes all zeros."""
  spread = values.max() - values.min()
  if spread == 0:
    return np.zeros_like(values)
  return (values - values.min()) / spread


def _standardised(values: np.ndarray) -> np.ndarray | None:
  """Zero mean, unit sample std (MATLAB `std`); None for a constant map."""
  std = values.std(ddof=1) if values.size > 1 else 0.0
  if std == 0:
    return None
  return (values - values.mean()) / std


def _sum_to_one(values: np.ndarray) -> np.ndarray:
  total = values.sum()
  return values / total if total else values


def _trapezoid(tp: np.ndarray, fp: np.ndarray) -> float:
  """Area under the ROC curve (tp against fp), trapezoidal rule."""
  return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2))


def auc_judd(saliency_map, fixation_map) -> float:
  """AUC-Judd: every fixated pixel's saliency value is a threshold.

  At the threshold of the i-th fixated pixel (highest value first) the
  true-positive rate is i / F (F fixated pixels) and the false-positive
  rate the fraction of the other pixels above it; the curve from (0, 0)
  through these F points to (1, 1) is integrated with the trapezoidal rule.
  The benchmark breaks ties between pixels with tiny random jitter. We
  return that score's expectation over the jitter, exactly: the area is
  linear in the false-positive rates, and where f fixated and n other
  pixels share a value, the j-th fixated one of a random order has on
  average j * n / (f + 1) of those others above it. Without ties this is
  the benchmark's score; a constant map scores (F + 2) / (2F + 2) (0.545
  for 10 fixations), as the benchmark does on average, not 0.5.
  """
  fixations = _fixations(fixation_map)
  saliency = _resized(saliency_map, fixations.shape).ravel()
  fixations = fixations.ravel()
  num_fixations = fixations.sum()
  num_others = fixations.size - num_fixations
  if num_others == 0:
    raise ValueError('fixation_map is fixated everywhere: no negatives.')
  fixated = np.sort(saliency[fixations])[::-1]  # Highest first.
  others = np.sort(saliency[~fixations])
  # Per fixated pixel: the others above its value and tied with it, its
  # tie group's first index and size in `fixated`.
  above = num_others - np.searchsorted(others, fixated, 'right')
  tied = np.searchsorted(others, fixated, 'right') - np.searchsorted(
      others, fixated, 'left')
  first = np.searchsorted(-fixated, -fixated, 'left')
  group = np.searchsorted(-fixated, -fixated, 'right') - first
  rank = np.arange(num_fixations) - first + 1  # j, 1-based in its group.
  tp = np.arange(1, num_fixations + 1) / num_fixations
  fp = (above + rank * tied / (group + 1)) / num_others
  tp = np.concatenate([[0.0], tp, [1.0]])
  fp = np.concatenate([[0.0], fp, [1.0]])
  return _trapezoid(tp, fp)


def _auc_against_negatives(positives: np.ndarray,
                           negatives: np.ndarray) -> float:
  """The benchmark's fixed-step ROC of positive vs negative saliency values.

  Values are in [0, 1]; thresholds run from max(all values) down to 0 in
  steps of 0.1.
  """
  top = max(positives.max(), negatives.max())
  num_steps = int(np.floor(top / _AUC_STEP + 1e-9))
  thresholds = (_AUC_STEP * np.arange(num_steps + 1))[::-1]
  tp = (positives[None, :] >= thresholds[:, None]).mean(axis=1)
  fp = (negatives[None, :] >= thresholds[:, None]).mean(axis=1)
  tp = np.concatenate([[0.0], tp, [1.0]])
  fp = np.concatenate([[0.0], fp, [1.0]])
  return _trapezoid(tp, fp)


def auc_borji(saliency_map, fixation_map, *, num_splits: int = 100,
              rng: np.random.Generator) -> float:
  """AUC-Borji: negatives are uniformly random pixels.

  As in the benchmark's code, each of `num_splits` splits draws as many
  pixels as there are fixations, uniformly with replacement from the whole
  image (so a fixated pixel can be drawn as a negative), and the ROC uses
  thresholds every 0.1 on the map normalised to [0, 1]. The score is the mean
  AUC over splits.
  """
  _check_rng(rng)
  fixations = _fixations(fixation_map)
  if num_splits < 1:
    raise ValueError(f'num_splits must be >= 1, got {num_splits}.')
  saliency = _unit_range(_resized(saliency_map, fixations.shape)).ravel()
  positives = saliency[fixations.ravel()]
  draws = rng.integers(0, saliency.size, size=(num_splits, positives.size))
  return float(np.mean([_auc_against_negatives(positives, saliency[d])
                        for d in draws]))


def auc_shuffled(saliency_map, fixation_map, other_fixation_map, *,
                 num_splits: int = 100, rng: np.random.Generator) -> float:
  """Shuffled AUC: negatives are fixations of other images.

  `other_fixation_map` is the union of other images' fixation maps, at this
  fixation map's size. Each split draws min(#fixations, #other fixations)
  distinct locations from it, which penalises a plain centre bias. Same
  thresholds as `auc_borji`.
  """
  _check_rng(rng)
  fixations = _fixations(fixation_map)
  others = _fixations(other_fixation_map, 'other_fixation_map')
  if others.shape != fixations.shape:
    raise ValueError(f'other_fixation_map has shape {others.shape}, '
                     f'fixation_map {fixations.shape}.')
  if num_splits < 1:
    raise ValueError(f'num_splits must be >= 1, got {num_splits}.')
  saliency = _unit_range(_resized(saliency_map, fixations.shape)).ravel()
  positives = saliency[fixations.ravel()]
  other_indices = np.flatnonzero(others.ravel())
  num_negatives = min(positives.size, other_indices.size)
  aucs = []
  for _ in range(num_splits):
    chosen = rng.choice(other_indices, size=num_negatives, replace=False)
    aucs.append(_auc_against_negatives(positives, saliency[chosen]))
  return float(np.mean(aucs))


def nss(saliency_map, fixation_map) -> float:
  """Normalised scanpath saliency: mean standardised saliency at fixations.

  Standardised with MATLAB's sample std (N - 1), as the benchmark. A constant
  map has no std; it scores 0, the chance level, rather than NaN.
  """
  fixations = _fixations(fixation_map)
  standardised = _standardised(_resized(saliency_map, fixations.shape))
  if standardised is None:
    return 0.0
  return float(standardised[fixations].mean())


def cc(saliency_map, fixation_density) -> float:
  """Pearson's linear correlation coefficient with the fixation density.

  A constant map (or density) is uncorrelated with anything: it scores 0
  rather than NaN.
  """
  density = _density(fixation_density)
  a = _standardised(_resized(saliency_map, density.shape))
  b = _standardised(density)
  if a is None or b is None:
    return 0.0
  return float((a * b).sum() / (a.size - 1))


def kl_div(saliency_map, fixation_density) -> float:
  """KL(density || saliency), both normalised to sum 1, with MATLAB's eps.

  sum(Q * log(eps + Q / (P + eps))) as in the benchmark, with Q the density
  and P the saliency map; lower is better. The map must be non-negative.
  """
  density = _sum_to_one(_density(fixation_density))
  saliency = _resized(saliency_map, density.shape)
  if (saliency < 0).any():
    raise ValueError('saliency_map has negative values; KL needs a '
                     'distribution.')
  saliency = _sum_to_one(saliency)
  return float(np.sum(density * np.log(_EPS + density / (saliency + _EPS))))


def similarity(saliency_map, fixation_density) -> float:
  """SIM: sum of pixel-wise minima of the two distributions.

  Each map is min-max normalised to [0, 1] and then to sum 1 (the
  benchmark's normalisation; a constant map becomes uniform), so SIM is in
  [0, 1], and 1 where the normalised distributions are identical: maps
  equal up to a positive scale and offset score 1.
  """
  density = _density(fixation_density)
  saliency = _resized(saliency_map, density.shape)

  def distribution(values):
    values = _unit_range(values)
    if not values.any():
      return np.full(values.shape, 1.0 / values.size)
    return values / values.sum()

  return float(np.minimum(distribution(saliency),
                          distribution(density)).sum())


# Post-processing and baselines.


def uniform(shape: tuple[int, int]) -> np.ndarray:
  """The uniform distribution over `shape`: the no-information baseline."""
  height, width = shape
  return np.full((height, width), 1.0 / (height * width))


def center_bias(shape: tuple[int, int],
                sigma_fraction: float = 0.25) -> np.ndarray:
  """A centred Gaussian summing to 1, the classic fixation baseline.

  Its std along each axis is `sigma_fraction` times that axis' length, so
  the blob has the image's aspect ratio.
  """
  if sigma_fraction <= 0:
    raise ValueError(f'sigma_fraction must be > 0, got {sigma_fraction}.')
  height, width = shape
  y = (np.arange(height) - (height - 1) / 2) / (sigma_fraction * height)
  x = (np.arange(width) - (width - 1) / 2) / (sigma_fraction * width)
  gaussian = np.exp(-0.5 * (y[:, None]**2 + x[None, :]**2))
  return gaussian / gaussian.sum()


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
  """Softmax over all pixels of `logits / temperature`."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  scaled = np.asarray(logits, np.float64) / temperature
  scaled = np.exp(scaled - scaled.max())
  return scaled / scaled.sum()


def ponder_to_saliency(ponder_map_hxw, image_shape: Sequence[int], *,
                       blur_sigma: float | Sequence[float] | None = None,
                       center_bias_weight: float = 0.0,
                       center_bias_sigma_fraction: float = 0.25,
                       temperature: float = 0.2) -> np.ndarray:
  """A total ponder map `[h, w]` as a saliency distribution `[H, W]`.

  Steps: nearest-neighbour resize to the image (each ponder cell covers its
  receptive block), Gaussian blur with std `blur_sigma` pixels (None: half a
  ponder cell per axis, enough to hide the blocks; 0: no blur), softmax with
  `temperature` (the paper's 1/5, which sharpens the few-unit differences of
  a ponder map), then an optional mixture
  `(1 - w) * softmax + w * center_bias`. Mixing distributions after the
  softmax keeps the weight a probability and independent of the ponder
  scale. The result is non-negative and sums to 1.
  """
  ponder = _as_2d(ponder_map_hxw, 'ponder_map_hxw').astype(np.float64)
  if np.ndim(image_shape) != 1:
    raise ValueError('image_shape must be a shape such as (H, W) or (H, W, '
                     f'3), got an array of shape {np.shape(image_shape)} '
                     '(pass image.shape, not the image).')
  shape = tuple(int(s) for s in image_shape[:2])
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f'image_shape must start with [H, W], got {image_shape}.')
  if not 0.0 <= center_bias_weight <= 1.0:
    raise ValueError('center_bias_weight must be in [0, 1], got '
                     f'{center_bias_weight}.')
  resized = skimage.transform.resize(ponder, shape, order=0, mode='edge',
                                     preserve_range=True, anti_aliasing=False)
  if blur_sigma is None:
    blur_sigma = (0.5 * shape[0] / ponder.shape[0],
                  0.5 * shape[1] / ponder.shape[1])
  if np.any(np.asarray(blur_sigma) > 0):
    resized = scipy.ndimage.gaussian_filter(resized, blur_sigma, mode='nearest')
  saliency = softmax(resized, temperature)
  if center_bias_weight:
    saliency = ((1.0 - center_bias_weight) * saliency + center_bias_weight
                * center_bias(shape, center_bias_sigma_fraction))
  return saliency


# Evaluation over a data set.

METRICS = ('auc_judd', 'auc_borji', 'auc_shuffled', 'nss', 'cc', 'kl_div',
           'similarity')


def _other_fixations(fixation_maps: Sequence[np.ndarray], index: int,
                     num_other: int, rng: np.random.Generator) -> np.ndarray:
  """Union of `num_other` random other images' fixations, at this size."""
  shape = np.shape(fixation_maps[index])
  candidates = [j for j in range(len(fixation_maps)) if j != index]
  chosen = rng.choice(candidates, size=min(num_other, len(candidates)),
                      replace=False)
  union = np.zeros(shape, bool)
  for j in chosen:
    other = np.asarray(fixation_maps[j]) > 0
    if other.shape != shape:
      other = skimage.transform.resize(
          other.astype(np.float64), shape, order=0, preserve_range=True,
          anti_aliasing=False) > 0.5
    union |= other
  return union


def evaluate_maps(saliency_maps: Sequence[np.ndarray],
                  fixation_maps: Sequence[np.ndarray],
                  densities: Sequence[np.ndarray], *,
                  rng: np.random.Generator,
                  num_other: int = 10) -> dict[str, float]:
  """Mean of every metric over images; keys are `METRICS`.

  Shuffled AUC's negatives are the union of `num_other` random other images'
  fixations (Borji et al. use 10), resized to each image by nearest neighbour.
  """
  _check_rng(rng)
  count = len(saliency_maps)
  if not count == len(fixation_maps) == len(densities):
    raise ValueError(f'Got {count} saliency maps, {len(fixation_maps)} '
                     f'fixation maps and {len(densities)} densities.')
  if count < 2:
    raise ValueError('evaluate_maps needs at least 2 images (shuffled AUC '
                     'takes negatives from other images).')
  scores = {name: [] for name in METRICS}
  for i, (saliency, fixations, density) in enumerate(
      zip(saliency_maps, fixation_maps, densities)):
    others = _other_fixations(fixation_maps, i, num_other, rng)
    scores['auc_judd'].append(auc_judd(saliency, fixations))
    scores['auc_borji'].append(auc_borji(saliency, fixations, rng=rng))
    scores['auc_shuffled'].append(
        auc_shuffled(saliency, fixations, others, rng=rng))
    scores['nss'].append(nss(saliency, fixations))
    scores['cc'].append(cc(saliency, density))
    scores['kl_div'].append(kl_div(saliency, density))
    scores['similarity'].append(similarity(saliency, density))
  return {name: float(np.mean(values)) for name, values in scores.items()}


# CAT2000 layout.


def _fixations_from_mat(path: str) -> np.ndarray:
  """Fixation locations from a `.mat`; nonzero = fixated.

  Reads `fixLocs` (CAT2000's variable name), else the file's only 2-D array.
  """
  contents = {k: v for k, v in scipy.io.loadmat(path).items()
              if not k.startswith('__')}
  if 'fixLocs' in contents:
    array = contents['fixLocs']
  else:
    arrays = [v for v in contents.values()
              if isinstance(v, np.ndarray) and v.ndim == 2]
    if len(arrays) != 1:
      raise ValueError(f'{path}: expected a `fixLocs` variable or exactly one '
                       f'2-D array, found {sorted(contents)}.')
    array = arrays[0]
  return np.asarray(array) != 0


def load_cat2000(root: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (name, image uint8 [H, W, 3], fixation map bool [H, W]).

  Layout: `root/Stimuli/<category>/<stem>.jpg`, with fixations from
  `root/Stimuli/<category>/<stem>.mat` where present, else from the image
  `root/FIXATIONMAPS/<category>/<stem>.jpg` (nonzero = fixated; JPEG
  artefacts count as fixations, so prefer the `.mat`). Names are
  `<category>/<stem>`, in sorted order.
  """
  stimuli_root = os.path.join(root, 'Stimuli')
  maps_root = os.path.join(root, 'FIXATIONMAPS')
  if not os.path.isdir(stimuli_root):
    raise FileNotFoundError(f'No Stimuli folder in {root}.')
  for category in sorted(os.listdir(stimuli_root)):
    category_dir = os.path.join(stimuli_root, category)
    if not os.path.isdir(category_dir):
      continue
    for filename in sorted(os.listdir(category_dir)):
      stem, ext = os.path.splitext(filename)
      if ext.lower() != '.jpg':
        continue
      name = f'{category}/{stem}'
      with Image.open(os.path.join(category_dir, filename)) as image:
        pixels = np.asarray(image.convert('RGB'), np.uint8)
      mat_path = os.path.join(category_dir, stem + '.mat')
      map_path = os.path.join(maps_root, category, stem + '.jpg')
      if os.path.exists(mat_path):
        fixations = _fixations_from_mat(mat_path)
      elif os.path.exists(map_path):
        with Image.open(map_path) as fixation_image:
          fixations = np.asarray(fixation_image.convert('L')) > 0
      else:
        raise FileNotFoundError(f'Stimulus {name} has no fixation map '
                                f'({map_path} or {mat_path}).')
      if fixations.shape != pixels.shape[:2]:
        raise ValueError(f'Stimulus {name} is {pixels.shape[:2]} but its '
                         f'fixation map is {fixations.shape}.')
      yield name, pixels, fixations
