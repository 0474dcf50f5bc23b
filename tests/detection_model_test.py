"""Faster R-CNN: targets, losses, post-processing, the model's passes."""

import dataclasses
import math
import os

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from sact_jax import checkpoint
from sact_jax import configs
from sact_jax import flops
from sact_jax import models
from sact_jax.detection import backbone
from sact_jax.detection import faster_rcnn
from sact_jax.detection import losses
from sact_jax.detection import postprocess
from sact_jax.detection import targets
from sact_jax.detection import train as detection_train
import train_helpers

POS, NEG, IGN = targets.POSITIVE, targets.NEGATIVE, targets.IGNORED


def _detector(model_type='sact', **kwargs):
  spec = models.ModelSpec('imagenet', (1, 1, 2, 1), model_type, 6,
                          base_channels=4)
  settings = dict(
      backbone=spec, num_classes=3, anchor_base_size=32.0,
      anchor_scales=(0.5, 1.0), anchor_ratios=(1.0,), rpn_channels=16,
      rpn_batch_size=32, pre_nms_top_k=64, train_proposals=16,
      eval_proposals=16, box_batch_size=8, max_detections_per_class=4,
      max_detections=6, tau=0.01)
  settings.update(kwargs)
  return faster_rcnn.DetectorConfig(**settings)


def _batch(num_images=3, size=64):
  boxes = np.zeros((num_images, 3, 4), np.float32)
  labels = np.full((num_images, 3), -1, np.int32)
  boxes[0, :2] = [[0.1, 0.1, 0.45, 0.4], [0.5, 0.55, 0.9, 0.95]]
  labels[0, :2] = [0, 2]
  # Image 1 has no objects; image 2 one object partly outside the image
  # and one degenerate box (ignored).
  boxes[2, :2] = [[0.6, -0.2, 1.2, 0.3], [0.3, 0.3, 0.3, 0.5]]
  labels[2, :2] = [1, 1]
  image = np.random.default_rng(0).normal(
      size=(num_images, size, size, 3)).astype(np.float32)
  for i in range(num_images):  # Bright objects, so the loss can fall.
    for box in boxes[i][labels[i] >= 0]:
      y0, x0, y1, x1 = np.clip(box * size, 0, size).astype(int)
      image[i, y0:y1, x0:x1] += 2.0
  return {k: jnp.asarray(v) for k, v in dict(
      image=image, boxes=boxes, labels=labels,
      crowd=np.zeros((num_images, 3), bool)).items()}


