"""Tests of the generated dataset and the grain input pipelines."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np
import tensorflow_datasets as tfds

from sact_jax import data
from sact_jax.data import inception
from sact_jax.data import pipeline
from sact_jax.data import shapes

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tempdir(test) -> str:
  """A fresh directory removed after `test` (absl's needs parsed flags)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _take(dataset, n):
  iterator = iter(dataset)
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(test, batches_a, batches_b):
  test.assertEqual(len(batches_a), len(batches_b))
  for a, b in zip(batches_a, batches_b):
    chex.assert_trees_all_equal(a, b)


class GenerateExamplesTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.examples = shapes.generate_examples(600, seed=0)

  def test_shapes_and_dtypes(self):
    ex = self.examples
    chex.assert_shape(ex['image'], (600, 32, 32, 3))
    chex.assert_shape(ex['label'], (600,))
    chex.assert_shape(ex['mask'], (600, 32, 32))
    self.assertEqual(ex['image'].dtype, np.uint8)
    self.assertEqual(ex['label'].dtype, np.int64)
    self.assertEqual(ex['mask'].dtype, np.uint8)
    self.assertSetEqual(set(np.unique(ex['mask'])), {0, 1})

  def test_deterministic_per_seed(self):
    """Same seed, same data; another seed, other data."""
    a = shapes.generate_examples(100, seed=7)
    b = shapes.generate_examples(100, seed=7)
    c = shapes.generate_examples(100, seed=8)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.array_equal(a['image'], c['image']))
    self.assertFalse(np.array_equal(a['mask'], c['mask']))

  def test_spans_chunks(self):
    """Sizes past one generation chunk come out whole and distinct."""
    ex = shapes.generate_examples(1100, seed=3)
    chex.assert_shape(ex['image'], (1100, 32, 32, 3))
    # Chunks use their own generators: no chunk repeats another.
    self.assertFalse(np.array_equal(ex['image'][:76], ex['image'][1024:]))

  def test_empty(self):
    ex = shapes.generate_examples(0, seed=0)
    chex.assert_shape(ex['image'], (0, 32, 32, 3))
    chex.assert_shape(ex['mask'], (0, 32, 32))

  def test_objects_are_small(self):
    """Every object is present and covers at most ~15% of the image."""
    fraction_N = self.examples['mask'].mean(axis=(1, 2))
    self.assertGreater(fraction_N.min(), 0.02)
    self.assertLessEqual(fraction_N.max(), 0.155)

  def test_labels_balanced_over_all_classes(self):
    counts = np.bincount(self.examples['label'], minlength=shapes.NUM_CLASSES)
    np.testing.assert_array_equal(counts, [100] * shapes.NUM_CLASSES)

  def test_object_is_where_the_mask_says(self):
    """Under the mask: one flat colour, far from the background around it."""
    image_NxHxWx3 = self.examples['image'].astype(np.float32)
    mask_NxHxW = self.examples['mask'].astype(bool)
    for image, mask in zip(image_NxHxWx3, mask_NxHxW):
      # The 2-pixel band just outside the object.
      grown = np.zeros_like(mask)
      for dy in range(-2, 3):
        for dx in range(-2, 3):
          grown |= np.roll(mask, (dy, dx), axis=(0, 1))
      band = grown & ~mask
      std_inside = image[mask].std(axis=0).mean()
      # Only the added pixel noise (sigma 0.03 * 255 = 7.7) varies inside.
      self.assertLess(std_inside, 9.5)
      self.assertLess(std_inside, image[~mask].std(axis=0).mean())
      contrast = np.linalg.norm(image[mask].mean(0) - image[band].mean(0))
      self.assertGreater(contrast, 80)

  def test_colour_does_not_give_the_class(self):
    """Mean object colours of all classes are alike (colour is random)."""
    image = self.examples['image'].astype(np.float32)
    mask = self.examples['mask'].astype(bool)
    colour_Nx3 = np.stack([x[m].mean(0) for x, m in zip(image, mask)])
    class_means = np.stack([
        colour_Nx3[self.examples['label'] == c].mean(0)
        for c in range(shapes.NUM_CLASSES)])
    # Per-class means of 100 uniform-ish colours: spread about 255 / 3 / 10.
    self.assertLess(np.abs(class_means - colour_Nx3.mean(0)).max(), 30)


