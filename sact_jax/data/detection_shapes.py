"""`sact_detection`: a generated, offline object-detection dataset.

Each 96x96 RGB image holds 1 to 4 objects of the 6 `sact_shapes` classes
(disc, square, triangle, cross, ring, diamond), 10 to 32 pixels across, in
random colours, on the cluttered background of `sact_shapes` (at the same
clutter density). Objects overlap little (centres at least 0.8 times the sum
of their radii apart); later ones are drawn over earlier ones. Each example
stores the tight box and class of every object and the mask of all objects,
so detectors can be trained and scored, and ponder maps compared with where
the objects are, without any download.

Generated with numpy (no TensorFlow) and registered as the tfds builder
`sact_detection`::

  import sact_jax.data  # Registers the builder.
  builder = tfds.builder('sact_detection', data_dir=d,
                         file_format='array_record')
  builder.download_and_prepare()
  source = tfds.data_source('sact_detection', split='train', data_dir=d)

The 'tiny' config ('sact_detection/tiny': 64 + 32 images of 64x64) is for
tests.
"""

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from sact_jax.data import shapes

IMAGE_SIZE = 96
MAX_OBJECTS = 4
CLASS_NAMES = shapes.CLASS_NAMES
NUM_CLASSES = shapes.NUM_CLASSES

# Object radii (pixels) at the default size: objects are 10 to 32 pixels
# across (2 * 0.85 * 6 for the smallest square, 2 * 1.15 * 14 for the
# largest diamond).
_MIN_RADIUS, _MAX_RADIUS = 6.0, 14.0
# Objects' centres are at least this many times the sum of their radii
# apart, so that none hides much of another.
_MIN_SEPARATION = 0.8
# Centres tried per object; an object that fits nowhere is left out (all
# but certain not to happen at the configs' sizes).
_PLACEMENT_ATTEMPTS = 32
# Images are generated in chunks of this size, each from its own generator, to
# bound memory; the output depends on it, so it is fixed.
_CHUNK_SIZE = 256
# Fixed seeds of the stored splits (not those of `sact_shapes`).
SPLIT_SEEDS = {'train': 11, 'test': 12}