class TargetsTest(parameterized.TestCase):

  def test_match_hand_worked(self):
    candidates = jnp.array([
        [0, 0, 10, 10],    # IoU 1 with gt 0: positive.
        [0, 0, 10, 20],    # IoU 0.5 with gt 0: ignored.
        [0, 0, 10, 50],    # IoU 0.2: negative.
        [50, 50, 60, 60],  # Nothing: negative.
        [20, 20, 30, 24],  # Best for gt 1 (IoU 0.4): forced positive.
    ], jnp.float32)
    gt = jnp.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 99, 99]],
                   jnp.float32)
    valid = jnp.array([True, True, False])
    matched, labels = targets.match(candidates, gt, valid, positive_iou=0.7,
                                    negative_iou=0.3)
    np.testing.assert_array_equal(labels, [POS, IGN, NEG, NEG, IGN])
    np.testing.assert_array_equal(matched[:2], [0, 0])
    matched, labels = targets.match(candidates, gt, valid, positive_iou=0.7,
                                    negative_iou=0.3, force_match=True)
    np.testing.assert_array_equal(labels, [POS, IGN, NEG, NEG, POS])
    self.assertEqual(int(matched[4]), 1)

  @parameterized.named_parameters(('plain', False), ('forced', True))
  def test_no_ground_truth_means_all_negative(self, force):
    candidates = jnp.array([[0, 0, 10, 10], [5, 5, 9, 9]], jnp.float32)
    for gt, valid in ((jnp.zeros((0, 4)), jnp.zeros((0,), bool)),
                      (jnp.array([[0, 0, 10, 10.]]), jnp.array([False]))):
      matched, labels = targets.match(candidates, gt, valid,
                                      positive_iou=0.7, negative_iou=0.3,
                                      force_match=force)
      np.testing.assert_array_equal(labels, [NEG, NEG])
      chex.assert_shape(matched, (2,))

  @parameterized.parameters((4, 20, 16), (40, 60, 16), (0, 5, 16))
  def test_sample_counts(self, num_pos, num_neg, batch):
    labels = jnp.array([POS] * num_pos + [NEG] * num_neg + [IGN] * 7)
    for seed in range(3):
      taken = targets.sample(labels, jax.random.key(seed), batch_size=batch,
                             positive_fraction=0.5)
      pos = int(jnp.sum(taken & (labels == POS)))
      neg = int(jnp.sum(taken & (labels == NEG)))
      self.assertEqual(pos, min(num_pos, batch // 2))
      self.assertEqual(neg, min(num_neg, batch - pos))
      self.assertFalse(bool(jnp.any(taken & (labels == IGN))))

  def test_sample_depends_on_key(self):
    labels = jnp.array([NEG] * 100)
    a = targets.sample(labels, jax.random.key(0), batch_size=10,
                       positive_fraction=0.5)
    b = targets.sample(labels, jax.random.key(1), batch_size=10,
                       positive_fraction=0.5)
    self.assertFalse(bool(jnp.all(a == b)))


class LossesTest(absltest.TestCase):

  def test_rpn_loss_hand_worked(self):
    logits = jnp.array([[0.0, 2.0, -1.0, 5.0]])
    codes = jnp.array([[[0.5, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 0],
                        [9, 9, 9, 9]]])
    target = jnp.zeros((1, 4, 4))
    positive = jnp.array([[True, True, False, False]])
    sampled = jnp.array([[True, True, True, False]])
    out = losses.rpn_loss(logits, codes, target, positive, sampled)

    def bce(x, y):
      return math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x))
    self.assertAlmostEqual(float(out['rpn_objectness']),
                           (bce(0, 1) + bce(2, 1) + bce(-1, 0)) / 3, 5)
    # Huber(0.5) = 0.125, Huber(2) = 1.5; over the 3 sampled anchors.
    self.assertAlmostEqual(float(out['rpn_localization']), 1.625 / 3, 5)

  def test_box_classifier_loss_hand_worked(self):
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8],
                                 [0.2, 0.4, 0.4]]]))
    codes = jnp.zeros((1, 3, 2, 4)).at[0, 1, 1, 0].set(3.0).at[
        0, 1, 0, 0].set(100.0)
    classes = jnp.array([[0, 2, 1]])
    target = jnp.zeros((1, 3, 4))
    sampled = jnp.array([[True, True, False]])
    out = losses.box_classifier_loss(logits, codes, classes, target, sampled)
    self.assertAlmostEqual(float(out['box_classification']),
                           -(math.log(0.5) + math.log(0.8)) / 2, 5)
    # Only class 2's codes (index 1) of the positive region: Huber(3) = 2.5.
    self.assertAlmostEqual(float(out['box_localization']), 2.5 / 2, 5)

  def test_nothing_sampled_is_finite_zero(self):
    out = losses.box_classifier_loss(
        jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 3, 4)),
        jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3, 4)),
        jnp.zeros((2, 3), bool))
    for value in out.values():
      self.assertEqual(float(value), 0.0)


