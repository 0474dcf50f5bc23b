"""Detection building blocks: boxes, anchors, NMS, crop-and-resize."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import flops as flops_lib
from sact_jax.detection import anchors
from sact_jax.detection import backbone
from sact_jax.detection import boxes
from sact_jax.detection import nms as nms_lib
from sact_jax.detection import roi
import testing_utils as tu


def _random_boxes(rng, n, size=100.0):
  corners = rng.uniform(0, size, size=(n, 2, 2))
  lo, hi = corners.min(axis=1), corners.max(axis=1) + 1.0
  return jnp.asarray(np.concatenate([lo, hi], axis=-1), jnp.float32)


class BoxesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('overlap', (0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),
      ('identical', (0, 0, 2, 3), (0, 0, 2, 3), 1.0),
      ('disjoint', (0, 0, 1, 1), (2, 2, 3, 3), 0.0),
      ('touching', (0, 0, 1, 1), (1, 0, 2, 1), 0.0),
      ('inside', (0, 0, 4, 4), (1, 1, 2, 2), 1 / 16),
      ('degenerate', (0, 0, 0, 2), (0, 0, 2, 2), 0.0),
      ('both_degenerate', (1, 1, 1, 1), (1, 1, 1, 1), 0.0),
      ('inverted', (2, 2, 0, 0), (0, 0, 2, 2), 0.0),
  )
  def test_iou_hand_worked(self, a, b, expected):
    got = boxes.iou(jnp.array([a], jnp.float32), jnp.array([b], jnp.float32))
    chex.assert_shape(got, (1, 1))
    self.assertAlmostEqual(float(got[0, 0]), expected, places=6)

  def test_iou_matrix_is_symmetric_and_bounded(self):
    b = _random_boxes(np.random.default_rng(0), 20)
    m = boxes.iou(b, b)
    chex.assert_shape(m, (20, 20))
    np.testing.assert_allclose(m, m.T, atol=1e-7)
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=1e-6)
    self.assertTrue(bool(jnp.all((m >= 0) & (m <= 1))))

  def test_encode_hand_worked_and_round_trip(self):
    anchor = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    box = jnp.array([[5.0, 0.0, 15.0, 20.0]])
    # Centre (10, 10) vs (5, 5): ty = 10 * 5 / 10, tx = 10 * 5 / 10;
    # h = 10: th = 0; w = 20: tw = 5 log 2.
    np.testing.assert_allclose(boxes.encode(box, anchor),
                               [[5.0, 5.0, 0.0, 5 * math.log(2)]], rtol=1e-6)
    rng = np.random.default_rng(1)
    b, a = _random_boxes(rng, 50), _random_boxes(rng, 50)
    np.testing.assert_allclose(boxes.decode(boxes.encode(b, a), a), b,
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(boxes.encode(a, a), 0.0, atol=1e-5)

  def test_degenerate_boxes_and_huge_codes_stay_finite(self):
    anchor = jnp.array([[0.0, 0.0, 10.0, 10.0]] * 2)
    degenerate = jnp.array([[3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 4.0, 4.0]])
    self.assertTrue(bool(jnp.all(jnp.isfinite(
        boxes.encode(degenerate, anchor)))))
    decoded = boxes.decode(jnp.full((2, 4), 1e4), anchor)
    self.assertTrue(bool(jnp.all(jnp.isfinite(decoded))))

  def test_clip(self):
    clipped = boxes.clip(jnp.array([[-5.0, 2.0, 30.0, 50.0]]), 20, 40)
    np.testing.assert_array_equal(clipped, [[0.0, 2.0, 20.0, 40.0]])


class AnchorsTest(absltest.TestCase):

  def test_grid(self):
    a = anchors.grid_anchors((3, 4))
    chex.assert_shape(a, (3 * 4 * 12, 4))
    # Position (0, 0), scale 1 (index 2), ratio 1 (index 1): a 256 square.
    np.testing.assert_allclose(a[2 * 3 + 1], [-128, -128, 128, 128])
    # Ratio 2 (width / height): h = 256 / sqrt 2, w = 256 sqrt 2.
    h, w = 256 / math.sqrt(2), 256 * math.sqrt(2)
    np.testing.assert_allclose(a[2 * 3 + 2], [-h / 2, -w / 2, h / 2, w / 2],
                               rtol=1e-6)
    # Position (1, 2) is centred at (16, 32) pixels, 12 anchors per position.
    centre = a[(1 * 4 + 2) * 12:(1 * 4 + 3) * 12]
    np.testing.assert_allclose((centre[:, 0] + centre[:, 2]) / 2, 16.0)
    np.testing.assert_allclose((centre[:, 1] + centre[:, 3]) / 2, 32.0)


def _nms_reference(b, s, k, threshold):
  b, s = np.asarray(b), np.asarray(s)
  order, keep = list(np.argsort(-s, kind='stable')), []
  while order and len(keep) < k:
    best = order.pop(0)
    keep.append(best)
    ious = np.asarray(boxes.iou(jnp.asarray(b[best:best + 1]),
                                jnp.asarray(b[order])))[0] if order else []
    order = [o for o, v in zip(order, ious) if v <= threshold]
  return keep


class NmsTest(absltest.TestCase):

  def test_hand_worked(self):
    b = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30],
                   [0, 0, 10, 10]], jnp.float32)
    s = jnp.array([0.9, 0.8, 0.7, 0.95])
    indices, valid = nms_lib.nms(b, s, 4, iou_threshold=0.5)
    self.assertEqual(np.asarray(indices)[np.asarray(valid)].tolist(), [3, 2])
    self.assertEqual(np.asarray(valid).tolist(), [True, True, False, False])
    # B's IoU with A/D is 81 / 119 = 0.68: kept at a threshold above it.
    indices, valid = nms_lib.nms(b, s, 4, iou_threshold=0.7)
    self.assertEqual(np.asarray(indices)[np.asarray(valid)].tolist(),
                     [3, 1, 2])

  def test_matches_greedy_reference_under_jit_and_vmap(self):
    rng = np.random.default_rng(2)
    b = jnp.stack([_random_boxes(rng, 40, size=30.0) for _ in range(3)])
    s = jnp.asarray(rng.uniform(size=(3, 40)), jnp.float32)
    fn = jax.jit(jax.vmap(lambda b, s: nms_lib.nms(b, s, 10,
                                                   iou_threshold=0.5)))
    indices, valid = fn(b, s)
    chex.assert_shape([indices, valid], (3, 10))
    for i in range(3):
      got = np.asarray(indices[i])[np.asarray(valid[i])].tolist()
      self.assertEqual(got, _nms_reference(b[i], s[i], 10, 0.5))

  def test_score_threshold_nan_and_no_boxes(self):
    b = jnp.array([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], jnp.float32)
    s = jnp.array([0.2, jnp.nan, 0.6])
    indices, valid = nms_lib.nms(b, s, 3, score_threshold=0.3)
    self.assertEqual(np.asarray(valid).tolist(), [True, False, False])
    self.assertEqual(int(indices[0]), 2)
    indices, valid = nms_lib.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 2)
    self.assertEqual(np.asarray(valid).tolist(), [False, False])


def _crop_reference(features, box, size, extrapolation=0.0):
  """tf.image.crop_and_resize for one box, by its definition, in loops."""
  height, width, channels = features.shape
  out = np.zeros(size + (channels,))
  y1, x1, y2, x2 = box
  for i in range(size[0]):
    y = ((y1 * (height - 1) + i * (y2 - y1) * (height - 1) / (size[0] - 1))
         if size[0] > 1 else 0.5 * (y1 + y2) * (height - 1))
    for j in range(size[1]):
      x = ((x1 * (width - 1) + j * (x2 - x1) * (width - 1) / (size[1] - 1))
           if size[1] > 1 else 0.5 * (x1 + x2) * (width - 1))
      if not (0 <= y <= height - 1 and 0 <= x <= width - 1):
        out[i, j] = extrapolation
        continue
      y0, x0 = int(math.floor(y)), int(math.floor(x))
      y1i, x1i = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
      dy, dx = y - y0, x - x0
      out[i, j] = ((1 - dy) * ((1 - dx) * features[y0, x0]
                               + dx * features[y0, x1i])
                   + dy * ((1 - dx) * features[y1i, x0]
                           + dx * features[y1i, x1i]))
  return out


class CropAndResizeTest(parameterized.TestCase):

  @parameterized.parameters(((7, 7),), ((3, 5),), ((1, 1),))
  def test_matches_direct_bilinear(self, size):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(9, 11, 4)).astype(np.float32)
    box_list = [(0.1, 0.2, 0.7, 0.9), (0.0, 0.0, 1.0, 1.0),
                (0.5, 0.5, 0.5, 0.5),       # A point.
                (0.8, 0.9, 0.2, 0.1),       # Flipped: sampled backwards.
                (-0.3, 0.4, 0.6, 1.4)]      # Partly outside the map.
    got = roi.crop_and_resize(jnp.asarray(features),
                              jnp.asarray(box_list, jnp.float32), size,
                              extrapolation_value=-1.0)
    chex.assert_shape(got, (len(box_list),) + size + (4,))
    for k, box in enumerate(box_list):
      np.testing.assert_allclose(
          got[k], _crop_reference(features, box, size, -1.0), rtol=1e-5,
          atol=1e-5, err_msg=str(box))


class BackboneTest(parameterized.TestCase):
  """Extractor + box classifier = the classifier, split after block k."""

  @parameterized.parameters('vanilla', 'act', 'sact')
  def test_split_reproduces_the_classifier(self, model_type):
    model = tu.build('imagenet', (1, 2, 2, 1), model_type, seed=7,
                     base_channels=4)
    model.eval()
    for head in tu.heads(model):  # Some positions halt early, some not.
      bias = tu.halting_bias(head)
      bias[...] = jnp.full(bias.shape, 1.0, jnp.float32)
    images = tu.images((2, 45, 37, 3), seed=8)  # Not a multiple of 32.
    logits, aux = model(images)
    features, f_aux = backbone.extract_features(model, images)
    # Stride 16 after block 3, SAME padding: ceil(45 / 16) x ceil(37 / 16).
    chex.assert_shape(features, (2, 3, 3, 4 * 4 * 4))
    out, r_aux = backbone.classify_regions(model, features)
    counter = flops_lib.FlopCounter()
    np.testing.assert_allclose(model.head(out, counter), logits, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(
        f_aux['flops'] + r_aux['flops'] + counter.per_image(2),
        aux['flops'], rtol=1e-6)
    self.assertLen(f_aux['num_units'], 3 if model_type != 'vanilla' else 0)
    for got, want in zip(f_aux['num_units'] + r_aux['num_units'],
                         aux['num_units']):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(f_aux['ponder_loss'] + r_aux['ponder_loss'],
                               aux['ponder_loss'], rtol=1e-6)
    if model_type == 'sact':  # Ponder maps at the feature map's size.
      chex.assert_shape(f_aux['ponder_cost'][-1], (2, 3, 3))

  def test_bad_split(self):
    model = tu.build('imagenet', (1, 1, 1, 1), 'vanilla', base_channels=4)
    images = tu.images((1, 32, 32, 3))
    for bad in (0, 5):
      with self.assertRaisesRegex(ValueError, r'num_blocks must lie in'):
        backbone.extract_features(model, images, bad)


if __name__ == '__main__':
  absltest.main()
