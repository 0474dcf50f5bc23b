"""Detection training end to end: train, resume, evaluate, restore, COCO."""

import json
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
from flax import nnx
import jax
import ml_collections
import numpy as np
import portpicker
import tensorflow_datasets as tfds

from sact_jax import checkpoint
from sact_jax import data
from sact_jax import models
from sact_jax.configs import detection as detection_config
from sact_jax.configs import validation
from sact_jax.data import detection as detection_data
from sact_jax.detection import evaluate as evaluate_lib
from sact_jax.detection import faster_rcnn
from sact_jax.detection import main_job
from sact_jax.detection import train as detection_train
import train_helpers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir: str, **changes):
  config = detection_config.get_config('sact,smoke')
  config.data_dir = data_dir
  for key, value in changes.items():
    config[key] = value
  return config


def _launch(test, launcher: str, *args: str) -> str:
  """Runs `python -m experiments.<launcher>` on the CPU; its stdout."""
  proc = subprocess.run(
      [sys.executable, '-m', f'experiments.{launcher}', *args],
      cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=600, check=False)
  test.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
  return proc.stdout


class DetectionMainJobTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    train_helpers.enable_compilation_cache()

  def test_launchers_train_evaluate_resume_restore(self):
    root = train_helpers.tempdir(self)
    data_dir = os.path.join(root, 'data')
    workdir = os.path.join(root, 'run')
    config = _config(data_dir, tau_warmup_steps=2)
    flags = ['--config=sact_jax/configs/detection.py:sact,smoke',
             f'--config.data_dir={data_dir}', '--config.tau_warmup_steps=2',
             f'--workdir={workdir}']
    _launch(self, 'train_detection', *flags, '--compilation_cache_dir=')
    with open(os.path.join(workdir, 'eval.json')) as f:
      metrics = json.load(f)
    for key in ('mAP', 'mAP@0.5', 'extractor_flops_percent', 'ponder_cost',
                'ponder_inside_outside_ratio', 'AP/disc'):
      self.assertIn(key, metrics)
    self.assertEqual(metrics['num_examples'], 32)
    self.assertEqual(metrics['image_size'], 64)
    self.assertBetween(metrics['mAP'], 0.0, 1.0)
    # SACT without halting yet: its heads' convs cost a little extra.
    self.assertBetween(metrics['extractor_flops_percent'], 90.0, 101.0)
    # Each extractor block ran between 1 and all of its units per position.
    self.assertLen(metrics['units_per_block'], 3)
    for ran, units in zip(metrics['units_per_block'], config.units):
      self.assertBetween(ran, 1.0, units)
    for name in ('config.json', 'detections.png', 'metrics.jsonl'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    steps = [r['step'] for r in records if 'rpn_objectness' in r]
    self.assertEqual(steps[-1], config.num_train_steps)
    self.assertTrue(any('eval/mAP' in r for r in records))
    # The ponder weight ramps up over the first 2 steps (means per log).
    taus = [r['tau'] for r in records if 'tau' in r]
    self.assertLess(taus[0], config.tau)
    self.assertAlmostEqual(taus[-1], config.tau, places=6)

    table = evaluate_lib.results_table([workdir])
    self.assertIn(f'| {metrics["mAP"]:.3f} | {metrics["mAP@0.5"]:.3f} | '
                  f'{metrics["mAP@0.75"]:.3f} |', table)
    self.assertIn(' / '.join(f'{u:.2f}' for u in metrics['units_per_block']),
                  table)
    self.assertLen(table.splitlines(), 3)
    self.assertIn(f'| {config.tau} (warm-up 2) | - | '
                  f'{config.num_train_steps} |', table)

    # The evaluation launcher measures the same model on the same images,
    # with the run's config.json.
    output = os.path.join(root, 'eval', 'again.json')
    stdout = _launch(self, 'evaluate_detection', f'--workdir={workdir}',
                     f'--output={output}', '--pictures=2')
    self.assertIn('mAP@[.5:.95]', stdout)
    with open(output) as f:
      again = json.load(f)
    self.assertAlmostEqual(again['mAP'], metrics['mAP'], places=6)
    self.assertEqual(again['extractor_flops_mean'],
                     metrics['extractor_flops_mean'])
    self.assertTrue(os.path.exists(os.path.join(root, 'eval',
                                                'detections.png')))

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
        # 0 is no size, not the dataset's (None).
        (dict(image_size=0), 'image_size must be None .* got 0'),
        (dict(image_size=48), 'image_size=48 does not match '
         'sact_detection/tiny, whose images are 64x64'),
        (dict(max_boxes=0), 'max_boxes must be None .* got 0'),
        (dict(num_detection_pictures=-1),
         'num_detection_pictures must be an integer >= 0, got -1'),
        (dict(num_detection_pictures=33),
         'num_detection_pictures: 33 images asked for, but the test split '
         'of sact_detection/tiny has 32'),
        (dict(num_eval_examples=33), 'num_eval_examples=33 is more than the '
         '32 images'),
    ):
      with self.assertRaisesRegex(validation.ConfigError, message):
        detection_train.validate_config(_config('/nonexistent', **change))
    for name, value, message in (
        ('anchor_scales', (), 'anchor_scales must be a non-empty'),
        ('anchor_ratios', (1.0, 0.0), 'anchor_ratios must be a non-empty'),
        ('anchor_base_size', -32.0, 'anchor_base_size must be > 0')):
      config = _config('/nonexistent')
      config.detector[name] = value
      with self.assertRaisesRegex(validation.ConfigError, message):
        detection_train.validate_config(config)
    # The largest sizes the split allows.
    detection_train.validate_config(_config(
        '/nonexistent', image_size=64, num_eval_examples=32,
        num_detection_pictures=32))
    # E.g. a classification run's config.json.
    with self.assertRaisesRegex(validation.ConfigError,
                                "no field 'dataset': is it a detection"):
      detection_train.validate_config(ml_collections.ConfigDict({'tau': 0.1}))

  def test_inputs_are_checked_before_anything_is_written(self):
    root = train_helpers.tempdir(self)
    workdir = os.path.join(root, 'run')
    for change, error, message in (
        (dict(data_dir='/proc/nope'), validation.ConfigError,
         "data_dir='/proc/nope' cannot be used for sact_detection/tiny"),
        (dict(dataset='coco/2017', num_detection_classes=80,
              data_dir=os.path.join(root, 'empty')),
         data.DatasetNotFoundError, "Dataset 'coco' is not prepared"),
        (dict(init_from=self._cifar_classifier(root)),
         checkpoint.CheckpointError, 'Cannot restore the source model'),
    ):
      data_dir = change.pop('data_dir', os.path.join(root, 'data'))
      with self.assertRaisesRegex(error, message):
        main_job.train_and_evaluate(_config(data_dir, **change), workdir)
      self.assertFalse(os.path.exists(workdir))

  def test_resuming_needs_no_init_from(self):
    """A resumed run reads its checkpoint: init_from may have moved."""
    root = train_helpers.tempdir(self)
    config = _config(os.path.join(root, 'data'),
                     init_from=os.path.join(root, 'gone'))
    with self.assertRaisesRegex(validation.ConfigError,
                                'is neither a sact_jax model checkpoint'):
      detection_train.validate_config(config, os.path.join(root, 'run'))
    with mock.patch.object(checkpoint, 'latest_run_step', return_value=3):
      detection_train.validate_config(config, os.path.join(root, 'run'))

  def _cifar_classifier(self, root: str) -> str:
    """A classifier the detector's backbone cannot start from."""
    path = os.path.join(root, 'cifar')
    spec = models.ModelSpec('cifar', (1, 1, 1), 'vanilla', num_classes=6,
                            base_channels=4)
    checkpoint.save_model(path, spec.create(nnx.Rngs(0)), spec)
    return path