class PostprocessTest(absltest.TestCase):

  def test_per_class_nms_hand_worked(self):
    boxes = jnp.array([
        [[0, 0, 10, 10], [0, 0, 10, 10]],
        [[1, 1, 10, 10], [50, 50, 60, 60]],
        [[30, 30, 40, 40], [0, 0, 5, 5]],
    ], jnp.float32)
    scores = jnp.array([[0.9, 0.05], [0.8, 0.7], [0.3, 0.6]])
    out = postprocess.per_class_nms(
        boxes, scores, jnp.array([True, True, False]), score_threshold=0.1,
        iou_threshold=0.5, max_per_class=3, max_total=4)
    # Class 0: region 0 (0.9) suppresses region 1; region 2 is not valid.
    # Class 1: region 1 (0.7); region 0 is below the threshold.
    np.testing.assert_allclose(out['scores'], [0.9, 0.7, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(out['classes'], [0, 1, 0, 0])
    np.testing.assert_array_equal(out['valid'], [True, True, False, False])
    np.testing.assert_array_equal(out['boxes'][1], [50, 50, 60, 60])


class FasterRCNNTest(parameterized.TestCase):

  @parameterized.parameters('vanilla', 'act', 'sact')
  def test_loss_and_gradients_are_finite(self, model_type):
    config = _detector(model_type)
    model = faster_rcnn.create(config)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
      return faster_rcnn.loss_and_metrics(m, _batch(), jax.random.key(0),
                                          config)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        loss_fn, has_aux=True))(params)
    self.assertTrue(bool(jnp.isfinite(loss)))
    for leaf in jax.tree.leaves(grads):
      self.assertTrue(bool(jnp.all(jnp.isfinite(leaf))))
    chex.assert_shape(metrics['flops'], (3,))
    # Image 0's two objects and image 2's one get RPN positives.
    self.assertGreater(float(metrics['rpn_positives']), 0)
    self.assertGreater(float(metrics['box_positives']), 0)
    grad_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(
        nnx.state(nnx.merge(graphdef, grads, rest).rpn_conv)))
    self.assertGreater(grad_norm, 0)

  def test_training_steps_reduce_the_loss(self):
    config = _detector('sact')
    model = faster_rcnn.create(config)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = _batch()

    @jax.jit
    def step(params, rest, key):
      def loss_fn(params):
        m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        loss, metrics = faster_rcnn.loss_and_metrics(m, batch, key, config)
        return metrics['detection_loss'], nnx.split(m, nnx.Param, ...)[2]
      (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), rest, loss

    losses_seen = []
    for i in range(12):
      params, rest, loss = step(params, rest, jax.random.key(i % 2))
      losses_seen.append(float(loss))
    self.assertLess(np.mean(losses_seen[-3:]), 0.8 * np.mean(losses_seen[:3]))

  @parameterized.parameters((None, 0.02), (0, 0.0), (25, 0.005), (100, 0.02),
                            (400, 0.02))
  def test_tau_warmup(self, step, expected_tau):
    config = _detector('sact', tau=0.02, tau_warmup_steps=100)
    model = faster_rcnn.create(config)
    model.train()
    loss, metrics = faster_rcnn.loss_and_metrics(
        model, _batch(), jax.random.key(0), config, step)
    self.assertAlmostEqual(float(metrics['tau']), expected_tau, places=7)
    self.assertGreater(float(metrics['ponder_loss']), 0)
    np.testing.assert_allclose(
        loss, metrics['detection_loss'] + expected_tau * metrics['ponder_loss'],
        rtol=1e-6)

  def test_detect_shapes_and_boxes_inside_the_image(self):
    config = _detector('sact')
    model = faster_rcnn.create(config)
    model.eval()
    images = _batch()['image']
    detections, aux = faster_rcnn.detect(model, images, config)
    chex.assert_shape(detections['boxes'], (3, 6, 4))
    chex.assert_shape([detections['scores'], detections['classes'],
                       detections['valid']], (3, 6))
    b = detections['boxes']
    self.assertTrue(bool(jnp.all((b >= 0) & (b <= 64))))
    self.assertTrue(bool(jnp.all(
        (detections['classes'] >= 0) & (detections['classes'] < 3))))
    self.assertEqual(len(aux['ponder_cost']), 3)

  def test_extractor_equals_the_classifiers_first_blocks(self):
    config = _detector('sact')
    model = faster_rcnn.create(config)
    model.eval()
    images = _batch()['image']
    features, _ = backbone.extract_features(model.backbone, images, 3)
    counter = flops.FlopCounter()
    x = model.backbone.stem(images, counter)
    for block in list(model.backbone.blocks)[:3]:
      x, _ = block(x, counter)
    np.testing.assert_allclose(features, x, rtol=1e-6, atol=1e-6)
    chex.assert_shape(features, (3, 4, 4, 64))

  def test_vanilla_extractor_flops(self):
    config = _detector('vanilla')
    model = faster_rcnn.create(config)
    model.eval()
    _, aux = backbone.extract_features(model.backbone, _batch()['image'], 3)
    self.assertEqual(faster_rcnn.vanilla_extractor_flops(config, 64),
                     int(aux['flops'][0]))

  def test_anchor_outputs_line_up(self):
    config = _detector('vanilla')
    self.assertEqual(config.stride, 16)
    self.assertEqual(config.feature_size(70), 5)
    anchors = config.anchors(64)
    chex.assert_shape(anchors, (16 * 2, 4))
    # Anchor (i * w + j) * A + k is centred on position (i, j).
    centre = (anchors[2 * 5 + 1, :2] + anchors[2 * 5 + 1, 2:]) / 2
    np.testing.assert_allclose(centre, [16 * 1 + 8, 16 * 1 + 8])

  @parameterized.named_parameters(
      ('cifar_family', dict(backbone=models.ModelSpec('cifar', (1, 1, 1),
                                                      'sact', 6))),
      ('no_box_classifier_block', dict(feature_blocks=4)),
      ('odd_crop', dict(crop_size=7)),
      ('iou_order', dict(rpn_negative_iou=0.8)),
      ('negative_tau', dict(tau=-1.0)),
      ('negative_warmup', dict(tau_warmup_steps=-1)),
      ('no_anchor_scales', dict(anchor_scales=())),
      ('zero_anchor_scale', dict(anchor_scales=(0.0, 1.0))),
      ('no_anchor_ratios', dict(anchor_ratios=())),
      ('negative_anchor_ratio', dict(anchor_ratios=(-1.0, 1.0))),
      ('nan_anchor_ratio', dict(anchor_ratios=(math.nan,))),
      ('zero_anchor_base_size', dict(anchor_base_size=0.0)),
      ('infinite_anchor_base_size', dict(anchor_base_size=math.inf)))
  def test_bad_settings_are_refused(self, change):
    with self.assertRaises(ValueError):
      _detector(**change)

  @parameterized.named_parameters(
      # Each of these used to be accepted and silently change training or
      # detection (or fail deep inside JAX).
      ('three_loss_weights', dict(loss_weights=(1.0, 2.0, 1.0)),
       r'loss_weights needs 4 finite weights >= 0 .*got \(1.0, 2.0, 1.0\)'),
      ('negative_loss_weight', dict(loss_weights=(1.0, -2.0, 1.0, 2.0)),
       r'loss_weights needs 4'),
      ('box_positive_iou_above_1', dict(box_positive_iou=1.5),
       r'box_positive_iou must lie in \[0, 1\], got 1.5\.'),
      ('rpn_nms_iou_above_1', dict(rpn_nms_iou=1.5), r'rpn_nms_iou must lie'),
      ('negative_detection_nms_iou', dict(detection_nms_iou=-0.1),
       r'detection_nms_iou must lie'),
      ('score_threshold_1', dict(score_threshold=1.0),
       r'score_threshold must lie in \[0, 1\), got 1.0\.'),
      ('box_positive_percentage', dict(box_positive_fraction=25),
       r'box_positive_fraction must lie'),
      ('rpn_positive_fraction_above_1', dict(rpn_positive_fraction=1.5),
       r'rpn_positive_fraction must lie'),
      ('nan_tau', dict(tau=math.nan), r'tau must be a finite number'),
      ('fractional_warmup', dict(tau_warmup_steps=2.5),
       r'tau_warmup_steps must be an integer >= 0, got 2.5\.'),
      ('fractional_num_classes', dict(num_classes=2.5),
       r'num_classes must be an integer >= 1, got 2.5\.'),
      ('float_crop_size', dict(crop_size=4.0), r'crop_size must be an integer'),
      ('float_feature_blocks', dict(feature_blocks=2.0),
       r'feature_blocks must be an integer'),
      ('string_batch_size', dict(rpn_batch_size='16'),
       r"rpn_batch_size must be an integer >= 1, got '16'\."),
      ('string_iou', dict(box_positive_iou='0.5'),
       r"box_positive_iou must lie in \[0, 1\], got '0.5'\."))
  def test_bad_settings_are_refused_with_the_value(self, change, message):
    with self.assertRaisesRegex(ValueError, message):
      _detector(**change)

  def test_backbone_must_be_a_model_spec(self):
    spec = _detector().backbone
    with self.assertRaisesRegex(TypeError,
                                r'backbone must be a models.ModelSpec .*dict'):
      _detector(backbone=spec.to_dict())


