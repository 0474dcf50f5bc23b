"""Tests of the generated detection dataset and the detection pipelines."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sact_jax import data
from sact_jax.data import detection
from sact_jax.data import detection_shapes
from sact_jax.data import pipeline
from sact_jax.data import shapes

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config's generation arguments.
_TINY = {'image_size': 64, 'min_radius': 5.0, 'max_radius': 9.0}


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


def _pixel_edges(boxes_Kx4: np.ndarray, size: int) -> np.ndarray:
  """Boxes on pixel edges as integer pixels (asserting that they are)."""
  pixels_Kx4 = np.asarray(boxes_Kx4, np.float64) * size
  edges_Kx4 = np.round(pixels_Kx4).astype(int)
  np.testing.assert_allclose(pixels_Kx4, edges_Kx4, atol=1e-3)
  return edges_Kx4


def _assert_tight_boxes(test, boxes_Mx4, labels_M, mask_SxS):
  """Each box is on pixel edges, and tight: the mask touches its 4 sides.

  Also, no mask pixel lies outside all boxes.

  Args:
    test: the test case.
    boxes_Mx4: one image's boxes, padding included.
    labels_M: their labels (-1: padding).
    mask_SxS: the image's mask of all objects.
  """
  size = mask_SxS.shape[0]
  mask_SxS = np.asarray(mask_SxS).astype(bool)
  covered_SxS = np.zeros_like(mask_SxS)
  for y0, x0, y1, x1 in _pixel_edges(boxes_Mx4[labels_M >= 0], size):
    test.assertTrue(0 <= y0 < y1 <= size and 0 <= x0 < x1 <= size)
    inside = mask_SxS[y0:y1, x0:x1]
    test.assertTrue(inside[0].any() and inside[-1].any())
    test.assertTrue(inside[:, 0].any() and inside[:, -1].any())
    covered_SxS[y0:y1, x0:x1] = True
  test.assertFalse((mask_SxS & ~covered_SxS).any())


def _assert_padding_consistent(test, boxes_BxMx4, labels_BxM):
  """-1 labels exactly on the zero boxes, which come after the others."""
  padding_BxM = labels_BxM < 0
  np.testing.assert_array_equal(padding_BxM, ~boxes_BxMx4.any(axis=-1))
  np.testing.assert_array_equal(padding_BxM, np.sort(padding_BxM, axis=1))
  test.assertTrue(np.all(labels_BxM >= -1))


class GenerateExamplesTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Past one generation chunk (256).
    cls.examples = detection_shapes.generate_examples(300, seed=0)

  def test_shapes_and_dtypes(self):
    ex = self.examples
    chex.assert_shape(ex['image'], (300, 96, 96, 3))
    chex.assert_shape(ex['boxes'], (300, 4, 4))
    chex.assert_shape(ex['labels'], (300, 4))
    chex.assert_shape(ex['mask'], (300, 96, 96))
    self.assertEqual(ex['image'].dtype, np.uint8)
    self.assertEqual(ex['boxes'].dtype, np.float32)
    self.assertEqual(ex['labels'].dtype, np.int64)
    self.assertEqual(ex['mask'].dtype, np.uint8)
    self.assertSetEqual(set(np.unique(ex['mask'])), {0, 1})

  def test_deterministic_per_seed(self):
    """Same seed, same data; another seed, other data."""
    a = detection_shapes.generate_examples(20, seed=7, **_TINY)
    b = detection_shapes.generate_examples(20, seed=7, **_TINY)
    c = detection_shapes.generate_examples(20, seed=8, **_TINY)
    chex.assert_trees_all_equal(a, b)
    for key in a:
      self.assertFalse(np.array_equal(a[key], c[key]), key)
    chex.assert_shape(a['image'], (20, 64, 64, 3))

  def test_chunks_differ(self):
    ex = self.examples
    self.assertFalse(np.array_equal(ex['image'][:44], ex['image'][256:]))

  def test_empty(self):
    ex = detection_shapes.generate_examples(0, seed=0)
    chex.assert_shape(ex['image'], (0, 96, 96, 3))
    chex.assert_shape(ex['boxes'], (0, 4, 4))

  def test_boxes_are_tight_around_the_objects(self):
    ex = self.examples
    self.assertTrue(np.all((ex['boxes'] >= 0) & (ex['boxes'] <= 1)))
    for boxes, labels, mask in zip(ex['boxes'], ex['labels'], ex['mask']):
      _assert_tight_boxes(self, boxes, labels, mask)

  def test_labels_and_padding(self):
    ex = self.examples
    _assert_padding_consistent(self, ex['boxes'], ex['labels'])
    labels = ex['labels'][ex['labels'] >= 0]
    self.assertTrue(np.all(labels < detection_shapes.NUM_CLASSES))
    # All classes, none rare.
    self.assertGreater(np.bincount(labels).min(), len(labels) / 12)
    self.assertLen(np.bincount(labels), detection_shapes.NUM_CLASSES)

  def test_objects_per_image_span_1_to_4(self):
    count_N = (self.examples['labels'] >= 0).sum(axis=1)
    np.testing.assert_array_equal(np.unique(count_N), [1, 2, 3, 4])

  def test_objects_are_inside_and_of_their_sizes(self):
    """Objects are 10 to 32 pixels across, clear of the image border."""
    ex = self.examples
    edges_Kx4 = _pixel_edges(ex['boxes'][ex['labels'] >= 0], 96)
    sides_Kx2 = edges_Kx4[:, 2:] - edges_Kx4[:, :2]
    self.assertGreaterEqual(sides_Kx2.max(axis=1).min(), 10)
    self.assertLessEqual(sides_Kx2.max(), 32)
    self.assertGreaterEqual(edges_Kx4.min(), 1)
    self.assertLessEqual(edges_Kx4.max(), 95)
    np.testing.assert_array_equal(ex['mask'][:, [0, -1]], 0)
    np.testing.assert_array_equal(ex['mask'][:, :, [0, -1]], 0)

  def test_objects_stand_out(self):
    """One object: flat colour under the mask, far from the band around it."""
    ex = self.examples
    single_N = (ex['labels'] >= 0).sum(axis=1) == 1
    self.assertGreater(single_N.sum(), 30)
    for image, mask in zip(ex['image'][single_N].astype(np.float32),
                           ex['mask'][single_N].astype(bool)):
      grown = np.zeros_like(mask)
      for dy in range(-2, 3):
        for dx in range(-2, 3):
          grown |= np.roll(mask, (dy, dx), axis=(0, 1))
      band = grown & ~mask
      # Only the added pixel noise (sigma 0.03 * 255 = 7.7) varies inside.
      self.assertLess(image[mask].std(axis=0).mean(), 9.5)
      contrast = np.linalg.norm(image[mask].mean(0) - image[band].mean(0))
      self.assertGreater(contrast, 80)

  def test_tight_boxes_by_hand(self):
    mask = np.zeros((2, 10, 8), bool)
    mask[0, 2:5, 3:8] = True
    mask[0, 9, 0] = True
    boxes, present = detection_shapes.tight_boxes(mask)
    np.testing.assert_array_equal(present, [True, False])
    np.testing.assert_array_equal(
        np.round(boxes * [10, 8, 10, 8]).astype(int),
        [[2, 0, 10, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(boxes[1], 0)

  def test_bad_radii(self):
    with self.assertRaisesRegex(ValueError, 'max_radius'):
      detection_shapes.generate_examples(1, 0, image_size=32, max_radius=14)


class BuilderTest(parameterized.TestCase):

  def test_prepare_and_read_back(self):
    """tfds prepares `sact_detection/tiny`; data_source returns the data."""
    data_dir = _tempdir(self)
    builder = tfds.builder('sact_detection/tiny', data_dir=data_dir,
                           file_format='array_record')
    builder.download_and_prepare()
    for split, size in (('train', 64), ('test', 32)):
      source = tfds.data_source('sact_detection/tiny', split=split,
                                data_dir=data_dir, download=False)
      self.assertLen(source, size)
      expected = detection_shapes.generate_examples(
          size, detection_shapes.SPLIT_SEEDS[split], **_TINY)
      ids = []
      for example in source:
        i = int(example['image/id'])
        ids.append(i)
        for key, value in expected.items():
          np.testing.assert_array_equal(example[key], value[i])
          self.assertEqual(example[key].dtype, value.dtype)
      self.assertCountEqual(ids, range(size))

  def test_split_seeds_are_not_those_of_sact_shapes(self):
    self.assertEmpty(set(detection_shapes.SPLIT_SEEDS.values())
                     & set(shapes.SPLIT_SEEDS.values()))


class SactDetectionPipelineTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    # Prepared on first use.
    data.make_detection_dataset('sact_detection/tiny', 'test', batch_size=1,
                                train=False, data_dir=cls.data_dir)
    cls.stored = {
        split: {int(ex['image/id']): ex for ex in tfds.data_source(
            'sact_detection/tiny', split=split, data_dir=cls.data_dir)}
        for split in ('train', 'test')}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir)
    super().tearDownClass()

  def make(self, split='train', **kwargs):
    kwargs = {'batch_size': 16, 'train': True, **kwargs}
    return data.make_detection_dataset('sact_detection/tiny', split,
                                       data_dir=self.data_dir, **kwargs)

  @parameterized.parameters(True, False)
  def test_batches(self, train):
    batch = _take(self.make(train=train), 1)[0]
    self.assertSetEqual(set(batch), {'image', 'boxes', 'labels', 'crowd',
                                     'image_id', 'mask'})
    chex.assert_shape(batch['image'], (16, 64, 64, 3))
    chex.assert_shape(batch['boxes'], (16, 4, 4))
    chex.assert_shape([batch['labels'], batch['crowd']], (16, 4))
    chex.assert_shape(batch['image_id'], (16,))
    chex.assert_shape(batch['mask'], (16, 64, 64))
    for key, dtype in (('image', np.float32), ('boxes', np.float32),
                       ('labels', np.int32), ('crowd', bool),
                       ('image_id', np.int64), ('mask', np.float32)):
      self.assertEqual(batch[key].dtype, dtype, key)
    np.testing.assert_allclose(batch['image'].mean(axis=(1, 2, 3)), 0,
                               atol=1e-5)
    np.testing.assert_allclose(batch['image'].std(axis=(1, 2, 3)), 1,
                               atol=1e-5)
    self.assertTrue(np.all((batch['labels'] >= -1) & (batch['labels'] < 6)))
    self.assertFalse(batch['crowd'].any())
    _assert_padding_consistent(self, batch['boxes'], batch['labels'])

  def test_eval_is_the_stored_data(self):
    """Eval: no flips, deterministic, every example once, last batch kept."""
    batches = list(self.make('test', batch_size=10, train=False))
    self.assertEqual([len(b['image_id']) for b in batches], [10, 10, 10, 2])
    _assert_batches_equal(
        self, batches, list(self.make('test', batch_size=10, train=False)))
    ids = np.concatenate([b['image_id'] for b in batches])
    self.assertCountEqual(ids.tolist(), range(32))
    for batch in batches:
      for row, i in enumerate(batch['image_id']):
        example = self.stored['test'][int(i)]
        np.testing.assert_array_equal(
            batch['image'][row],
            pipeline._standardize(example['image'][None])[0])
        np.testing.assert_array_equal(batch['boxes'][row], example['boxes'])
        np.testing.assert_array_equal(batch['labels'][row], example['labels'])
        np.testing.assert_array_equal(batch['mask'][row], example['mask'])

  def test_standardised_as_sact_shapes(self):
    """A classifier's input normalisation: that of `sact_shapes`."""
    batch = _take(self.make('test', batch_size=2, train=False), 1)[0]
    example = self.stored['test'][int(batch['image_id'][0])]
    np.testing.assert_array_equal(
        data.preprocess_image('sact_shapes', example['image']),
        batch['image'][0])

  def test_flip_moves_boxes_and_mask_with_the_image(self):
    flips = []
    for batch in _take(self.make(seed=5), 4):
      for row, i in enumerate(batch['image_id']):
        example = self.stored['train'][int(i)]
        flip = not np.array_equal(batch['mask'][row], example['mask'])
        flips.append(flip)
        step = -1 if flip else 1
        np.testing.assert_array_equal(batch['mask'][row],
                                      example['mask'][:, ::step])
        np.testing.assert_array_equal(
            batch['image'][row],
            pipeline._standardize(example['image'][None, :, ::step])[0])
        np.testing.assert_array_equal(batch['labels'][row], example['labels'])
        # The mask under each (flipped) box is still tight inside it.
        _assert_tight_boxes(self, batch['boxes'][row], batch['labels'][row],
                            batch['mask'][row])
        valid = example['labels'] >= 0
        y0, x0, y1, x1 = _pixel_edges(example['boxes'][valid], 64).T
        if flip:
          x0, x1 = 64 - x1, 64 - x0
        np.testing.assert_array_equal(
            _pixel_edges(batch['boxes'][row][valid], 64),
            np.stack([y0, x0, y1, x1], axis=1))
    self.assertBetween(np.mean(flips), 0.2, 0.8)

  def test_same_seed_same_batches(self):
    _assert_batches_equal(self, _take(self.make(seed=3), 3),
                          _take(self.make(seed=3), 3))
    a, b = _take(self.make(seed=3), 1)[0], _take(self.make(seed=4), 1)[0]
    self.assertFalse(np.array_equal(a['image_id'], b['image_id']))

  def test_iterator_state_resumes_exactly(self):
    iterator = iter(self.make())
    next(iterator)
    state = json.loads(json.dumps(data.get_iterator_state(iterator)))
    expected = [next(iterator) for _ in range(5)]  # Crosses an epoch.
    restored = iter(self.make())
    data.set_iterator_state(restored, state)
    _assert_batches_equal(self, [next(restored) for _ in range(5)], expected)

  def test_shards_are_disjoint_and_cover_the_data(self):
    def ids(**kwargs):
      batches = self.make('test', train=False, **kwargs)
      return [int(i) for b in batches for i in b['image_id']]

    shard_0, shard_1 = ids(shard_index=0, shard_count=2), ids(
        shard_index=1, shard_count=2)
    self.assertLen(shard_0, 16)
    self.assertCountEqual(shard_0 + shard_1, range(32))

  @parameterized.parameters(2, 6)
  def test_max_boxes(self, max_boxes):
    """Fewer rows keep the largest boxes (in order); more rows pad."""
    batches = list(self.make('test', batch_size=32, train=False,
                             max_boxes=max_boxes))
    (batch,) = batches
    chex.assert_shape(batch['boxes'], (32, max_boxes, 4))
    chex.assert_shape([batch['labels'], batch['crowd']], (32, max_boxes))
    _assert_padding_consistent(self, batch['boxes'], batch['labels'])
    for row, i in enumerate(batch['image_id']):
      example = self.stored['test'][int(i)]
      valid = np.flatnonzero(example['labels'] >= 0)
      edges = _pixel_edges(example['boxes'][valid], 64)
      area = np.prod(edges[:, 2:] - edges[:, :2], axis=1)
      kept = np.sort(valid[np.argsort(-area, kind='stable')[:max_boxes]])
      n = len(kept)
      np.testing.assert_array_equal(batch['boxes'][row, :n],
                                    example['boxes'][kept])
      np.testing.assert_array_equal(batch['labels'][row, :n],
                                    example['labels'][kept])
      np.testing.assert_array_equal(batch['labels'][row, n:], -1)

  def test_image_size_must_be_its_own(self):
    _assert_batches_equal(self, _take(self.make(image_size=64), 1),
                          _take(self.make(), 1))
    with self.assertRaisesRegex(
        ValueError, r'image_size=96 does not match sact_detection/tiny, '
        r'whose images are 64x64; leave it unset\.'):
      self.make(image_size=96)