# Run in a subprocess with 4 CPU devices: one detection step on a 4-device
# mesh and on a 1-device mesh, same state and batch; prints both metrics.
_DATA_PARALLEL_SCRIPT = r"""
import json, sys
import jax
import numpy as np
sys.path.insert(0, 'tests')
from sact_jax import parallel
from sact_jax.configs import detection as detection_config
from sact_jax.detection import evaluate as detection_evaluate
from sact_jax.detection import train as detection_train
config = detection_config.get_config('sact,smoke')
config.data_dir = sys.argv[1]
config.batch_size = 4
batch = next(iter(detection_train.make_train_dataset(config)))
out = {}
for n in (1, 4):
  mesh = parallel.make_mesh(jax.devices()[:n])
  trainer = detection_train.Trainer(config, mesh)
  state = trainer.init_state()
  state, metrics = trainer.train_step(
      state, parallel.shard_batch(batch, mesh, detection_train.BATCH_KEYS))
  out[n] = {k: float(np.mean(v)) for k, v in metrics.items()}
# Evaluation on the 4 devices: 13 images in batches of 6 (rounded up to 8
# rows, the last batch 5 of them padding) and of 8.
model = trainer.model(state)
config.num_eval_examples = 13
for size in (6, 8):
  config.eval_batch_size = size
  out[f'eval_{size}'] = detection_evaluate.evaluate_detector(
      model, config, verbose=False)
print(json.dumps(out))
"""


