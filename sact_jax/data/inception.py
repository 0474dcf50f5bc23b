"""The reference's ImageNet preprocessing: TF-slim's Inception one, in numpy.

The SACT code trained its ImageNet models on slim's `preprocess_for_train`
(with `fast_mode=False`) and evaluated them on `preprocess_for_eval`:

* train (`train_image`): a random crop drawn as
  `tf.image.sample_distorted_bounding_box` draws it (`crop_window`: the
  whole image stands for the object box, which the crop must cover to 10%;
  aspect ratio 0.75-1.33, 5-100% of the area, 100 attempts, else the whole
  image); resized to the model's input by one of four methods picked at
  random (TF's bilinear, nearest, bicubic and area: PIL's filters of those
  names here, which also smooth when they shrink); a random horizontal
  flip; colour distortion (`distort_color`) in one of four orders picked at
  random; clipped to [0, 1].
* eval (`eval_image`): the central 87.5% (`tf.image.central_crop`) resized
  with TF 1's `resize_bilinear` (output pixel i samples input pixel
  i * in / out, linearly, no smoothing), in floats.

Images come in as uint8 `[H, W, 3]` and go out as float32 in [0, 255],
which the pipeline maps to [-1, 1] (slim: [0, 1], then -0.5 and x2).
"""

import math

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color

# Fraction of the image kept by the evaluation crop.
EVAL_CROP_FRACTION = 0.875
# The training crop (slim's `distorted_bounding_box_crop` defaults).
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (0.75, 1.33)
AREA_RANGE = (0.05, 1.0)
MAX_ATTEMPTS = 100
# TF's four `ResizeMethod`s, in their order, as PIL filters.
_RESIZE_FILTERS = (Image.BILINEAR, Image.NEAREST, Image.BICUBIC, Image.BOX)
# Colour distortion: the ranges of slim's `distort_color`.
MAX_BRIGHTNESS_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)
MAX_HUE_DELTA = 0.2
CONTRAST_RANGE = (0.5, 1.5)


def _round(x: float) -> int:
  """C's `lrintf`: to the nearest integer, halves to even."""
  return int(np.rint(np.float32(x)))


def _random_crop(height: int, width: int, aspect: float,
                 rng: np.random.Generator) -> tuple[int, int, int, int] | None:
  """One attempt of `sample_distorted_bounding_box` at aspect `aspect`.

  The crop's height is drawn uniformly between those of the smallest and
  the largest allowed area at this aspect; None if rounding leaves no crop
  within the bounds.
  """
  min_area = AREA_RANGE[0] * width * height
  max_area = AREA_RANGE[1] * width * height
  crop_h = _round(math.sqrt(min_area / aspect))
  max_h = _round(math.sqrt(max_area / aspect))
  if _round(max_h * aspect) > width:
    max_h = int((width + 0.5 - 1e-7) / aspect)
    if _round(max_h * aspect) > width:
      max_h -= 1
  max_h = min(max_h, height)
  crop_h = min(crop_h, max_h)
  if crop_h < max_h:
    crop_h += int(rng.integers(0, max_h - crop_h + 1))
  crop_w = _round(crop_h * aspect)
  for _ in range(2):  # Rounding may leave the area just below the minimum.
    if crop_w * crop_h < min_area:
      crop_h += 1
      crop_w = _round(crop_h * aspect)
  if (crop_w * crop_h < min_area or crop_w * crop_h > max_area
      or not 0 < crop_w <= width or not 0 < crop_h <= height):
    return None
  # TF draws offsets in [0, size - crop), never the last one.
  top = int(rng.integers(0, height - crop_h)) if crop_h < height else 0
  left = int(rng.integers(0, width - crop_w)) if crop_w < width else 0
  return top, left, crop_h, crop_w


