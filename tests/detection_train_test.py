"""Detection training end to end: train, resume, evaluate, restore, COCO data."""

import json
import os

from absl.testing import absltest
import jax
import numpy as np
import tensorflow_datasets as tfds

from sact_jax.configs import detection as detection_config
from sact_jax.configs import validation
from sact_jax.data import detection as detection_data
from sact_jax.detection import evaluate as evaluate_lib
from sact_jax.detection import faster_rcnn
from sact_jax.detection import main_job
from sact_jax.detection import train as detection_train
import train_helpers


def _config(data_dir: str, **changes):
  config = detection_config.get_config('sact,smoke')
  config.data_dir = data_dir
  for key, value in changes.items():
    config[key] = value
  return config


class DetectionMainJobTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    train_helpers.enable_compilation_cache()

  def test_train_evaluate_resume_restore(self):
    root = train_helpers.tempdir(self)
    data_dir = os.path.join(root, 'data')
    workdir = os.path.join(root, 'run')
    config = _config(data_dir)
    metrics = main_job.train_and_evaluate(config, workdir)
    for key in ('mAP', 'mAP@0.5', 'extractor_flops_percent', 'ponder_cost',
                'ponder_inside_outside_ratio', 'AP/disc'):
      self.assertIn(key, metrics)
    self.assertEqual(metrics['num_examples'], 32)
    self.assertEqual(metrics['image_size'], 64)
    self.assertBetween(metrics['mAP'], 0.0, 1.0)
    # SACT without halting yet: its heads' convs cost a little extra.
    self.assertBetween(metrics['extractor_flops_percent'], 90.0, 101.0)
    with open(os.path.join(workdir, 'eval.json')) as f:
      self.assertEqual(json.load(f)['num_examples'], 32)
    for name in ('config.json', 'detections.png', 'metrics.jsonl'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    steps = [r['step'] for r in records if 'rpn_objectness' in r]
    self.assertEqual(steps[-1], config.num_train_steps)
    self.assertTrue(any('eval/mAP' in r for r in records))

    # Resuming a finished run trains no further step.
    result = detection_train.train(config, workdir)
    self.assertEqual(int(result.state.step), config.num_train_steps)
    # The restored detector detects as the trained one.
    restored = detection_train.restore_detector(config, workdir)
    a = evaluate_lib.detection_examples(result.model, config, 4)
    b = evaluate_lib.detection_examples(restored, config, 4)
    np.testing.assert_allclose(a['detections']['scores'],
                               b['detections']['scores'], atol=1e-6)
    self.assertEqual(a['ponder_maps'].shape[0], 4)

  def test_another_model_in_the_workdir_is_refused(self):
    root = train_helpers.tempdir(self)
    workdir = os.path.join(root, 'run')
    config = _config(os.path.join(root, 'data'), num_train_steps=2,
                     num_detection_pictures=0, eval_every_steps=0)
    detection_train.train(config, workdir)
    other = _config(os.path.join(root, 'data'), model_type='vanilla')
    with self.assertRaisesRegex(validation.ConfigError,
                                'holds a checkpoint of a different model'):
      detection_train.validate_config(other, workdir)

  def test_bad_configs_are_one_line_errors(self):
    for change, message in (
        (dict(num_detection_classes=3), 'num_detection_classes=3 does not'),
        (dict(dataset='voc'), 'Unknown detection dataset'),
        (dict(image_size=8), 'image_size=8'),
        (dict(batch_size=0), 'batch_size must be a positive integer'),
    ):
      with self.assertRaisesRegex(validation.ConfigError, message):
        detection_train.validate_config(_config('/nonexistent', **change))


class CocoStepTest(absltest.TestCase):

  def test_a_training_step_on_mock_coco(self):
    """The coco/2017 reading path feeds the detector (80 classes)."""
    config = _config('/nonexistent', dataset='coco/2017', image_size=64,
                     max_boxes=10, num_detection_classes=80, batch_size=2)
    detection_train.validate_config(config)
    with tfds.testing.mock_data(num_examples=4):
      batch = next(iter(detection_train.make_train_dataset(config)))
    trainer = detection_train.Trainer(config, jax.sharding.Mesh(
        np.array(jax.devices()[:1]), ('data',)))
    state = trainer.init_state()
    batch = {k: batch[k] for k in detection_train.BATCH_KEYS}
    state, metrics = trainer.train_step(state, batch)
    self.assertTrue(bool(metrics['finite']))
    self.assertEqual(int(state.step), 1)
    self.assertEqual(detection_data.detection_info('coco/2017').num_classes,
                     80)
    self.assertEqual(trainer.detector.num_classes, 80)
    self.assertIsInstance(trainer.detector, faster_rcnn.DetectorConfig)


if __name__ == '__main__':
  absltest.main()