def generate_examples(
    num_examples: int,
    seed: int,
    *,
    image_size: int = IMAGE_SIZE,
    min_radius: float = _MIN_RADIUS,
    max_radius: float = _MAX_RADIUS,
    max_objects: int = MAX_OBJECTS,
) -> dict[str, np.ndarray]:
  """Generates `num_examples` images, deterministically from `seed`.

  Args:
    num_examples: number of examples N.
    seed: seed of the numpy generator; the same seed gives the same data.
    image_size: side S of the square images.
    min_radius: smallest object radius, pixels.
    max_radius: largest object radius, pixels (objects are at most 2.3 times
      this across).
    max_objects: most objects per image M; each image has 1 to M, uniformly.

  Returns:
    A dict with `image` uint8 [N, S, S, 3]; `boxes` float32 [N, M, 4], the
    (ymin, xmin, ymax, xmax) of the visible pixels of each object, on pixel
    edges, divided by S, zero rows after the objects; `labels` int64 [N, M],
    index into `CLASS_NAMES`, -1 on the zero rows; `mask` uint8 [N, S, S], 1
    on any object.
  """
  if not 0 < min_radius <= max_radius < (image_size / 2 - 1) / shapes.EXTENT:
    raise ValueError(
        f'Need 0 < min_radius <= max_radius < (image_size / 2 - 1) / '
        f'{shapes.EXTENT}, got {min_radius}, {max_radius} and {image_size}.')
  generate = functools.partial(
      _generate_chunk, image_size=image_size, min_radius=min_radius,
      max_radius=max_radius, max_objects=max_objects)
  chunks = []
  for chunk, start in enumerate(range(0, num_examples, _CHUNK_SIZE)):
    rng = np.random.default_rng([seed, chunk])
    chunks.append(generate(min(_CHUNK_SIZE, num_examples - start), rng))
  if not chunks:
    chunks.append(generate(0, np.random.default_rng(seed)))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _generate_chunk(n: int, rng: np.random.Generator, *, image_size: int,
                    min_radius: float, max_radius: float,
                    max_objects: int) -> dict[str, np.ndarray]:
  """Generates one chunk of examples (see `generate_examples`)."""
  m, s = max_objects, image_size
  count_N = rng.integers(1, m + 1, n)
  label_NxM = rng.integers(0, NUM_CLASSES, (n, m))
  radius_NxM = rng.uniform(min_radius, max_radius, (n, m))
  centre_NxMx2, placed_NxM = _place_objects(radius_NxM, count_N, rng, s)
  masks_NxMxSxS = shapes.object_masks(
      label_NxM.ravel(), centre_NxMx2.reshape(-1, 2), radius_NxM.ravel(), rng,
      s).reshape(n, m, s, s)
  masks_NxMxSxS &= placed_NxM[:, :, None, None]

  image_NxSxSx3 = shapes.background(n, rng, s)
  # In slot order, each over the earlier ones, in a colour that stands out
  # from what it covers.
  for j in range(m):
    colour_Nx3 = shapes.object_colours(image_NxSxSx3, masks_NxMxSxS[:, j], rng)
    image_NxSxSx3 = np.where(masks_NxMxSxS[:, j, ..., None],
                             colour_Nx3[:, None, None], image_NxSxSx3)

  # Boxes of the pixels that no later object covers; an object hidden
  # entirely gets none and is dropped.
  visible_NxMxSxS = masks_NxMxSxS.copy()
  for j in range(m - 2, -1, -1):
    visible_NxMxSxS[:, j] &= ~masks_NxMxSxS[:, j + 1:].any(axis=1)
  boxes_NMx4, present_NM = tight_boxes(visible_NxMxSxS.reshape(-1, s, s))
  boxes_NxMx4 = boxes_NMx4.reshape(n, m, 4)
  present_NxM = present_NM.reshape(n, m)
  # Objects first, in drawing order, then the padding.
  order_NxM = np.argsort(~present_NxM, axis=1, kind='stable')
  present_NxM = np.take_along_axis(present_NxM, order_NxM, axis=1)
  boxes_NxMx4 = np.take_along_axis(boxes_NxMx4, order_NxM[..., None], axis=1)
  label_NxM = np.take_along_axis(label_NxM, order_NxM, axis=1)
  return {
      'image': shapes.finish_images(image_NxSxSx3, rng),
      'boxes': boxes_NxMx4,
      'labels': np.where(present_NxM, label_NxM, -1).astype(np.int64),
      'mask': masks_NxMxSxS.any(axis=1).astype(np.uint8),
  }


