"""`sact_shapes`: a generated, offline dataset of small objects in clutter.

Each 32x32 RGB image holds one object (a disc, square, triangle, cross, ring or
diamond) covering at most about 15% of the image, at a random position and
scale, in a random colour, on a cluttered background: smooth colour noise,
stripes, soft blobs and thin lines. Only the object decides the label, and its
ground-truth mask is stored, so spatially adaptive computation has a known
region to concentrate on and ponder maps can be scored against it.

The data is generated with numpy (no download, no TensorFlow) and registered
as the tfds builder `sact_shapes` so that it is read like any other dataset::

  import sact_jax.data  # Registers the builder.
  builder = tfds.builder('sact_shapes', data_dir=d, file_format='array_record')
  builder.download_and_prepare()  # About 10 s for 22,000 images.
  source = tfds.data_source('sact_shapes', split='train', data_dir=d)

The 'tiny' config ('sact_shapes/tiny': 128 + 64 images) is for tests.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
CLASS_NAMES = ('disc', 'square', 'triangle', 'cross', 'ring', 'diamond')
NUM_CLASSES = len(CLASS_NAMES)

# Objects are drawn in a circle of this radius (pixels): a disc of the largest
# radius covers pi * 7^2 / 32^2 = 15% of the image.
_MIN_RADIUS, _MAX_RADIUS = 4.5, 7.0
# Images are generated in chunks of this size, each from its own generator, to
# bound memory; the output depends on it, so it is fixed.
_CHUNK_SIZE = 1024
# Fixed seeds of the stored splits (`generate_examples` takes any seed).
SPLIT_SEEDS = {'train': 1, 'test': 2}


def generate_examples(num_examples: int, seed: int) -> dict[str, np.ndarray]:
  """Generates `num_examples` images, deterministically from `seed`.

  Args:
    num_examples: number of examples.
    seed: seed of the numpy generator; the same seed gives the same data.

  Returns:
    A dict with `image` uint8 [N, 32, 32, 3], `label` int64 [N] (index into
    `CLASS_NAMES`) and `mask` uint8 [N, 32, 32] (1 on the object).
  """
  chunks = []
  for chunk, start in enumerate(range(0, num_examples, _CHUNK_SIZE)):
    rng = np.random.default_rng([seed, chunk])
    size = min(_CHUNK_SIZE, num_examples - start)
    chunks.append(_generate_chunk(size, rng))
  if not chunks:
    chunks.append(_generate_chunk(0, np.random.default_rng(seed)))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _generate_chunk(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Generates one chunk of examples (see `generate_examples`)."""
  # Balanced labels in a random order.
  label_N = rng.permutation(np.arange(n) % NUM_CLASSES)
  radius_N = rng.uniform(_MIN_RADIUS, _MAX_RADIUS, n)
  # The whole object lies inside the image, one pixel from the border.
  centre_Nx2 = rng.uniform(radius_N[:, None] + 1, IMAGE_SIZE - radius_N[:, None]
                           - 1, (n, 2))
  mask_NxHxW = object_masks(label_N, centre_Nx2, radius_N, rng)

  image_NxHxWx3 = background(n, rng)
  colour_Nx3 = object_colours(image_NxHxWx3, mask_NxHxW, rng)
  image_NxHxWx3 = np.where(mask_NxHxW[..., None], colour_Nx3[:, None, None],
                           image_NxHxWx3)
  return {
      'image': finish_images(image_NxHxWx3, rng),
      'label': label_N.astype(np.int64),
      'mask': mask_NxHxW.astype(np.uint8),
  }