class ConfigFileTest(parameterized.TestCase):

  @parameterized.parameters('detection.py:sact,smoke', 'detection.py:vanilla',
                            'coco_detection.py:sact')
  def test_every_detector_field_can_be_set_on_the_command_line(self, arg):
    """Even those the config file leaves at DetectorConfig's defaults."""
    path = os.path.join(os.path.dirname(configs.__file__), arg)
    argv = ['prog', f'--config={path}', '--config.detector.rpn_nms_iou=0.6',
            '--config.detector.loss_weights=(1.0, 1.0, 1.0, 1.0)']
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                    sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    fields = {f.name for f in dataclasses.fields(faster_rcnn.DetectorConfig)}
    self.assertEqual(set(config.detector) | {'backbone', 'num_classes', 'tau',
                                             'tau_warmup_steps'}, fields)
    detector = faster_rcnn.DetectorConfig.from_config(config)
    self.assertEqual(detector.rpn_nms_iou, 0.6)
    self.assertEqual(detector.loss_weights, (1.0,) * 4)
    self.assertEqual(detector.tau, config.tau)


class InitFromClassifierTest(parameterized.TestCase):

  @parameterized.parameters(('sact', 'sact', True), ('vanilla', 'sact', False),
                            ('vanilla', 'vanilla', False))
  def test_backbone_restored(self, source_type, detector_type, heads):
    config = _detector(detector_type)
    source_spec = models.ModelSpec('imagenet', (1, 1, 2, 1), source_type, 6,
                                   base_channels=4)
    source = source_spec.create(nnx.Rngs(7))
    directory = train_helpers.tempdir(self) + '/model'
    checkpoint.save_model(directory, source, source_spec)
    detector = faster_rcnn.create(config)
    before = jax.tree.map(jnp.copy, nnx.state(detector.backbone))
    report = detection_train.init_backbone(detector, directory)
    self.assertTrue(any('logits' in p for p in report.skipped))
    np.testing.assert_array_equal(
        detector.backbone.stem_conv.kernel[...], source.stem_conv.kernel[...])
    restored_heads = [p for p in report.restored if 'head' in p]
    self.assertEqual(bool(restored_heads), heads)
    # The logits layer is left as initialised.
    np.testing.assert_array_equal(detector.backbone.logits.kernel[...],
                                  before['logits']['kernel'][...])


if __name__ == '__main__':
  absltest.main()