class InfoTest(parameterized.TestCase):

  def test_detection_info(self):
    info = data.detection_info('sact_detection')
    self.assertEqual(info, data.detection_info('sact_detection/default'))
    self.assertEqual((info.num_classes, info.image_size, info.max_boxes),
                     (6, 96, 4))
    self.assertEqual(info.class_names, data.CLASS_NAMES)
    self.assertEqual((info.num_train_examples, info.num_eval_examples),
                     (5_000, 500))
    self.assertEqual((info.train_split, info.eval_split), ('train', 'test'))
    tiny = data.detection_info('sact_detection/tiny')
    self.assertEqual((tiny.image_size, tiny.num_train_examples,
                      tiny.num_eval_examples), (64, 64, 32))
    coco = data.detection_info('coco/2017')
    self.assertEqual((coco.num_classes, coco.image_size, coco.max_boxes),
                     (80, 640, 100))
    self.assertLen(coco.class_names, 80)
    self.assertLen(set(coco.class_names), 80)
    self.assertEqual((coco.class_names[0], coco.class_names[-1]),
                     ('person', 'toothbrush'))
    self.assertEqual(coco.eval_split, 'validation')
    self.assertEqual(data.DETECTION_DATASETS, ('sact_detection', 'coco/2017'))

  @parameterized.parameters('cifar10', 'coco', 'coco/2014', 'mnist')
  def test_unknown_dataset(self, name):
    with self.assertRaisesRegex(ValueError, 'sact_detection, coco/2017'):
      data.detection_info(name)
    with self.assertRaisesRegex(ValueError, 'Unknown detection dataset'):
      data.make_detection_dataset(name, 'train', batch_size=1, train=True)

  def test_unknown_config(self):
    with self.assertRaisesRegex(ValueError, 'default, tiny'):
      data.detection_info('sact_detection/huge')

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'shard_index'):
      data.make_detection_dataset('coco/2017', 'train', batch_size=1,
                                  train=True, shard_index=1, shard_count=1)
    with self.assertRaisesRegex(ValueError, 'max_boxes >= 1'):
      data.make_detection_dataset('coco/2017', 'train', batch_size=1,
                                  train=True, max_boxes=0)
    with self.assertRaisesRegex(TypeError, 'train must be True or False'):
      data.make_detection_dataset('coco/2017', 'train', batch_size=1,
                                  train='no')
    with self.assertRaisesRegex(ValueError, 'seed must be an integer'):
      data.make_detection_dataset('coco/2017', 'train', batch_size=1,
                                  train=True, seed=-1)