def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns the y and x coordinates of pixel centres, [1, S, S] each."""
  coords = np.arange(image_size, dtype=np.float32) + 0.5
  y_SxS, x_SxS = np.meshgrid(coords, coords, indexing='ij')
  return y_SxS[None], x_SxS[None]


def object_masks(label_N: np.ndarray, centre_Nx2: np.ndarray,
                 radius_N: np.ndarray, rng: np.random.Generator,
                 image_size: int = IMAGE_SIZE) -> np.ndarray:
  """Rasterises each object on pixel centres, bool [N, S, S].

  Args:
    label_N: class of each object (index into `CLASS_NAMES`).
    centre_Nx2: (y, x) centres in pixels (the image spans [0, S]).
    radius_N: radii in pixels: the object lies within `EXTENT` times this
      of its centre.
    rng: numpy generator (orientation of the triangles).
    image_size: side S of the square images.
  """
  y, x = _pixel_grid(image_size)
  centre_Nx2 = centre_Nx2.astype(np.float32)
  dy_NxHxW = y - centre_Nx2[:, 0, None, None]
  dx_NxHxW = x - centre_Nx2[:, 1, None, None]
  r_Nx1x1 = radius_N.astype(np.float32)[:, None, None]
  # Triangles point up or down (a horizontal flip keeps either).
  dy_NxHxW[rng.random(label_N.shape[0]) < 0.5] *= -1
  mask_NxHxW = np.zeros(dy_NxHxW.shape, bool)
  for label, rasterise in enumerate(_RASTERISERS):
    index = label_N == label
    mask_NxHxW[index] = rasterise(dy_NxHxW[index], dx_NxHxW[index],
                                  r_Nx1x1[index])
  return mask_NxHxW


# Objects lie within this many radii of their centre (a diamond's corners;
# the other classes within one radius).
EXTENT = 1.15
# One function (dy, dx, radius) -> bool mask per class, in `CLASS_NAMES`
# order. Sizes are chosen so that all classes have similar areas (2-3 r^2),
# so that area does not give the class away.
_RASTERISERS = (
    lambda dy, dx, r: dx**2 + dy**2 <= r**2,  # disc
    lambda dy, dx, r: np.maximum(abs(dx), abs(dy)) <= 0.85 * r,  # square
    lambda dy, dx, r: (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),  # triangle
    lambda dy, dx, r: (  # cross
        (abs(dx) <= np.maximum(r / 3, 1)) & (abs(dy) <= r)
        | (abs(dy) <= np.maximum(r / 3, 1)) & (abs(dx) <= r)),
    lambda dy, dx, r: (  # ring
        (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r)**2)),
    lambda dy, dx, r: abs(dx) + abs(dy) <= 1.15 * r,  # diamond
)


def background(n: int, rng: np.random.Generator,
               image_size: int = IMAGE_SIZE) -> np.ndarray:
  """Cluttered backgrounds in [0, 1], float32 [N, S, S, 3].

  The clutter has the same density at any size S, so that a model trained
  on 32x32 images sees the same backgrounds in a window of a larger image:
  the colour noise field has about S / 8 + 1 nodes a side, and there are
  about 3 (S / 32)^2 blob and 2 S / 32 line candidates (5, 3 and 2 at 32).

  Args:
    n: number of images.
    rng: numpy generator.
    image_size: side S of the square images.
  """
  scale = image_size / IMAGE_SIZE
  field_size = round(4 * scale) + 1
  # Pixel-centre coordinates; separable terms are built from [N, H] and
  # [N, W] factors, which keeps generation fast.
  coord_1xH = (np.arange(image_size, dtype=np.float32) + 0.5)[None]

  def column(values_N):
    return values_N.astype(np.float32)[:, None]

  def colours():
    return rng.uniform(0, 1, (n, 1, 1, 3)).astype(np.float32)

  # Base colour plus smooth colour noise: a FxF random field, upsampled.
  base_Nx1x1x3 = rng.uniform(0.1, 0.9, (n, 1, 1, 3))
  field_NxFxFx3 = rng.normal(0.0, 1.0, (n, field_size, field_size, 3))
  field_NxFxFx3 *= rng.uniform(0.03, 0.15, (n, 1, 1, 1))
  upsample_HxF = _bilinear_matrix(field_size, image_size)
  smooth_NxHxWx3 = np.einsum('yi,nijc,xj->nyxc', upsample_HxF, field_NxFxFx3,
                             upsample_HxF, optimize=True)
  image = (base_Nx1x1x3 + smooth_NxHxWx3).astype(np.float32)

  # Stripes of random frequency, angle and colour in half of the images:
  # sin(u + v) = sin(u) cos(v) + cos(u) sin(v), with u along y, v along x.
  angle_N = rng.uniform(0, np.pi, n)
  omega_N = 2 * np.pi * rng.uniform(0.08, 0.3, n)
  u_NxH = column(omega_N * np.sin(angle_N)) * coord_1xH + column(
      rng.uniform(0, 2 * np.pi, n))
  v_NxW = column(omega_N * np.cos(angle_N)) * coord_1xH
  wave_NxHxW = (np.sin(u_NxH)[:, :, None] * np.cos(v_NxW)[:, None, :]
                + np.cos(u_NxH)[:, :, None] * np.sin(v_NxW)[:, None, :])
  amplitude_N = rng.uniform(0.05, 0.2, n) * (rng.random(n) < 0.5)
  stripe_colour = (amplitude_N[:, None] * rng.uniform(-1, 1, (n, 3))).astype(
      np.float32)[:, None, None]
  image += wave_NxHxW[..., None] * stripe_colour

  # Soft Gaussian blobs (each present with probability 0.6): round,
  # coloured, but not objects (no edges).
  for _ in range(round(3 * scale**2)):
    alpha_N = rng.uniform(0.5, 0.9, n) * (rng.random(n) < 0.6)
    centre_Nx2 = rng.uniform(0, image_size, (n, 2))
    inv_sigma_N = 1 / rng.uniform(1.2, 2.5, n)
    g_NxH = np.exp(-0.5 * ((coord_1xH - column(centre_Nx2[:, 0]))
                           * column(inv_sigma_N))**2)
    g_NxW = np.exp(-0.5 * ((coord_1xH - column(centre_Nx2[:, 1]))
                           * column(inv_sigma_N))**2)
    weight_NxHxW = column(alpha_N)[:, :, None] * g_NxH[:, :, None] * g_NxW[
        :, None, :]
    image += weight_NxHxW[..., None] * (colours() - image)

  # Thin (one pixel) lines right across the image, each present with
  # probability 0.5.
  for _ in range(round(2 * scale)):
    present_N = rng.random(n) < 0.5
    angle_N = rng.uniform(0, np.pi, n)
    point_Nx2 = rng.uniform(0, image_size, (n, 2))
    # Distance to the line: |(x - px) sin(a) - (y - py) cos(a)|.
    along_x_NxW = (coord_1xH - column(point_Nx2[:, 1])) * column(
        np.sin(angle_N))
    along_y_NxH = (coord_1xH - column(point_Nx2[:, 0])) * column(
        np.cos(angle_N))
    dist_NxHxW = np.abs(along_x_NxW[:, None, :] - along_y_NxH[:, :, None])
    on_line_NxHxW = (dist_NxHxW < 0.5) & present_N[:, None, None]
    image = np.where(on_line_NxHxW[..., None], colours(), image)
  return image


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Linear interpolation weights [size_out, size_in], corners aligned."""
  pos = np.linspace(0, size_in - 1, size_out)
  low = np.minimum(np.floor(pos).astype(int), size_in - 2)
  frac = pos - low
  weights = np.zeros((size_out, size_in))
  weights[np.arange(size_out), low] = 1 - frac
  weights[np.arange(size_out), low + 1] = frac
  return weights


