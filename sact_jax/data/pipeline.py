"""Input pipelines: tfds array_record data sources read by grain, no TF.

`make_dataset` returns a grain dataset of dict batches of numpy arrays, with
the preprocessing of the reference SACT code:

* `cifar10`: train: zero-pad to 36x36, random 32x32 crop, random horizontal
  flip; then (train and eval) per-image standardisation.
* `imagenet2012`: TF-slim's Inception preprocessing, as the reference
  (`inception.py`): train: random crop, resize, flip and colour distortion;
  eval: central 87.5% crop, bilinear resize; both to 224x224, scaled to
  [-1, 1].
* `sact_shapes` (generated locally, see `shapes.py`): as `cifar10`, and the
  object mask is cropped and flipped with its image.

The last step, the per-image normalisation (standardisation or [-1, 1]),
is also `preprocess_image`, for images from elsewhere. Random augmentation
is a function of (seed, example position), so a pipeline is reproducible,
and its iterator resumes exactly from `get_iterator_state` /
`set_iterator_state`.
"""

import dataclasses
import functools
import io
import json
import math
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from sact_jax.data import inception
from sact_jax.data import shapes
from sact_jax.models import factory

Example = dict[str, Any]


class DatasetNotFoundError(Exception):
  """The dataset is not prepared in `data_dir` and cannot be downloaded."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a training loop need to know about a dataset.

  Attributes:
    num_classes: number of labels.
    image_shape: (height, width, channels) of the images `make_dataset`
      yields by default (see `image_shape` for other sizes).
    num_train_examples: size of `train_split`.
    num_eval_examples: size of `eval_split`.
    train_split: tfds split to train on.
    eval_split: tfds split to evaluate on.
    resizable: whether `make_dataset` resizes the images to any
      `image_size`; the others have one size.
    class_names: name of each label, or None where only indices are known.
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  num_train_examples: int
  num_eval_examples: int
  train_split: str
  eval_split: str
  resizable: bool = False
  class_names: tuple[str, ...] | None = None

  def split_to_evaluate(self, eval_split: str | None) -> str:
    """A config's `eval_split`, or (None) the dataset's own."""
    return eval_split or self.eval_split

  def eval_size(self, eval_split: str | None) -> int | None:
    """Images of a config's `eval_split` (None: `eval_split`) when known.

    Only the dataset's own eval split has a size here; another one is
    known only once read (None).
    """
    return (self.num_eval_examples
            if eval_split in (None, self.eval_split) else None)


_CIFAR10_CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer',
                        'dog', 'frog', 'horse', 'ship', 'truck')
_DATASET_INFO = {
    'cifar10': DatasetInfo(10, (32, 32, 3), 50_000, 10_000, 'train', 'test',
                           class_names=_CIFAR10_CLASS_NAMES),
    'imagenet2012': DatasetInfo(1000, (224, 224, 3), 1_281_167, 50_000,
                                'train', 'validation', resizable=True),
    'sact_shapes': DatasetInfo(shapes.NUM_CLASSES, (32, 32, 3), 20_000, 2_000,
                               'train', 'test',
                               class_names=shapes.CLASS_NAMES),
}
SUPPORTED_DATASETS = tuple(_DATASET_INFO)

# Datasets generated locally (on first use by the pipelines).
_GENERATED_DATASETS = ('sact_shapes', 'sact_detection')


def _build_hint(name: str, note: str = '') -> str:
  """How to prepare a downloadable dataset (`note`: e.g. its size)."""
  return ('Prepare it on a machine with network access and TensorFlow '
          f'(`pip install tensorflow tensorflow-datasets`){note}:\n'
          f'  tfds build {name} --data_dir=DATA_DIR --file_format=array_record'
          f'\nthen copy DATA_DIR/{name.partition("/")[0]} into the data_dir '
          'above.')


def _generate_hint(name: str) -> str:
  """How to prepare a generated dataset by hand."""
  return ('It is generated locally: python -c "import sact_jax.data, '
          f"tensorflow_datasets as tfds; tfds.builder('{name}', "
          "data_dir='DATA_DIR', file_format='array_record')"
          '.download_and_prepare()"')


# How to get each dataset (by base name) into a tfds `data_dir` (shown in
# errors); the detection datasets are read by `detection.py`.
_PREPARE_HINTS = {
    'cifar10': _build_hint('cifar10'),
    'imagenet2012': (
        'ImageNet cannot be downloaded automatically. Put '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from '
        'https://image-net.org/download-images) in the manual_dir '
        '({manual_dir}), then, with TensorFlow installed, run:\n'
        '  tfds build imagenet2012 --data_dir=DATA_DIR '
        '--manual_dir=MANUAL_DIR --file_format=array_record'),
    'coco': _build_hint('coco/2017', ' (it downloads about 25 GB)'),
    **{name: _generate_hint(name) for name in _GENERATED_DATASETS},
}

# Pixels of zero padding on each side before a random crop (CIFAR-style).
_CROP_PADDING = 2


def dataset_info(name: str) -> DatasetInfo:
  """Returns the static metadata of dataset `name` (e.g. 'sact_shapes/tiny')."""
  base, config = _parse_name(name)
  info = _DATASET_INFO[base]
  if base == 'sact_shapes' and config:
    configs = shapes.SactShapes.builder_configs
    if config not in configs:
      raise ValueError(f'Unknown config {name!r}; sact_shapes configs: '
                       f'{", ".join(configs)}.')
    builder_config = configs[config]
    info = dataclasses.replace(
        info, num_train_examples=builder_config.num_train,
        num_eval_examples=builder_config.num_test)
  return info


def label_offset(name: str, num_classes: int) -> int:
  """Shift of `name`'s labels into a model's classes (1: background class).

  The reference's ImageNet models have 1001 classes with the background as
  class 0, so tfds label l is their class l + 1; other models have exactly
  the dataset's classes.

  Raises:
    ValueError: `num_classes` fits neither.
  """
  info = dataset_info(name)
  offset = num_classes - info.num_classes
  if offset not in (0, 1):
    raise ValueError(
        f'num_classes={num_classes} does not fit {name}, which has '
        f'{info.num_classes} classes (use {info.num_classes}, or '
        f'{info.num_classes + 1} with a background class 0).')
  return offset


def image_shape(name: str, image_size: int | None = None
                ) -> tuple[int, int, int]:
  """The shape of the images `make_dataset(name, image_size=...)` yields.

  Args:
    name: a dataset of `SUPPORTED_DATASETS`, optionally with a config.
    image_size: side of the (square) images of a resizable dataset; None for
      the default. Other datasets accept only their own size (or None).

  Raises:
    ValueError: `image_size` does not fit the dataset.
  """
  info = dataset_info(name)
  height, width, channels = info.image_shape
  if image_size is None:
    return info.image_shape
  if not factory.is_integer(image_size) or image_size < 1:
    raise ValueError(f'image_size must be an integer >= 1, got '
                     f'{image_size!r}.')
  if info.resizable:
    return (int(image_size), int(image_size), channels)
  if (image_size, image_size) != (height, width):
    raise ValueError(f'image_size={image_size} does not match {name}, whose '
                     f'images are {height}x{width}.')
  return info.image_shape


def make_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    data_dir: str | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    image_size: int | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
  """Returns a grain dataset of preprocessed batches of one host's shard.

  Batches are dicts of numpy arrays: `image` float32 [B, H, W, 3], `label`
  int32 [B] and, for `sact_shapes`, `mask` float32 [B, H, W] (1 on the
  object). Iterate with `iter(dataset)`; the iterator's position is
  `get_iterator_state(iterator)`.

  Args:
    name: tfds name, one of `SUPPORTED_DATASETS`, optionally with a config
      ('sact_shapes/tiny').
    split: tfds split, slicing allowed ('train', 'test', 'train[:90%]').
    batch_size: examples per batch on this host.
    train: whether to shuffle, augment and drop the last partial batch.
    seed: seed of shuffling and augmentation, in [0, 2**32).
    data_dir: tfds data directory; None for the tfds default.
    shard_index: this host's shard, usually `jax.process_index()`.
    shard_count: number of shards, usually `jax.process_count()`.
    num_epochs: passes over the data; None repeats forever when training and
      makes one pass otherwise. With several epochs, batches run across epoch
      boundaries and each epoch is shuffled and augmented differently.
    image_size: side of the output images of a resizable dataset
      (`imagenet2012`, default 224); the others accept only their own size
      or None (see `image_shape`).
    worker_count: preprocessing processes; 0 preprocesses in this process (in
      threads). Workers need parsed absl flags (as under `absl.app.run`).

  Returns:
    A `grain.IterDataset` of batches.

  Raises:
    ValueError: unknown dataset or bad arguments.
    DatasetNotFoundError: the dataset is not prepared in `data_dir` (except
      `sact_shapes`, which is generated there if needed).
  """
  base, _ = _parse_name(name)
  _check_shard(shard_index, shard_count)
  _check_batching(batch_size=batch_size, train=train, seed=seed)
  size = image_shape(name, image_size)[0]
  source = _data_source(name, split, data_dir)
  load = functools.partial(_load_batch, source=source,
                           preprocess=_PREPROCESSORS[base],
                           normalize=_NORMALIZERS[base], train=train,
                           image_size=size)
  return _batched_dataset(
      len(source), load, batch_size=batch_size, train=train, seed=seed,
      shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs, worker_count=worker_count)


def _check_shard(shard_index: int, shard_count: int) -> None:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'Need 0 <= shard_index < shard_count, got {shard_index} '
                     f'and {shard_count}.')


def _check_batching(*, batch_size: int, train: bool, seed: int) -> None:
  """`make_dataset`'s batching arguments, checked before any data is read.

  grain would report a bad batch size or seed only at the first batch, from
  deep inside; and `train='no'` is truthy (it would shuffle and augment).
  """
  if not isinstance(train, (bool, np.bool_)):
    raise TypeError(f'train must be True or False, got {train!r}.')
  if not factory.is_integer(batch_size) or batch_size < 1:
    raise ValueError(f'batch_size must be an integer >= 1, got '
                     f'{batch_size!r}.')
  if not factory.is_integer(seed) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an integer in [0, 2**32), got {seed!r}.')


def _batched_dataset(num_examples: int, load, *, batch_size: int,
                     train: bool, seed: int, shard_index: int,
                     shard_count: int, num_epochs: int | None,
                     worker_count: int) -> grain.IterDataset:
  """The grain pipeline shared by all datasets, up to `load`.

  The other arguments are `make_dataset`'s.

  Args:
    num_examples: size of the source.
    load: (indices_B, rng) -> batch: reads and preprocesses the examples at
      a batch of source indices; rng is a numpy generator seeded from (seed,
      batch position) when training, else None.
  """
  if num_epochs is None:
    num_epochs = None if train else 1
  # The pipeline runs on example indices up to the batch, then reads each
  # batch from the source in one call and preprocesses it vectorised: several
  # times faster than per-example reads and maps on a small CPU.
  ds = grain.MapDataset.range(num_examples)
  # Each host reads every shard_count-th example: disjoint shards whose sizes
  # differ by at most one example.
  ds = ds[shard_index::shard_count]
  # Derives distinct seeds for shuffle and random_map. Hosts other than the
  # first fold in their index, so that they shuffle and augment unlike it
  # (host 0 keeps `seed`: a one-host run's stream).
  ds = ds.seed(seed if shard_index == 0 else int(
      np.random.SeedSequence((seed, shard_index)).generate_state(1)[0]))
  if train:
    # Shuffle before repeat: each epoch has its own order.
    ds = ds.shuffle()
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=train)
  if train:
    # The generator is seeded from (seed, batch position): augmentation is
    # reproducible and differs between epochs.
    ds = ds.random_map(load)
  else:
    ds = ds.map(functools.partial(load, rng=None))
  # Threads overlap reading with the training step; the prefetch buffer
  # counts batches.
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if worker_count > 0:
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


def _load_batch(indices_B: np.ndarray, rng: np.random.Generator | None, *,
                source, preprocess, normalize, train: bool,
                image_size: int) -> Example:
  """Reads the examples at `indices_B` and preprocesses them into a batch."""
  examples = _read_examples(source, indices_B)
  batch = preprocess(examples, rng, train=train, image_size=image_size)
  batch['image'] = normalize(batch['image'])
  return batch


def _read_examples(source, indices_B: np.ndarray) -> list[Example]:
  """The examples at `indices_B` of a tfds data source, in one read."""
  indices = [int(i) for i in indices_B]
  try:
    return source.__getitems__(indices)  # One batched read.
  except TypeError:
    # The source of `tfds.testing.mock_data` has a broken `__getitems__`.
    return [source[i] for i in indices]


def get_iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """Returns the position of `iterator` as JSON-compatible data.

  The value survives `json.dumps`/`json.loads` unchanged, so it can go in an
  orbax checkpoint (e.g. `ocp.args.JsonSave`) next to the model. It restores
  a pipeline made with the same arguments (`worker_count` included).

  Args:
    iterator: an iterator of a dataset from `make_dataset`.
  """
  return json.loads(json.dumps(iterator.get_state()))


def set_iterator_state(iterator: grain.DatasetIterator,
                       state: dict[str, Any]) -> None:
  """Moves `iterator` to `state` (from `get_iterator_state`)."""
  iterator.set_state(state)


def _parse_name(name: str) -> tuple[str, str | None]:
  """Splits 'base/config' and checks that base is supported."""
  base, _, config = name.partition('/')
  if base not in _DATASET_INFO:
    raise ValueError(f'Unknown dataset {name!r}; supported datasets: '
                     f'{", ".join(SUPPORTED_DATASETS)}.')
  return base, config or None


def check_available(name: str, data_dir: str | None = None) -> None:
  """Raises DatasetNotFoundError unless both splits of `name` can be read.

  For launchers, before they write anything; generated datasets always can
  be (they are made at first use).
  """
  base, _ = _parse_name(name)
  if base in _GENERATED_DATASETS:
    return
  info = dataset_info(name)
  for split in dict.fromkeys((info.train_split, info.eval_split)):
    _data_source(name, split, data_dir)


def _data_source(name: str, split: str, data_dir: str | None):
  """Opens a tfds random-access source; never downloads.

  Args:
    name: tfds name of a dataset of `_PREPARE_HINTS` (checked by the caller),
      optionally with a config; generated datasets are prepared if needed.
    split: tfds split.
    data_dir: tfds data directory; None for the tfds default.
  """
  base = name.partition('/')[0]
  if base in _GENERATED_DATASETS and not tfds.builder(
      name, data_dir=data_dir).is_prepared():
    # Generated here in seconds.
    try:
      tfds.builder(name, data_dir=data_dir,
                   file_format='array_record').download_and_prepare()
    except FileExistsError:
      # Another process (a second launcher on a fresh data_dir) finished
      # first: tfds's rename of our finished folder found its. The
      # generator is deterministic, so its data are ours.
      if not tfds.builder(name, data_dir=data_dir).is_prepared():
        raise
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # tfds reports a missing dataset in many ways, some obscure (e.g. a
    # NotImplementedError about the file format): explain it instead.
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared() and builder.info.file_format == (
        tfds.core.FileFormat.ARRAY_RECORD):
      raise
    raise DatasetNotFoundError(_not_found_message(base, builder)) from e


def _not_found_message(base: str, builder) -> str:
  """One paragraph on what is missing and how to provide it."""
  if builder.is_prepared():
    problem = (f'is prepared in {builder.data_dir} as '
               f'{builder.info.file_format.value} files, but reading without '
               'TensorFlow needs array_record files (re-prepare it with '
               '--file_format=array_record).')
  else:
    problem = f'is not prepared in {builder.data_dir}.'
  root = builder._data_dir_root  # pylint: disable=protected-access
  manual_dir = f'{root}/downloads/manual'
  return (f'Dataset {builder.name!r} {problem} Nothing is downloaded here. '
          f'tfds data_dir: {root}; manual_dir: {manual_dir}. '
          + _PREPARE_HINTS[base].format(manual_dir=manual_dir))


def _standardize(image_BxHxWxC: np.ndarray) -> np.ndarray:
  """TF's `per_image_standardization`: zero mean, unit variance per image.

  (x - mean) / max(std, 1 / sqrt(H * W * C)), statistics over each image.

  Args:
    image_BxHxWxC: images, any real dtype (uint8 in [0, 255] here).

  Returns:
    float32 images.
  """
  image_BxHxWxC = image_BxHxWxC.astype(np.float32)
  axes = (1, 2, 3)
  centred = image_BxHxWxC - image_BxHxWxC.mean(axis=axes, keepdims=True)
  std = np.sqrt(np.mean(np.square(centred), axis=axes, keepdims=True))
  min_std = 1 / math.sqrt(math.prod(image_BxHxWxC.shape[1:]))
  return centred / np.maximum(std, np.float32(min_std))


def _to_unit_range(image_BxHxWxC: np.ndarray) -> np.ndarray:
  """[0, 255] -> [-1, 1] float32 (the reference's Inception preprocessing)."""
  return image_BxHxWxC.astype(np.float32) / np.float32(127.5) - 1


def _pad_crop_flip(arrays: list[np.ndarray], rng: np.random.Generator
                   ) -> list[np.ndarray]:
  """Zero-pads, randomly crops back and maybe flips each example.

  Args:
    arrays: arrays [B, H, W, ...] of the same B, H, W, transformed alike
      (e.g. images and their masks).
    rng: numpy generator.

  Returns:
    The transformed arrays, same shapes.
  """
  batch, height, width = arrays[0].shape[:3]
  pad = _CROP_PADDING
  top_B = rng.integers(0, 2 * pad + 1, batch)
  left_B = rng.integers(0, 2 * pad + 1, batch)
  flip_B = rng.random(batch) < 0.5
  out = []
  for array in arrays:
    padded = np.pad(array, [(0, 0), (pad, pad), (pad, pad)]
                    + [(0, 0)] * (array.ndim - 3))
    # Slicing in a loop beats one fancy-index gather by far.
    cropped = np.stack([
        padded[i, top:top + height, left:left + width]
        for i, (top, left) in enumerate(zip(top_B, left_B))])
    cropped[flip_B] = cropped[flip_B, :, ::-1]
    out.append(cropped)
  return out


def _stack(examples: list[Example], key: str) -> np.ndarray:
  return np.stack([example[key] for example in examples])


def _preprocess_cifar(examples: list[Example],
                      rng: np.random.Generator | None, *, train: bool,
                      image_size: int) -> Example:
  """CIFAR-10: crop and flip when training."""
  del image_size  # Always 32.
  image = _stack(examples, 'image')
  if train:
    (image,) = _pad_crop_flip([image], rng)
  return {'image': image,
          'label': _stack(examples, 'label').astype(np.int32)}


def _preprocess_shapes(examples: list[Example],
                       rng: np.random.Generator | None, *, train: bool,
                       image_size: int) -> Example:
  """sact_shapes: as CIFAR-10, moving each mask with its image."""
  del image_size  # Always 32.
  image, mask = _stack(examples, 'image'), _stack(examples, 'mask')
  if train:
    image, mask = _pad_crop_flip([image, mask], rng)
  return {'image': image,
          'label': _stack(examples, 'label').astype(np.int32),
          'mask': mask.astype(np.float32)}


def _preprocess_imagenet(examples: list[Example],
                         rng: np.random.Generator | None, *, train: bool,
                         image_size: int) -> Example:
  """ImageNet: the reference's Inception preprocessing (`inception.py`)."""
  images = [_crop_resize_imagenet(example['image'], rng, train=train,
                                  image_size=image_size)
            for example in examples]
  return {'image': np.stack(images),
          'label': _stack(examples, 'label').astype(np.int32)}


def _crop_resize_imagenet(image: np.ndarray | bytes,
                          rng: np.random.Generator | None, *, train: bool,
                          image_size: int) -> np.ndarray:
  """One image as the reference preprocesses it (`inception.py`)."""
  image = _decode_rgb(image)
  if train:
    return inception.train_image(image, rng, image_size)
  return inception.eval_image(image, image_size)


def _decode_rgb(image: np.ndarray | bytes) -> np.ndarray:
  """A tfds `Image` as uint8 [H, W, 3], decoding it if still encoded."""
  if isinstance(image, bytes):  # Undecoded (e.g. tfds SkipDecoding).
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(Image.open(io.BytesIO(image)).convert('RGB'))
  return image


# Per dataset: the geometry (crops, flips, resizing; masks move along) ...
_PREPROCESSORS = {
    'cifar10': _preprocess_cifar,
    'imagenet2012': _preprocess_imagenet,
    'sact_shapes': _preprocess_shapes,
}
# ... then the per-image normalisation of the pixel values.
_NORMALIZERS = {
    'cifar10': _standardize,
    'imagenet2012': _to_unit_range,
    'sact_shapes': _standardize,
}
# The data each model family is trained on, whose normalisation its models
# expect of any image.
_FAMILY_DATASETS = {'cifar': 'cifar10', 'imagenet': 'imagenet2012'}


def preprocess_image(name: str, image_HxWxC: np.ndarray) -> np.ndarray:
  """An image in [0, 255] normalised as the pipeline of `name` does it.

  Only the per-image normalisation, no crop or resize: the models are fully
  convolutional and take images of any size.

  Args:
    name: a dataset (e.g. 'sact_shapes/tiny'), or a model family ('cifar',
      'imagenet') for the data its models are trained on.
    image_HxWxC: the image, any real dtype.

  Returns:
    float32 [H, W, C].

  Raises:
    ValueError: not one non-empty [H, W, 3] image (e.g. a batch).
  """
  base = _FAMILY_DATASETS.get(name) or _parse_name(name)[0]
  image = np.asarray(image_HxWxC)
  # A batch would be standardised over all its images at once, silently.
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape) < 1:
    raise ValueError(
        f'preprocess_image takes one [H, W, 3] image, got shape '
        f'{image.shape}' + ('; for a batch, call it per image.'
                            if image.ndim == 4 else '.'))
  return _NORMALIZERS[base](image[None])[0]