class CocoPipelineTest(parameterized.TestCase):
  """`coco/2017` under `tfds.testing.mock_data`: random images and boxes."""

  @parameterized.parameters((True, 64, 5), (False, 64, 5), (True, None, None))
  def test_batches(self, train, image_size, max_boxes):
    with tfds.testing.mock_data(num_examples=8):
      batches = _take(data.make_detection_dataset(
          'coco/2017', 'train' if train else 'validation', batch_size=4,
          train=train, image_size=image_size, max_boxes=max_boxes), 2)
    size, m = image_size or 640, max_boxes or 100
    for batch in batches:
      self.assertSetEqual(set(batch), {'image', 'boxes', 'labels', 'crowd',
                                       'image_id'})
      chex.assert_shape(batch['image'], (4, size, size, 3))
      chex.assert_shape(batch['boxes'], (4, m, 4))
      chex.assert_shape([batch['labels'], batch['crowd']], (4, m))
      chex.assert_shape(batch['image_id'], (4,))
      for key, dtype in (('image', np.float32), ('boxes', np.float32),
                         ('labels', np.int32), ('crowd', bool),
                         ('image_id', np.int64)):
        self.assertEqual(batch[key].dtype, dtype, key)
      self.assertGreaterEqual(batch['image'].min(), -1)
      self.assertLessEqual(batch['image'].max(), 1)
      _assert_padding_consistent(self, batch['boxes'], batch['labels'])
      valid = batch['labels'] >= 0
      self.assertTrue(valid.any())
      self.assertTrue(np.all(batch['labels'][valid] < 80))
      self.assertFalse(batch['crowd'][~valid].any())
      for image, boxes, row_valid in zip(batch['image'], batch['boxes'],
                                         valid):
        # The image part: what is not padding (-1 in all channels).
        content = (image != -1).any(axis=-1)
        height = np.flatnonzero(content.any(axis=1)).max() + 1
        width = np.flatnonzero(content.any(axis=0)).max() + 1
        self.assertEqual(max(height, width), size)  # The longer side.
        self.assertFalse(content[height:].any() or content[:, width:].any())
        boxes = boxes[row_valid]
        self.assertTrue(np.all(boxes[:, 2:] > boxes[:, :2]))
        self.assertTrue(np.all(boxes >= 0))
        self.assertTrue(np.all(boxes[:, 2] <= height / size + 1e-6))
        self.assertTrue(np.all(boxes[:, 3] <= width / size + 1e-6))

  def test_letterbox(self):
    """Longer side to S, aspect kept, padded; boxes follow, flips too."""
    image = np.zeros((40, 20, 3), np.uint8)
    image[:] = (200, 100, 0)
    boxes = np.array([[0.25, 0.5, 0.75, 1.0]], np.float32)
    for flip, expected in ((False, [0.25, 0.25, 0.75, 0.5]),
                           (True, [0.25, 0.0, 0.75, 0.25])):
      out, out_boxes = detection._letterbox(image, boxes, image_size=80,
                                            flip=flip)
      chex.assert_shape(out, (80, 80, 3))
      np.testing.assert_array_equal(out[:, :40], np.broadcast_to(
          image[0, 0], (80, 40, 3)))
      np.testing.assert_array_equal(out[:, 40:], 0)
      np.testing.assert_allclose(out_boxes, [expected], atol=1e-6)

  def test_letterbox_decodes_bytes(self):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    boxes = np.zeros((0, 4), np.float32)
    from_bytes, _ = detection._letterbox(buffer.getvalue(), boxes,
                                         image_size=60, flip=False)
    from_array, _ = detection._letterbox(image, boxes, image_size=60,
                                         flip=False)
    np.testing.assert_array_equal(from_bytes, from_array)
    np.testing.assert_array_equal(from_array[36:], 0)  # 30 * 60 / 50 = 36.

  def test_fit_boxes(self):
    """Empty boxes dropped; of more than M, the largest, in input order."""
    boxes = np.array([[0, 0, 0.5, 0.5],  # Area 0.25.
                      [0, 0, 0, 0.5],  # Empty.
                      [0, 0, 0.1, 0.1],  # 0.01.
                      [0.5, 0.5, 1, 0.9],  # 0.2.
                      [0.2, 0.2, 0.2, 0.2]], np.float32)  # Empty.
    labels, crowd = np.array([1, 2, 3, 4, 5]), np.array([0, 0, 1, 1, 0], bool)
    out_boxes, out_labels, out_crowd = detection._fit_boxes(boxes, labels,
                                                            crowd, 2)
    np.testing.assert_array_equal(out_boxes, boxes[[0, 3]])
    np.testing.assert_array_equal(out_labels, [1, 4])
    np.testing.assert_array_equal(out_crowd, [False, True])
    out_boxes, out_labels, out_crowd = detection._fit_boxes(boxes, labels,
                                                            crowd, 4)
    np.testing.assert_array_equal(out_boxes[:3], boxes[[0, 2, 3]])
    np.testing.assert_array_equal(out_boxes[3], 0)
    np.testing.assert_array_equal(out_labels, [1, 3, 4, -1])
    np.testing.assert_array_equal(out_crowd, [False, True, True, False])
    self.assertEqual((out_boxes.dtype, out_labels.dtype), (np.float32,
                                                           np.int32))
    # No boxes at all: all padding.
    out_boxes, out_labels, _ = detection._fit_boxes(
        np.zeros((0, 4)), np.zeros(0, int), np.zeros(0, bool), 3)
    np.testing.assert_array_equal(out_boxes, np.zeros((3, 4)))
    np.testing.assert_array_equal(out_labels, [-1] * 3)

  def test_clear_error_without_data(self):
    """Missing COCO fails fast with the build command; nothing downloaded."""
    data_dir = _tempdir(self)
    start = time.perf_counter()
    with self.assertRaises(data.DatasetNotFoundError) as raised:
      data.make_detection_dataset('coco/2017', 'train', batch_size=2,
                                  train=True, data_dir=data_dir)
    self.assertLess(time.perf_counter() - start, 30)
    message = str(raised.exception)
    self.assertIn("Dataset 'coco' is not prepared", message)
    self.assertIn(data_dir, message)
    self.assertIn('tfds build coco/2017 --data_dir=DATA_DIR '
                  '--file_format=array_record', message)
    self.assertEqual(os.listdir(data_dir), [])


class WithoutTensorflowTest(absltest.TestCase):

  def test_prepare_and_read_without_tensorflow(self):
    """Generation and the pipeline run where TensorFlow cannot be imported."""
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
        batch = next(iter(data.make_detection_dataset(
            'sact_detection/tiny', 'train', batch_size=8, train=True,
            data_dir=sys.argv[1])))
        assert batch['boxes'].shape == (8, 4, 4), batch['boxes'].shape
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