def object_colours(image_NxHxWx3: np.ndarray, mask_NxHxW: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
  """Random object colours that stand out from the background behind them.

  Colours are uniform in the RGB cube, rejected while closer than 0.5 to the
  mean background colour under the object, so colour is independent of the
  class but the object stays visible.

  Args:
    image_NxHxWx3: backgrounds in [0, 1].
    mask_NxHxW: bool object masks.
    rng: numpy generator.

  Returns:
    Colours, float [N, 3].
  """
  n = mask_NxHxW.shape[0]
  area_N = np.maximum(mask_NxHxW.sum(axis=(1, 2)), 1)
  behind_Nx3 = (image_NxHxWx3 * mask_NxHxW[..., None]).sum(axis=(1, 2))
  behind_Nx3 /= area_N[:, None]
  candidates_NxKx3 = rng.uniform(0, 1, (n, 16, 3))
  distance_NxK = np.linalg.norm(candidates_NxKx3 - behind_Nx3[:, None], axis=-1)
  # The first far-enough candidate, or the farthest if none is.
  far_NxK = distance_NxK >= 0.5
  choice_N = np.where(far_NxK.any(axis=1), far_NxK.argmax(axis=1),
                      distance_NxK.argmax(axis=1))
  return candidates_NxKx3[np.arange(n), choice_N].astype(np.float32)


def finish_images(image_NxHxWx3: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
  """Adds sensor-like noise to images in [0, 1] and quantises them to uint8.

  The noise is also on the objects, so that no region is flat.

  Args:
    image_NxHxWx3: float32 images in [0, 1] (modified in place).
    rng: numpy generator.
  """
  image_NxHxWx3 += 0.03 * rng.standard_normal(image_NxHxWx3.shape,
                                              dtype=np.float32)
  image_NxHxWx3 = np.clip(np.round(image_NxHxWx3 * 255), 0, 255)
  return image_NxHxWx3.astype(np.uint8)


@dataclasses.dataclass(eq=False)
class SactShapesConfig(tfds.core.BuilderConfig):
  """Split sizes of `sact_shapes`.

  Attributes:
    num_train: number of training examples.
    num_test: number of test examples.
  """

  num_train: int = 20_000
  num_test: int = 2_000


class SactShapes(tfds.core.GeneratorBasedBuilder):
  """Small objects of 6 classes in clutter, with object masks (generated)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SactShapesConfig(
          name='default', description='20,000 train and 2,000 test images.'),
      # For tests and smoke runs: prepares in well under a second.
      SactShapesConfig(
          name='tiny', num_train=128, num_test=64,
          description='128 train and 64 test images.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    # Tensor features, not Image: preparing then needs no TensorFlow. Stored
    # as raw bytes: faster to write (8 s vs 19 s for 22k) than int64 lists.
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'mask': tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
        }),
        supervised_keys=('image', 'label'),
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
    data = generate_examples(num_examples, seed)
    for i in range(num_examples):
      yield i, {k: v[i] for k, v in data.items()}