def crop_window(height: int, width: int, rng: np.random.Generator
                ) -> tuple[int, int, int, int]:
  """The training crop `(top, left, height, width)` of an image.

  Up to `MAX_ATTEMPTS` windows of a random aspect ratio; the first that
  covers `MIN_OBJECT_COVERED` of the image (the object box when there is
  none) is taken, else the whole image.
  """
  for _ in range(MAX_ATTEMPTS):
    aspect = rng.uniform(*ASPECT_RATIO_RANGE)
    window = _random_crop(height, width, aspect, rng)
    if (window is not None
        and window[2] * window[3] >= MIN_OBJECT_COVERED * height * width):
      return window
  return 0, 0, height, width


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
  """`tf.image.adjust_brightness`: `delta` added to every value."""
  return image + np.float32(delta)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """`tf.image.adjust_contrast`: each channel scaled about its mean."""
  mean = image.mean(axis=(0, 1), keepdims=True)
  return (image - mean) * np.float32(factor) + mean


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """`tf.image.adjust_saturation`: HSV saturation scaled, clipped to 1."""
  hsv = color.rgb2hsv(image)
  hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0.0, 1.0)
  return color.hsv2rgb(hsv).astype(np.float32)


def adjust_hue(image: np.ndarray, delta: float) -> np.ndarray:
  """`tf.image.adjust_hue`: HSV hue rotated by `delta` turns."""
  hsv = color.rgb2hsv(image)
  hsv[..., 0] = np.mod(hsv[..., 0] + delta, 1.0)
  return color.hsv2rgb(hsv).astype(np.float32)


def distort_color(image: np.ndarray, ordering: int,
                  rng: np.random.Generator) -> np.ndarray:
  """slim's `distort_color` (not fast mode) of a float image in [0, 1].

  Random brightness, saturation, hue and contrast in the order `ordering`
  (0-3) picks, then clipped to [0, 1]. The saturation and hue steps work on
  the image clipped to [0, 1] (HSV is defined there).
  """
  steps = {
      'brightness': lambda x: adjust_brightness(
          x, rng.uniform(-MAX_BRIGHTNESS_DELTA, MAX_BRIGHTNESS_DELTA)),
      'saturation': lambda x: adjust_saturation(
          np.clip(x, 0.0, 1.0), rng.uniform(*SATURATION_RANGE)),
      'hue': lambda x: adjust_hue(
          np.clip(x, 0.0, 1.0), rng.uniform(-MAX_HUE_DELTA, MAX_HUE_DELTA)),
      'contrast': lambda x: adjust_contrast(
          x, rng.uniform(*CONTRAST_RANGE)),
  }
  orders = (('brightness', 'saturation', 'hue', 'contrast'),
            ('saturation', 'brightness', 'contrast', 'hue'),
            ('contrast', 'hue', 'brightness', 'saturation'),
            ('hue', 'saturation', 'contrast', 'brightness'))
  for name in orders[ordering]:
    image = steps[name](image)
  return np.clip(image, 0.0, 1.0)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """TF 1's `resize_bilinear` (`align_corners=False`) to `size` x `size`.

  Output pixel (i, j) is the input linearly interpolated at
  (i * H / size, j * W / size), clamped at the last row and column.
  """
  height, width = image.shape[:2]
  rows = np.arange(size, dtype=np.float64) * (height / size)
  cols = np.arange(size, dtype=np.float64) * (width / size)
  grid = np.meshgrid(rows, cols, indexing='ij')
  image = np.asarray(image, np.float32)
  return np.stack([
      ndimage.map_coordinates(image[..., c], grid, order=1, mode='nearest')
      for c in range(image.shape[-1])], axis=-1)


def eval_image(image: np.ndarray, size: int) -> np.ndarray:
  """The central `EVAL_CROP_FRACTION` of `image`, resized to `size`."""
  height, width = image.shape[:2]
  # As tf.image.central_crop.
  top = int((height - height * EVAL_CROP_FRACTION) / 2)
  left = int((width - width * EVAL_CROP_FRACTION) / 2)
  crop = image[top:height - top, left:width - left]
  return resize_bilinear(crop, size)


def train_image(image: np.ndarray, rng: np.random.Generator,
                size: int) -> np.ndarray:
  """A random crop, resize, flip and colour distortion of `image`."""
  top, left, crop_h, crop_w = crop_window(*image.shape[:2], rng)
  method = _RESIZE_FILTERS[int(rng.integers(0, len(_RESIZE_FILTERS)))]
  resized = Image.fromarray(image).resize(
      (size, size), method, box=(left, top, left + crop_w, top + crop_h))
  pixels = np.asarray(resized, np.float32) / 255.0
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  pixels = distort_color(pixels, int(rng.integers(0, 4)), rng)
  return (pixels * 255.0).astype(np.float32)