def _place_objects(radius_NxM: np.ndarray, count_N: np.ndarray,
                   rng: np.random.Generator, image_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Rejection-samples centres of the first `count_N` objects of each image.

  Each object lies inside the image, at least one pixel from the border,
  its centre at least `_MIN_SEPARATION` (r1 + r2) from those
  of the objects placed before it.

  Args:
    radius_NxM: object radii, pixels.
    count_N: objects wanted per image, in [1, M].
    rng: numpy generator.
    image_size: side of the images.

  Returns:
    (y, x) centres float [N, M, 2] and whether each object was placed, bool
    [N, M] (the first always is).
  """
  n, m = radius_NxM.shape
  centre_NxMx2 = np.zeros((n, m, 2))
  placed_NxM = np.zeros((n, m), bool)
  for j in range(m):
    r_Nx1x1 = radius_NxM[:, j, None, None]
    margin_Nx1x1 = shapes.EXTENT * r_Nx1x1 + 1
    candidate_NxKx2 = rng.uniform(margin_Nx1x1, image_size - margin_Nx1x1,
                                  (n, _PLACEMENT_ATTEMPTS, 2))
    distance_NxKxJ = np.linalg.norm(
        candidate_NxKx2[:, :, None] - centre_NxMx2[:, None, :j], axis=-1)
    far_NxKxJ = distance_NxKxJ >= _MIN_SEPARATION * (
        r_Nx1x1 + radius_NxM[:, None, :j])
    fits_NxK = (far_NxKxJ | ~placed_NxM[:, None, :j]).all(axis=-1)
    centre_NxMx2[:, j] = candidate_NxKx2[np.arange(n), fits_NxK.argmax(axis=1)]
    placed_NxM[:, j] = fits_NxK.any(axis=1) & (j < count_N)
  return centre_NxMx2, placed_NxM


def tight_boxes(mask_NxHxW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The smallest box around the pixels of each mask.

  Boxes are on pixel edges: a box from rows y0 to y1 and columns x0 to x1
  (inclusive) is (y0 / H, x0 / W, (y1 + 1) / H, (x1 + 1) / W).

  Args:
    mask_NxHxW: bool masks.

  Returns:
    Boxes (ymin, xmin, ymax, xmax) float32 [N, 4], zero for empty masks, and
    whether each mask has any pixel, bool [N].
  """
  height, width = mask_NxHxW.shape[1:]
  rows_NxH, cols_NxW = mask_NxHxW.any(axis=2), mask_NxHxW.any(axis=1)
  present_N = rows_NxH.any(axis=1)
  edges_Nx4 = np.stack([
      rows_NxH.argmax(axis=1), cols_NxW.argmax(axis=1),
      height - rows_NxH[:, ::-1].argmax(axis=1),
      width - cols_NxW[:, ::-1].argmax(axis=1)], axis=1)
  boxes_Nx4 = edges_Nx4.astype(np.float32) / np.array(
      [height, width, height, width], np.float32)
  return np.where(present_N[:, None], boxes_Nx4, 0), present_N


@dataclasses.dataclass(eq=False)
class SactDetectionConfig(tfds.core.BuilderConfig):
  """Image size, object sizes and split sizes of `sact_detection`.

  Attributes:
    image_size: side of the square images, pixels.
    min_radius: smallest object radius, pixels.
    max_radius: largest object radius, pixels.
    num_train: number of training examples.
    num_test: number of test examples.
  """

  image_size: int = IMAGE_SIZE
  min_radius: float = _MIN_RADIUS
  max_radius: float = _MAX_RADIUS
  num_train: int = 5_000
  num_test: int = 500


class SactDetection(tfds.core.GeneratorBasedBuilder):
  """1-4 objects of 6 classes in clutter, with boxes and masks (generated)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SactDetectionConfig(
          name='default',
          description='5,000 train and 500 test images of 96x96.'),
      # For tests and smoke runs: prepares in about a second.
      SactDetectionConfig(
          name='tiny', image_size=64, min_radius=5.0, max_radius=9.0,
          num_train=64, num_test=32,
          description='64 train and 32 test images of 64x64.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    # Tensor features stored as raw bytes, as in `sact_shapes`: preparing
    # then needs no TensorFlow.
    size = self.builder_config.image_size

    def tensor(shape, dtype):
      return tfds.features.Tensor(shape=shape, dtype=dtype,
                                  encoding=tfds.features.Encoding.BYTES)

    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tensor((size, size, 3), np.uint8),
            # Index in the split as generated: tfds shuffles the stored order.
            'image/id': np.int64,
            'boxes': tensor((MAX_OBJECTS, 4), np.float32),
            'labels': tensor((MAX_OBJECTS,), np.int64),
            'mask': tensor((size, size), np.uint8),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        'train': self._generate_examples(
            self.builder_config.num_train, SPLIT_SEEDS['train']),
        'test': self._generate_examples(
            self.builder_config.num_test, SPLIT_SEEDS['test']),
    }

  def _generate_examples(self, num_examples, seed):
    config = self.builder_config
    data = generate_examples(
        num_examples, seed, image_size=config.image_size,
        min_radius=config.min_radius, max_radius=config.max_radius)
    for i in range(num_examples):
      yield i, {'image/id': i, **{k: v[i] for k, v in data.items()}}