class BuilderTest(parameterized.TestCase):

  def test_prepare_and_read_back(self):
    """tfds prepares `sact_shapes/tiny` and data_source returns the data."""
    data_dir = _tempdir(self)
    builder = tfds.builder('sact_shapes/tiny', data_dir=data_dir,
                           file_format='array_record')
    builder.download_and_prepare()
    self.assertEqual(builder.info.features['label'].num_classes, 6)
    self.assertEqual(builder.info.features['label'].names,
                     list(shapes.CLASS_NAMES))
    for split, size in (('train', 128), ('test', 64)):
      source = tfds.data_source('sact_shapes/tiny', split=split,
                                data_dir=data_dir, download=False)
      self.assertLen(source, size)
      expected = shapes.generate_examples(size, shapes.SPLIT_SEEDS[split])
      by_image = {image.tobytes(): i for i, image in enumerate(
          expected['image'])}
      # tfds shuffles the stored order: match examples by image.
      seen = set()
      for example in source:
        i = by_image[example['image'].tobytes()]
        seen.add(i)
        self.assertEqual(example['label'], expected['label'][i])
        np.testing.assert_array_equal(example['mask'], expected['mask'][i])
      self.assertLen(seen, size)

  def test_another_process_prepares_it_first(self):
    """Two launchers on a fresh data_dir: the one that finishes second reads
    the first one's data instead of failing on tfds's rename."""
    data_dir = _tempdir(self)
    prepare = tfds.core.DatasetBuilder.download_and_prepare

    def loses_the_race(builder, *args, **kwargs):
      # The other process renames its finished folder into place first.
      prepare(tfds.builder('sact_shapes/tiny', data_dir=data_dir,
                           file_format='array_record'))
      raise FileExistsError(f'Cannot rename: {builder.data_dir} exists.')

    with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                           loses_the_race):
      source = pipeline._data_source('sact_shapes/tiny', 'test', data_dir)
    self.assertLen(source, 64)
    # Not prepared by anyone: the error stands.
    with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                           side_effect=FileExistsError('elsewhere')):
      with self.assertRaisesRegex(FileExistsError, 'elsewhere'):
        pipeline._data_source('sact_shapes/tiny', 'test', _tempdir(self))

  def test_custom_split_sizes(self):
    data_dir = _tempdir(self)
    config = shapes.SactShapesConfig(name='t10', num_train=10, num_test=3)
    builder = tfds.builder('sact_shapes', config=config, data_dir=data_dir,
                           file_format='array_record')
    builder.download_and_prepare()
    self.assertEqual(builder.info.splits['train'].num_examples, 10)
    self.assertEqual(builder.info.splits['test'].num_examples, 3)


class ShapesPipelineTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    # Prepared on first use by make_dataset.
    data.make_dataset('sact_shapes/tiny', 'test', batch_size=1, train=False,
                      data_dir=cls.data_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir)
    super().tearDownClass()

  def make(self, split='train', **kwargs):
    kwargs = {'batch_size': 16, 'train': True, **kwargs}
    return data.make_dataset('sact_shapes/tiny', split,
                             data_dir=self.data_dir, **kwargs)

  def test_train_batches(self):
    batch = _take(self.make(), 1)[0]
    self.assertSetEqual(set(batch), {'image', 'label', 'mask'})
    chex.assert_shape(batch['image'], (16, 32, 32, 3))
    chex.assert_shape(batch['label'], (16,))
    chex.assert_shape(batch['mask'], (16, 32, 32))
    self.assertEqual(batch['image'].dtype, np.float32)
    self.assertEqual(batch['label'].dtype, np.int32)
    self.assertEqual(batch['mask'].dtype, np.float32)
    np.testing.assert_allclose(batch['image'].mean(axis=(1, 2, 3)), 0,
                               atol=1e-5)
    np.testing.assert_allclose(batch['image'].std(axis=(1, 2, 3)), 1,
                               atol=1e-5)

  def test_eval_is_the_stored_data_standardised(self):
    """Eval: no augmentation, stored order, every example once."""
    source = tfds.data_source('sact_shapes/tiny', split='test',
                              data_dir=self.data_dir)
    batches = list(self.make('test', batch_size=24, train=False))
    self.assertEqual([len(b['label']) for b in batches], [24, 24, 16])
    for i, example in enumerate(source):
      batch, row = batches[i // 24], i % 24
      image = example['image'].astype(np.float32)
      expected = (image - image.mean()) / image.std()
      np.testing.assert_allclose(batch['image'][row], expected, atol=1e-5)
      np.testing.assert_array_equal(batch['mask'][row], example['mask'])
      self.assertEqual(batch['label'][row], example['label'])

  def test_preprocess_image_is_the_eval_pipeline(self):
    """One raw image normalised alone = its row of an eval batch, exactly."""
    source = tfds.data_source('sact_shapes/tiny', split='test',
                              data_dir=self.data_dir)
    batch = _take(self.make('test', batch_size=4, train=False), 1)[0]
    for row in range(4):
      for name in ('sact_shapes/tiny', 'cifar'):
        np.testing.assert_array_equal(
            data.preprocess_image(name, source[row]['image']),
            batch['image'][row])

  def test_mask_moves_with_the_image(self):
    """Crops and flips of a training batch act alike on image and mask."""
    source = tfds.data_source('sact_shapes/tiny', split='train',
                              data_dir=self.data_dir)
    originals = [(pipeline._standardize(ex['image'][None])[0], ex['mask'])
                 for ex in source]
    batch = _take(self.make(), 1)[0]
    for image, mask in zip(batch['image'], batch['mask']):
      self.assertTrue(any(
          _is_crop_flip_of(image, mask, orig_image, orig_mask)
          for orig_image, orig_mask in originals))

  def test_workers_give_the_same_batches(self):
    """Preprocessing in a worker process changes nothing (and resumes)."""
    # grain's worker processes read absl flags, unparsed under pytest.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    expected = _take(self.make(), 4)
    iterator = iter(self.make(worker_count=1))
    try:
      got = [next(iterator) for _ in range(2)]
      state = json.loads(json.dumps(data.get_iterator_state(iterator)))
      got += [next(iterator) for _ in range(2)]
      _assert_batches_equal(self, got, expected)
      data.set_iterator_state(iterator, state)
      _assert_batches_equal(self, [next(iterator) for _ in range(2)],
                            expected[2:])
    finally:
      iterator.close()


def _is_crop_flip_of(image, mask, orig_image, orig_mask) -> bool:
  """Whether (image, mask) is one pad-crop-flip of (orig_image, orig_mask)."""
  pad = pipeline._CROP_PADDING
  padded_mask = np.pad(orig_mask, pad)
  # NaN marks the padding, whose value re-standardisation changes.
  padded_image = np.pad(orig_image, [(pad, pad), (pad, pad), (0, 0)],
                        constant_values=np.nan)
  for top in range(2 * pad + 1):
    for left in range(2 * pad + 1):
      for flip in (False, True):
        window = np.s_[top:top + 32, left:left + 32]
        step = -1 if flip else 1
        if not np.array_equal(padded_mask[window][:, ::step], mask):
          continue
        crop = padded_image[window][:, ::step]
        valid = ~np.isnan(crop)
        # Equal up to the affine map of standardising the padded crop anew.
        if np.corrcoef(crop[valid], image[valid])[0, 1] > 0.9999:
          return True
  return False


class Cifar10PipelineTest(parameterized.TestCase):
  """`cifar10` under `tfds.testing.mock_data` (random images)."""

  def setUp(self):
    super().setUp()
    self.enter_context(tfds.testing.mock_data(num_examples=64))

  def make(self, **kwargs):
    kwargs = {'batch_size': 8, 'train': True, 'seed': 0, **kwargs}
    return data.make_dataset('cifar10', 'train', **kwargs)

  @parameterized.parameters(True, False)
  def test_batches(self, train):
    batches = _take(self.make(train=train), 3)
    for batch in batches:
      self.assertSetEqual(set(batch), {'image', 'label'})
      chex.assert_shape(batch['image'], (8, 32, 32, 3))
      chex.assert_shape(batch['label'], (8,))
      self.assertEqual(batch['image'].dtype, np.float32)
      self.assertEqual(batch['label'].dtype, np.int32)
      self.assertTrue(np.all((batch['label'] >= 0) & (batch['label'] < 10)))
      np.testing.assert_allclose(batch['image'].mean(axis=(1, 2, 3)), 0,
                                 atol=1e-5)
      np.testing.assert_allclose(batch['image'].std(axis=(1, 2, 3)), 1,
                                 atol=1e-5)

  def test_same_seed_same_batches(self):
    _assert_batches_equal(self, _take(self.make(seed=3), 3),
                          _take(self.make(seed=3), 3))

  def test_other_seed_other_batches(self):
    a, b = _take(self.make(seed=3), 1)[0], _take(self.make(seed=4), 1)[0]
    self.assertFalse(np.array_equal(a['label'], b['label']))
    self.assertFalse(np.allclose(a['image'], b['image']))

  def test_epochs_differ(self):
    """Two finite epochs: all examples each, in different orders."""
    source_labels = [int(x['label']) for x in tfds.data_source(
        'cifar10', split='train')]
    batches = list(self.make(num_epochs=2, train=True))
    self.assertLen(batches, 16)
    labels = np.concatenate([b['label'] for b in batches])
    self.assertCountEqual(labels[:64].tolist(), source_labels)
    self.assertCountEqual(labels[64:].tolist(), source_labels)
    self.assertFalse(np.array_equal(labels[:64], labels[64:]))

  def test_shards_are_disjoint_and_cover_the_data(self):
    def images(**kwargs):
      batches = list(self.make(train=False, **kwargs))
      return [x.tobytes() for b in batches for x in b['image']]

    everything = images()
    shard_0 = images(shard_index=0, shard_count=2)
    shard_1 = images(shard_index=1, shard_count=2)
    self.assertLen(everything, 64)
    self.assertLen(set(everything), 64)
    self.assertLen(shard_0, 32)
    self.assertLen(shard_1, 32)
    self.assertEmpty(set(shard_0) & set(shard_1))
    self.assertSetEqual(set(shard_0) | set(shard_1), set(everything))

  def test_training_shards_differ(self):
    a = _take(self.make(shard_index=0, shard_count=2), 1)[0]
    b = _take(self.make(shard_index=1, shard_count=2), 1)[0]
    self.assertFalse(np.allclose(a['image'], b['image']))

  def test_hosts_shuffle_and_augment_independently(self):
    """Host 1 repeats neither host 0's permutation nor its random draws."""
    def load(indices_B, rng):
      return {'index': np.asarray(indices_B),
              'draw': rng.integers(0, 2**31, len(indices_B))}

    def first_batch(shard_index):
      return next(iter(pipeline._batched_dataset(  # pylint: disable=protected-access
          128, load, batch_size=8, train=True, seed=0,
          shard_index=shard_index, shard_count=2, num_epochs=None,
          worker_count=0)))

    a, b = first_batch(0), first_batch(1)
    self.assertTrue(np.all(a['index'] % 2 == 0) and np.all(b['index'] % 2))
    # Shards 2k and 2k + 1 under one permutation would pair up.
    self.assertFalse(np.array_equal(a['index'] + 1, b['index']))
    self.assertFalse(np.any(a['draw'] == b['draw']))

  def test_iterator_state_resumes_exactly(self):
    """A restored iterator continues with exactly the batches that follow."""
    iterator = iter(self.make())
    for _ in range(3):
      next(iterator)
    state = data.get_iterator_state(iterator)
    # What a checkpoint stores: plain JSON.
    state = json.loads(json.dumps(state))
    expected = [next(iterator) for _ in range(10)]  # Crosses an epoch.
    restored = iter(self.make())
    next(restored)
    data.set_iterator_state(restored, state)
    _assert_batches_equal(self, [next(restored) for _ in range(10)], expected)

  def test_bad_shard(self):
    with self.assertRaisesRegex(ValueError, 'shard_index'):
      self.make(shard_index=2, shard_count=2)

  @parameterized.named_parameters(
      ('train_string', dict(train='no'), TypeError,
       r"train must be True or False, got 'no'\."),
      ('negative_seed', dict(seed=-1), ValueError,
       r'seed must be an integer in \[0, 2\*\*32\), got -1\.'),
      ('large_seed', dict(seed=2**33), ValueError, r'seed must be an integer'),
      ('float_seed', dict(seed=1.5), ValueError, r'seed must be an integer'),
      ('fractional_batch', dict(batch_size=2.5), ValueError,
       r'batch_size must be an integer >= 1, got 2.5\.'),
      ('empty_batch', dict(batch_size=0), ValueError,
       r'batch_size must be an integer >= 1, got 0\.'))
  def test_bad_arguments_before_reading(self, change, error, message):
    """Refused up front: grain would fail at the first batch, or not."""
    kwargs = {'batch_size': 8, 'train': False, **change}
    with self.assertRaisesRegex(error, message):
      data.make_dataset('sact_shapes/tiny', 'test',
                        data_dir='/nonexistent', **kwargs)

  def test_image_size_must_be_its_own(self):
    _assert_batches_equal(self, _take(self.make(image_size=32), 1),
                          _take(self.make(), 1))
    with self.assertRaisesRegex(
        ValueError, r'image_size=64 does not match cifar10, whose images are '
        r'32x32\.'):
      self.make(image_size=64)


class ImagenetPipelineTest(parameterized.TestCase):
  """`imagenet2012` under mock_data: random images of random small sizes."""

  @parameterized.parameters((True, 224), (False, 224), (True, 64))
  def test_batches(self, train, image_size):
    with tfds.testing.mock_data(num_examples=16):
      ds = data.make_dataset(
          'imagenet2012', 'train' if train else 'validation', batch_size=4,
          train=train, image_size=None if image_size == 224 else image_size)
      batches = _take(ds, 2)
    for batch in batches:
      chex.assert_shape(batch['image'], (4, image_size, image_size, 3))
      self.assertEqual(batch['image'].dtype, np.float32)
      self.assertGreaterEqual(batch['image'].min(), -1)
      self.assertLessEqual(batch['image'].max(), 1)
      self.assertGreater(batch['image'].std(), 0.1)
      self.assertTrue(np.all((batch['label'] >= 0)
                             & (batch['label'] < 1000)))

  def test_eval_central_crop(self):
    """Eval keeps the central 87.5% (as tf.image.central_crop)."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[4:60, 4:60] = 255  # Exactly the central 56 = 64 * 0.875 pixels.
    out = pipeline._crop_resize_imagenet(image, None, train=False,
                                         image_size=56)
    np.testing.assert_array_equal(out, 255)

  def test_decodes_jpeg_bytes(self):
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    buffer = io.BytesIO()
    Image.new('RGB', (40, 30), (200, 100, 0)).save(buffer, format='JPEG')
    out = pipeline._crop_resize_imagenet(buffer.getvalue(), None,
                                         train=False, image_size=8)
    chex.assert_shape(out, (8, 8, 3))
    np.testing.assert_allclose(out[4, 4], (200, 100, 0), atol=3)

  def test_inception_crop_window(self):
    """As tf.image.sample_distorted_bounding_box with slim's settings."""
    rng = np.random.default_rng(0)
    windows = np.array([inception.crop_window(300, 400, rng)
                        for _ in range(2000)])
    top, left, h, w = windows.T
    self.assertTrue(np.all((top >= 0) & (top + h <= 300)))
    self.assertTrue(np.all((left >= 0) & (left + w <= 400)))
    # TF never draws the last offset of a window smaller than the image.
    self.assertTrue(np.all((top + h < 300) | (h == 300)))
    areas = h * w / (300 * 400)
    self.assertGreaterEqual(areas.min(), inception.MIN_OBJECT_COVERED)
    self.assertLessEqual(areas.max(), 1.0)
    self.assertTrue(np.all((w / h > 0.74) & (w / h < 1.34)))
    # TF's own windows (3000, same settings) had median area 0.361 and
    # quartiles 0.211 / 0.534: the height, not the area, is uniform.
    np.testing.assert_allclose(np.quantile(areas, [0.25, 0.5, 0.75]),
                               [0.211, 0.361, 0.534], atol=0.03)
    # No window fits: the whole image.
    self.assertEqual(inception.crop_window(1, 1, rng), (0, 0, 1, 1))


class InceptionVsTfTest(parameterized.TestCase):
  """`inception.py` against the TF ops the reference's preprocessing ran."""

  def test_eval_crop_and_resize(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    image = np.random.default_rng(1).integers(0, 256, (75, 100, 3),
                                              np.uint8)
    for size in (64, 224):  # Shrinking and enlarging.
      want = tf.compat.v1.image.resize_bilinear(
          tf.image.central_crop(tf.image.convert_image_dtype(
              image, tf.float32), 0.875)[None], [size, size],
          align_corners=False)[0].numpy()
      np.testing.assert_allclose(inception.eval_image(image, size) / 255,
                                 want, atol=1e-4)

  @parameterized.parameters(
      ('adjust_brightness', 0.1), ('adjust_contrast', 1.3),
      ('adjust_contrast', 0.6), ('adjust_saturation', 1.4),
      ('adjust_saturation', 0.6), ('adjust_hue', 0.15),
      ('adjust_hue', -0.2))
  def test_colour_steps(self, name, value):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    image = np.random.default_rng(2).uniform(
        0, 1, (16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(getattr(inception, name)(image, value),
                               getattr(tf.image, name)(image, value).numpy(),
                               atol=1e-5)

  def test_train_image(self):
    image = np.random.default_rng(3).integers(0, 256, (60, 80, 3), np.uint8)
    rng = np.random.default_rng(4)
    outs = [inception.train_image(image, rng, 32) for _ in range(8)]
    for out in outs:
      chex.assert_shape(out, (32, 32, 3))
      self.assertEqual(out.dtype, np.float32)
      self.assertBetween(out.min(), 0.0, 255.0)
      self.assertBetween(out.max(), 0.0, 255.0)
    self.assertGreater(np.abs(outs[0] - outs[1]).mean(), 1.0)  # Random.


class HelpersTest(parameterized.TestCase):

  def test_standardize_matches_tf_formula(self):
    """(x - mean) / max(std, 1/sqrt(H*W*C)), as tf per_image_standardization."""
    constant = np.full((1, 4, 4, 3), 7, np.uint8)
    np.testing.assert_array_equal(pipeline._standardize(constant), 0)
    # Values 0 and 1 in [0, 255] units: std 0.5 > 1 / sqrt(48).
    two = np.zeros((1, 4, 4, 3), np.uint8)
    two[0, :2] = 1
    np.testing.assert_allclose(pipeline._standardize(two),
                               (two - 0.5) / 0.5, atol=1e-6)
    # A tiny std is clamped to 1 / sqrt(num_elements).
    tiny = np.zeros((1, 10, 10, 1), np.float32)
    tiny[0, 0, 0] = 0.01
    mean = 0.01 / 100
    np.testing.assert_allclose(pipeline._standardize(tiny),
                               (tiny - mean) / 0.1, atol=1e-6)

  def test_pad_crop_flip_same_for_all_arrays(self):
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, (64, 8, 8, 3), dtype=np.uint8)
    image_out, mask_out = pipeline._pad_crop_flip(
        [image, image[..., 0]], np.random.default_rng(1))
    np.testing.assert_array_equal(image_out[..., 0], mask_out)
    # Some examples were shifted, some flipped, some padded with zeros.
    self.assertGreater((image_out == 0).any(axis=(1, 2, 3)).mean(), 0.3)
    flipped = [np.array_equal(o[2:6, 2:6], i[2:6, 2:6][:, ::-1])
               for o, i in zip(image_out, image)]
    self.assertTrue(any(flipped))

  def test_image_shape(self):
    self.assertEqual(data.image_shape('imagenet2012'), (224, 224, 3))
    self.assertEqual(data.image_shape('imagenet2012', 64), (64, 64, 3))
    self.assertEqual(data.image_shape('sact_shapes/tiny', 32), (32, 32, 3))
    self.assertEqual(data.image_shape('cifar10'), (32, 32, 3))
    with self.assertRaisesRegex(ValueError, 'image_size=224 does not match'):
      data.image_shape('sact_shapes', 224)
    for size in (-5, 0, 100.7, '64'):
      with self.assertRaisesRegex(ValueError,
                                  'image_size must be an integer >= 1'):
        data.image_shape('imagenet2012', size)
    self.assertEqual([n for n in data.SUPPORTED_DATASETS
                      if data.dataset_info(n).resizable], ['imagenet2012'])

  def test_class_names(self):
    self.assertEqual(data.dataset_info('sact_shapes/tiny').class_names,
                     shapes.CLASS_NAMES)
    cifar = data.dataset_info('cifar10')
    self.assertLen(cifar.class_names, cifar.num_classes)
    self.assertEqual(cifar.class_names[0], 'airplane')
    self.assertIsNone(data.dataset_info('imagenet2012').class_names)

  def test_preprocess_image_imagenet(self):
    """ImageNet models take [-1, 1], whatever the image size."""
    image = np.arange(5 * 7 * 3).reshape(5, 7, 3).astype(np.uint8)
    out = data.preprocess_image('imagenet', image)
    self.assertEqual(out.dtype, np.float32)
    np.testing.assert_array_equal(
        out, image.astype(np.float32) / np.float32(127.5) - 1)
    np.testing.assert_array_equal(
        data.preprocess_image('imagenet2012', image), out)
    with self.assertRaisesRegex(ValueError, 'Unknown dataset'):
      data.preprocess_image('resnet', image)

  def test_preprocess_image_takes_one_image(self):
    """A batch would be standardised over all its images, not per image."""
    for shape, message in (
        ((2, 4, 4, 3), r'one \[H, W, 3\] image, got shape \(2, 4, 4, 3\); '
                       r'for a batch, call it per image\.'),
        ((4, 4), r'got shape \(4, 4\)\.'),
        ((0, 4, 3), r'got shape \(0, 4, 3\)\.')):
      with self.subTest(shape=shape):
        with self.assertRaisesRegex(ValueError, message):
          data.preprocess_image('cifar', np.ones(shape, np.uint8))

  def test_dataset_info(self):
    info = data.dataset_info('sact_shapes')
    self.assertEqual((info.num_classes, info.image_shape), (6, (32, 32, 3)))
    self.assertEqual((info.num_train_examples, info.num_eval_examples),
                     (20_000, 2_000))
    tiny = data.dataset_info('sact_shapes/tiny')
    self.assertEqual((tiny.num_train_examples, tiny.num_eval_examples),
                     (128, 64))
    self.assertEqual(data.dataset_info('cifar10').num_classes, 10)
    self.assertEqual(data.dataset_info('imagenet2012').eval_split,
                     'validation')

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, 'cifar10, imagenet2012'):
      data.make_dataset('mnist', 'train', batch_size=1, train=True)
    with self.assertRaisesRegex(ValueError, 'sact_shapes'):
      data.dataset_info('cifar100')
    with self.assertRaisesRegex(ValueError, 'default, tiny'):
      data.dataset_info('sact_shapes/huge')


class NotPreparedTest(parameterized.TestCase):

  @parameterized.parameters('cifar10', 'imagenet2012')
  def test_clear_error_without_download(self, name):
    """Missing data fails fast with what to do; nothing is downloaded."""
    data_dir = _tempdir(self)
    start = time.perf_counter()
    with self.assertRaises(data.DatasetNotFoundError) as raised:
      data.make_dataset(name, 'train', batch_size=2, train=True,
                        data_dir=data_dir)
    self.assertLess(time.perf_counter() - start, 10)
    message = str(raised.exception)
    self.assertIn(repr(name), message)
    self.assertIn(data_dir, message)
    self.assertIn('manual_dir', message)
    self.assertIn(f'tfds build {name}', message)
    self.assertEqual(os.listdir(data_dir), [])  # Nothing downloaded.


class WithoutTensorflowTest(absltest.TestCase):

  def test_prepare_and_read_without_tensorflow(self):
    """The whole path runs in a process where TensorFlow cannot be imported."""
    code = textwrap.dedent("""
        import importlib.machinery, sys

        class NoTensorflow(importlib.machinery.PathFinder):
          @classmethod
          def find_spec(cls, name, path=None, target=None):
            if name.split('.')[0] == 'tensorflow':
              return None
            return super().find_spec(name, path, target)

        sys.meta_path[:] = [
            NoTensorflow if f is importlib.machinery.PathFinder else f
            for f in sys.meta_path]
        from sact_jax import data
        batch = next(iter(data.make_dataset(
            'sact_shapes/tiny', 'train', batch_size=8, train=True,
            data_dir=sys.argv[1])))
        assert batch['image'].shape == (8, 32, 32, 3), batch['image'].shape
        assert 'tensorflow' not in sys.modules
        print('OK')
        """)
    result = subprocess.run(
        [sys.executable, '-c', code, _tempdir(self)],
        capture_output=True, text=True, cwd=_REPO, timeout=120, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('OK', result.stdout)


if __name__ == '__main__':
  absltest.main()