# One of 2 processes (jax.distributed) evaluating a fresh detector on 5
# images in global batches of 2: the hosts' shards hold 3 and 2 images, so
# host 1 runs out of batches first and must keep stepping with host 0.
_TWO_HOSTS_SCRIPT = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address=f'localhost:{sys.argv[2]}',
                           num_processes=2, process_id=int(sys.argv[3]))
from sact_jax.configs import detection as detection_config
from sact_jax.detection import evaluate as detection_evaluate
from sact_jax.detection import train as detection_train
from sact_jax import parallel
config = detection_config.get_config('sact,smoke')
config.data_dir = sys.argv[1]
config.eval_batch_size = 2
config.num_eval_examples = 5
trainer = detection_train.Trainer(config, parallel.make_mesh())
model = trainer.model(trainer.init_state())
metrics = detection_evaluate.evaluate_detector(model, config, verbose=False)
print(json.dumps([metrics['num_examples'], metrics['extractor_flops_mean']]))
"""


class DataParallelTest(absltest.TestCase):

  def test_two_hosts_evaluate_every_image_once(self):
    """Hosts with unequal shards step together; nothing hangs or drops."""
    data_dir = os.path.join(train_helpers.tempdir(self), 'data')
    config = _config(data_dir)
    # Prepared here once: two processes would both write it.
    next(iter(detection_train.make_train_dataset(config)))
    port = str(portpicker.pick_unused_port())
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    procs = [subprocess.Popen(
        [sys.executable, '-c', _TWO_HOSTS_SCRIPT, data_dir, port, str(i)],
        cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outputs = []
    try:
      for proc in procs:
        outputs.append(proc.communicate(timeout=600))
    finally:
      for proc in procs:
        proc.kill()
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs):
      self.assertEqual(proc.returncode, 0, stderr[-3000:])
      results.append(json.loads(stdout.strip().splitlines()[-1]))
    self.assertEqual(results[0], results[1])
    self.assertEqual(results[0][0], 5)

  def test_four_devices_compute_the_one_device_step(self):
    """BatchNorm statistics, sampling and losses are over the global batch.

    Only the order of float sums differs (the model and inputs are the
    same). Rounding can reorder near-tied proposals, which moves the box
    classifier's losses by ~1e-4 at most; a per-shard bug (statistics or
    targets of one shard) moves them by percents. The RPN's targets do not
    depend on the network: exactly equal.
    """
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=4')
    proc = subprocess.run(
        [sys.executable, '-c', _DATA_PARALLEL_SCRIPT,
         os.path.join(train_helpers.tempdir(self), 'data')],
        cwd=_REPO,
        env=env, capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out['1'], out['4']
    for key in ('loss', 'rpn_objectness', 'rpn_localization',
                'box_classification', 'box_localization', 'ponder_loss',
                'flops'):
      np.testing.assert_allclose(four[key], one[key], rtol=1e-3, err_msg=key)
    self.assertEqual(four['rpn_positives'], one['rpn_positives'])
    # Any eval batch size: every image once, padding rows dropped.
    by_6, by_8 = out['eval_6'], out['eval_8']
    self.assertEqual((by_6['num_examples'], by_8['num_examples']), (13, 13))
    for key in ('extractor_flops_mean', 'extractor_flops_std',
                'ponder_cost'):
      self.assertAlmostEqual(by_6[key], by_8[key], delta=1e-6 * abs(
          by_8[key]) + 1e-9, msg=key)


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
