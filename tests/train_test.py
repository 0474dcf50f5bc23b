"""Tests of the training system: loss, optimizer, loop, checkpoints, errors.

Runs tiny SACT models (a few thousand parameters) on synthetic batches or on
the 128-image `sact_shapes/tiny` split, so every test trains for real in
seconds. Multi-device runs are in `multidevice_test.py`.
"""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from unittest import mock
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
from tensorboardX.proto import event_pb2

from sact_jax import checkpoint
from sact_jax import evaluate
from sact_jax import loop
from sact_jax import losses
from sact_jax import main_job
from sact_jax import optimizers
from sact_jax import parallel
from sact_jax import train
from sact_jax.configs import cifar10
from sact_jax.configs import default
from sact_jax.configs import imagenet
from sact_jax.configs import validation
import train_helpers

_CACHE_DIR = train_helpers.enable_compilation_cache()
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_dir() -> str:
  """One prepared `sact_shapes/tiny` for the whole module."""
  global _DATA_DIR
  if _DATA_DIR is None:
    import tempfile  # pylint: disable=g-import-not-at-top
    _DATA_DIR = tempfile.mkdtemp(prefix='sact_train_test_data_')
  return _DATA_DIR
_DATA_DIR = None


def _config(**overrides):
  return train_helpers.tiny_config(_data_dir(), **overrides)


def _saved_state(workdir: str, step: int | None = None
                 ) -> tuple[int, dict[str, np.ndarray], dict]:
  """(step, flat state, data iterator position) of a checkpoint on disk."""
  with checkpoint.run_manager(workdir, read_only=True) as manager, \
      warnings.catch_warnings():
    # Restoring without a target reads the shardings from the checkpoint,
    # which orbax warns about; fine for reading values back here.
    warnings.simplefilter('ignore', UserWarning)
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore()))['state']
  flat, _ = jax.tree_util.tree_flatten_with_path(restored)
  arrays = {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}
  with open(os.path.join(workdir, train.CHECKPOINT_DIR, str(step), 'data',
                         'process_0-of-1.json')) as f:
    position = json.load(f)
  return step, arrays, position


def _assert_flat_equal(test, actual, expected, rtol=0.0, atol=0.0):
  test.assertEqual(sorted(actual), sorted(expected))
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol,
                               atol=atol, err_msg=key)


class LossTest(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.1)
  def test_cross_entropy_matches_formula(self, smoothing):
    """Smoothed targets are onehot * (1 - s) + s / K, as TF's loss."""
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = jnp.array([0, 2])
    log_p = jax.nn.log_softmax(logits)
    targets = jax.nn.one_hot(labels, 3) * (1 - smoothing) + smoothing / 3
    expected = -jnp.mean(jnp.sum(targets * log_p, axis=-1))
    chex.assert_trees_all_close(
        losses.cross_entropy(logits, labels, smoothing), expected, rtol=1e-6)

  def test_weight_decay_covers_kernels_only(self):
    """slim's l2_regularizer: wd * sum(w^2) / 2 over conv/dense kernels."""
    params = train.Trainer.create(_config(), parallel.make_mesh()).init_state(
    ).params
    kernels = [v[...] for p, v in nnx.to_flat_state(params)
               if p[-1] == 'kernel']
    # Stem, 2 convs per unit (4 units), halting local + global convs of the
    # one scanned step, logits.
    self.assertLen(kernels, 1 + 2 * 4 + 2 + 1)
    expected = 0.5 * 1e-3 * sum(float(jnp.sum(k**2)) for k in kernels)
    self.assertAlmostEqual(
        float(losses.weight_decay_penalty(params, 1e-3)), expected, places=5)
    # BatchNorm scales and biases are not decayed.
    for path, variable in nnx.to_flat_state(params):
      if path[-1] in ('scale', 'bias'):
        variable[...] = variable[...] + 100.0
    self.assertAlmostEqual(
        float(losses.weight_decay_penalty(params, 1e-3)), expected, places=5)

  def test_learning_rate_schedule_is_tf_piecewise_constant(self):
    """The boundary step itself still uses the previous rate."""
    config = cifar10.get_config('sact_32')
    schedule = optimizers.learning_rate_schedule(config)
    steps = jnp.array([0, 60_000, 60_001, 75_000, 75_001, 90_001, 99_999])
    np.testing.assert_allclose(
        schedule(steps), [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001],
        rtol=1e-6)


  def test_learning_rate_schedule_is_tf_staircase_exponential_decay(self):
    """The reference's ImageNet rate drops at the multiple itself."""
    config = imagenet.get_config('sact_101')
    config.lr_decay_steps = 100
    schedule = optimizers.learning_rate_schedule(config)
    steps = jnp.array([0, 99, 100, 199, 200, 299, 300])
    np.testing.assert_allclose(
        schedule(steps), [0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-4, 5e-5],
        rtol=1e-6)


class EmaTest(parameterized.TestCase):

  @parameterized.parameters(0.9, 0.999, 0.9999)
  def test_average_of_a_constant_is_that_constant(self, decay):
    value = jax.random.normal(jax.random.key(0), (3, 5))
    ema = value
    for n in range(1, 30):
      ema = optimizers.ema_update(ema, value, decay, n)
    np.testing.assert_array_equal(ema, value)

  def test_tf_decay_schedule(self):
    """decay_n = min(decay, (1 + n) / (10 + n)), as TF's num_updates."""
    ema, expected = jnp.zeros(()), 0.0
    for n, x in enumerate([1.0, 2.0, 3.0], start=1):
      ema = optimizers.ema_update(ema, jnp.asarray(x), 0.5, n)
      d = min(0.5, (1 + n) / (10 + n))
      expected = d * expected + (1 - d) * x
    np.testing.assert_allclose(ema, expected, rtol=1e-6)

  def test_bad_decay_refused(self):
    with self.assertRaisesRegex(validation.ConfigError,
                                'ema_decay must lie in'):
      validation.validate_config(_config(ema_decay=1.0))


class TrainStepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = _config(lr_boundaries=(), lr_scales=(), tau=0.01)
    cls.mesh = parallel.make_mesh()
    cls.trainer = train.Trainer.create(config, cls.mesh)

  def test_loss_decreases(self):
    """SGD steps on one fixed batch fit it: the loss falls by a third."""
    state = self.trainer.init_state()
    batch = parallel.shard_batch(train_helpers.synthetic_batches(1)[0],
                              self.mesh)
    losses = []
    for _ in range(8):
      state, metrics = self.trainer.train_step(state, batch)
      losses.append(float(metrics['loss']))
    self.assertEqual(int(state.step), 8)
    self.assertLess(losses[-1], 0.67 * losses[0], losses)
    self.assertTrue(all(np.isfinite(losses)))

  def test_loss_terms_and_metrics(self):
    """loss = CE + tau * ponder + decay; the halting heads get gradients."""
    state = self.trainer.init_state()
    heads_before = nnx.to_flat_state(nnx.state(
        self.trainer.model(state), checkpoint.HALTING_HEADS))
    heads_before = {p: np.array(v[...]) for p, v in heads_before}
    batch = parallel.shard_batch(train_helpers.synthetic_batches(1)[0],
                              self.mesh)
    state, m = self.trainer.train_step(state, batch)
    m = jax.tree.map(float, m)
    self.assertAlmostEqual(
        m['loss'],
        m['cross_entropy'] + 0.01 * m['ponder_loss'] + m['weight_decay_loss'],
        places=5)
    # A fresh SACT network uses every unit: 2 + 1 + 1 units, and a
    # remainder of ~1 - h at each of the 3 blocks' last unit.
    self.assertBetween(m['ponder_loss'], 4.0, 7.0)
    self.assertAlmostEqual(m['learning_rate'], 0.1, places=6)
    self.assertEqual(m['finite'], 1.0)
    self.assertBetween(m['accuracy'], 0.0, 1.0)
    self.assertIn('ponder_cost/block_2', m)
    changed = [
        p for p, v in nnx.to_flat_state(nnx.state(
            self.trainer.model(state), checkpoint.HALTING_HEADS))
        if p[-1] == 'kernel' and not np.allclose(v[...], heads_before[p])]
    self.assertNotEmpty(changed)


class _Killed(Exception):
  """A process dying at a chosen point."""


def _metric_rows(workdir: str) -> list[tuple[int, str]]:
  """(step, 'train' or 'eval') of every row of the run's metrics.jsonl."""
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  return [(r['step'], 'eval' if 'eval/top1_accuracy' in r else 'train')
          for r in records]


def _tensorboard_events(workdir: str) -> list[event_pb2.Event]:
  """Every event of the run's TensorBoard files (TFRecord framing)."""
  events = []
  directory = os.path.join(workdir, train.TENSORBOARD_DIR)
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4  # Length, its CRC, data, data CRC.
      events.append(event_pb2.Event.FromString(record))
  return events


class TrainLoopTest(parameterized.TestCase):

  def test_evaluates_during_training(self):
    """Test-split metrics and ponder-map pictures every eval_every_steps."""
    workdir = train_helpers.tempdir(self)
    config = _config(num_train_steps=4, eval_every_steps=2,
                     num_eval_ponder_maps=2)
    with self.assertLogs(level='INFO') as logs:
      result = train.train(config, workdir)
    with open(os.path.join(workdir, train.METRICS_FILE)) as f:
      records = [json.loads(line) for line in f]
    evals = [r for r in records if 'eval/top1_accuracy' in r]
    self.assertEqual([r['step'] for r in evals], [2, 4])
    for record in evals:
      self.assertBetween(record['eval/top1_accuracy'], 0.0, 1.0)
      # Above 100% when every unit runs: the halting heads cost FLOPs too.
      self.assertBetween(record['eval/flops_percent_of_vanilla'], 1.0, 110.0)
      self.assertGreater(record['eval/ponder_inside_outside_ratio'], 0.0)
    # The last evaluation is of the final model, and the main job reuses it.
    self.assertIsNotNone(result.eval_metrics)
    again = evaluate.evaluate_model(result.model, config, verbose=False)
    self.assertEqual(result.eval_metrics['top1_accuracy'],
                     again['top1_accuracy'])
    self.assertEqual(evals[-1]['eval/top1_accuracy'],
                     again['top1_accuracy'])
    self.assertTrue(any('eval at step 4 | test top-1' in line
                        for line in logs.output))
    images = [(e.step, v.image) for e in _tensorboard_events(workdir)
              for v in e.summary.value if v.tag == 'eval/ponder_maps']
    self.assertEqual([step for step, _ in images], [2, 4])
    picture = np.asarray(PIL.Image.open(io.BytesIO(
        images[0][1].encoded_image_string)))
    self.assertEqual(picture.shape, (images[0][1].height,
                                     images[0][1].width, 3))
    self.assertGreater(picture.std(), 10)  # Not a blank picture.

  def test_no_final_evaluation_unless_at_the_last_step(self):
    result = train.train(_config(num_train_steps=3, eval_every_steps=2),
                         train_helpers.tempdir(self))
    self.assertIsNone(result.eval_metrics)

  def test_writes_checkpoints_metrics_and_summaries(self):
    workdir = train_helpers.tempdir(self)
    config = _config(num_train_steps=4, checkpoint_every_steps=2,
                     keep_checkpoints=1)
    result = train.train(config, workdir)
    self.assertFalse(result.preempted)
    self.assertEqual(int(result.state.step), 4)

    with checkpoint.run_manager(workdir, read_only=True) as manager:
      self.assertEqual(list(manager.all_steps()), [4])  # keep_checkpoints=1
    with open(os.path.join(workdir, train.METRICS_FILE)) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r['step'] for r in records], [1, 2, 3, 4])
    for key in ('loss', 'accuracy', 'learning_rate', 'flops',
                'flops_fraction', 'ponder_cost/block_0', 'ponder_loss'):
      self.assertIn(key, records[-1])
    self.assertIn('steps_per_sec', records[-1])
    self.assertAlmostEqual(records[-1]['learning_rate'], 0.05)  # After 2.
    events = os.listdir(os.path.join(workdir, train.TENSORBOARD_DIR))
    self.assertTrue(any(e.startswith('events.out.tfevents') for e in events))

    # The evaluator's view of the run: the final weights, eval mode.
    model = checkpoint.restore_latest_model(workdir,
                                            validation.model_spec(config))
    self.assertTrue(model.head_bn.use_running_average)
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(model)),
        nnx.to_pure_dict(nnx.state(result.model)))

    # A model whose variables the run lacks (as a detector's around this
    # backbone): refused, not left half abstract.
    wrapped = nnx.Dict(backbone=validation.model_spec(config)
                       .abstract_model())
    with self.assertRaisesRegex(
        checkpoint.CheckpointError,
        r'step-4 checkpoint .* lacks \d+ of the model.s variables '
        r'\(e.g. (params|model_state)/backbone/'):
      checkpoint.restore_latest_variables(workdir, wrapped,
                                          validation.model_spec(config))

    # A workdir that is done trains no more and keeps its checkpoint.
    again = train.train(config, workdir)
    self.assertEqual(int(again.state.step), 4)

    # Damaged checkpoints: one CheckpointError naming the step, for the
    # evaluator and for a resumed run alike.
    spec = validation.model_spec(config)
    for damage in ('meta', os.path.join('state', 'manifest.ocdbt')):
      damaged = train_helpers.tempdir(self)
      shutil.copytree(workdir, damaged, dirs_exist_ok=True)
      path = os.path.join(damaged, train.CHECKPOINT_DIR, '4', damage)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        with open(path, 'w') as f:
          f.write('not a manifest')
      with self.assertRaisesRegex(checkpoint.CheckpointError,
                                  'Cannot read the step-4 checkpoint'):
        checkpoint.restore_latest_model(damaged, spec)
      with self.assertRaisesRegex(checkpoint.CheckpointError,
                                  'Cannot read the step-4 checkpoint'):
        train.train(config, damaged)

  def test_resume_equals_uninterrupted_run(self):
    """Stop after 3 steps, restart: same params, opt state, data position."""
    full_dir, split_dir = (train_helpers.tempdir(self),
                           train_helpers.tempdir(self))
    train.train(_config(num_train_steps=6, checkpoint_every_steps=3),
                full_dir)
    train.train(_config(num_train_steps=3, checkpoint_every_steps=3),
                split_dir)
    self.assertEqual(_saved_state(split_dir)[0], 3)
    train.train(_config(num_train_steps=6, checkpoint_every_steps=3),
                split_dir)
    step, full, full_position = _saved_state(full_dir)
    split_step, split, split_position = _saved_state(split_dir)
    self.assertEqual((step, split_step), (6, 6))
    _assert_flat_equal(self, split, full)
    self.assertEqual(split_position, full_position)
    # 6 batches of 16 from 128 images: still in the first epoch.
    self.assertEqual(full_position, {'next_index': 6})

  def test_ema_resumes_exactly_and_is_what_evaluation_sees(self):
    """ema_decay: averages checkpointed, resumed bit for bit, restored."""
    full_dir, split_dir = (train_helpers.tempdir(self),
                           train_helpers.tempdir(self))
    config = _config(num_train_steps=6, checkpoint_every_steps=3,
                     ema_decay=0.9)
    result = train.train(config, full_dir)
    train.train(_config(num_train_steps=3, checkpoint_every_steps=3,
                        ema_decay=0.9), split_dir)
    train.train(config, split_dir)
    _, full, _ = _saved_state(full_dir)
    _, split, _ = _saved_state(split_dir)
    _assert_flat_equal(self, split, full)
    kernel = "['stem_conv']['kernel']"
    average, live = full["['ema']['params']" + kernel], full[
        "['params']" + kernel]
    self.assertGreater(np.abs(average - live).max(), 1e-4)  # Not a copy.
    # The run's model, and the evaluator's view of the run, are the averages.
    np.testing.assert_array_equal(result.model.stem_conv.kernel[...],
                                  average)
    restored = evaluate.load_model(config, workdir=full_dir)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(restored)),
                                nnx.to_pure_dict(nnx.state(result.model)))

  @parameterized.parameters(signal.SIGTERM, signal.SIGINT)
  def test_signal_saves_and_resumes_exactly(self, signum):
    """SIGTERM or Ctrl-C mid-run: save at the current step, stop; resume =
    no stop."""
    full_dir, split_dir = (train_helpers.tempdir(self),
                           train_helpers.tempdir(self))
    config = _config(num_train_steps=5, checkpoint_every_steps=100)
    train.train(config, full_dir)

    calls = []
    real_shard_batch = parallel.shard_batch

    def shard_then_signal(*args, **kwargs):
      calls.append(1)
      if len(calls) == 2:  # During step 2: the process gets the signal.
        os.kill(os.getpid(), signum)
      return real_shard_batch(*args, **kwargs)

    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    with mock.patch.object(parallel, 'shard_batch', shard_then_signal):
      result = train.train(config, split_dir)
    self.assertEqual([signal.getsignal(s) for s in (signal.SIGTERM,
                                                    signal.SIGINT)],
                     handlers)  # Restored.
    self.assertTrue(result.preempted)
    self.assertEqual(int(result.state.step), 2)
    self.assertEqual(_saved_state(split_dir)[0], 2)

    resumed = train.train(config, split_dir)
    self.assertFalse(resumed.preempted)
    _, full, full_position = _saved_state(full_dir)
    step, split, split_position = _saved_state(split_dir)
    self.assertEqual(step, 5)
    _assert_flat_equal(self, split, full)
    self.assertEqual(split_position, full_position)

  def test_a_run_killed_at_a_checkpoint_records_every_step_once(self):
    """Killed while saving step 4: resumed from step 2, each row once."""
    workdir = train_helpers.tempdir(self)
    config = _config(num_train_steps=4, checkpoint_every_steps=2,
                     eval_every_steps=2)
    real_save = loop._save  # pylint: disable=protected-access

    def save_unless_step_4(manager, state, *args):
      if int(parallel.fetch(state.step)) == 4:
        raise _Killed()
      return real_save(manager, state, *args)

    with mock.patch.object(loop, '_save', save_unless_step_4):
      with self.assertRaises(_Killed):
        train.train(config, workdir)
    rows = _metric_rows(workdir)
    # The evaluation of step 4 came before its checkpoint.
    self.assertEqual(rows, [(1, 'train'), (2, 'train'), (2, 'eval'),
                            (3, 'train'), (4, 'train'), (4, 'eval')])
    with open(os.path.join(workdir, train.METRICS_FILE), 'a') as f:
      f.write('{"step": 4, "lo')  # The line a killed process cut short.
    train.train(config, workdir)
    self.assertEqual(_metric_rows(workdir), rows)
    # TensorBoard discards the first process's events after step 2.
    self.assertIn(3, [e.step for e in _tensorboard_events(workdir)
                      if e.session_log.status == e.session_log.START])

  def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
    """A diverging run stops with the message; step 4's checkpoint stays."""
    workdir = train_helpers.tempdir(self)
    # Sane steps 1-4, then a learning rate that blows the weights up.
    config = _config(num_train_steps=8, checkpoint_every_steps=2,
                     log_every_steps=100, lr_boundaries=(3,),
                     lr_scales=(1e30,))
    with self.assertRaisesRegex(train.NonFiniteLossError,
                                r'Non-finite loss or parameters at step '
                                r'[5-6].*last good checkpoint \(step 4\)'):
      train.train(config, workdir)
    step, saved, _ = _saved_state(workdir)
    self.assertEqual(step, 4)
    for key, value in saved.items():
      self.assertTrue(np.all(np.isfinite(value)), key)
    # Still loadable for evaluation.
    evaluate.load_model(config, workdir=workdir)


class ConfigTest(parameterized.TestCase):

  @parameterized.product(model_type=['vanilla', 'act', 'sact'],
                         depth=[20, 32, 56, 110])
  def test_cifar10_variants(self, model_type, depth):
    config = cifar10.get_config(f'{model_type}_{depth}')
    validation.validate_config(config)
    self.assertEqual(validation.model_spec(config).units,
                     cifar10.DEPTHS[depth])
    self.assertEqual((config.batch_size, config.num_train_steps,
                      config.weight_decay, config.momentum),
                     (128, 100_000, 2e-4, 0.9))
    self.assertEqual(config.tau, 0.001 if (model_type, depth) == (
        'act', 110) else 0.01)

  @parameterized.product(model_type=['vanilla', 'act', 'sact'],
                         depth=[50, 101])
  def test_imagenet_variants(self, model_type, depth):
    config = imagenet.get_config(f'{model_type}_{depth}')
    validation.validate_config(config)
    self.assertEqual(validation.label_offset(config), 1)  # 1001 classes.
    self.assertEqual((config.learning_rate, config.label_smoothing,
                      config.weight_decay, config.tau, config.ema_decay),
                     (0.05, 0.1, 1e-4, 0.005, 0.9999))
    # The reference's decay_steps, int(examples / batch * 30).
    self.assertEqual((config.lr_schedule, config.lr_decay_steps,
                      config.lr_decay_factor, config.num_train_steps),
                     ('staircase', 150_136, 0.1, 450_410))

  def test_imagenet_steps_follow_the_batch_size_flag(self):
    """--config.batch_size=64 still decays every 30 epochs, ends at 90."""
    config = imagenet.get_config('sact_101')
    config.batch_size = 64  # As config_flags applies an override.
    self.assertEqual((config.lr_decay_steps, config.num_train_steps),
                     (600_547, 1_801_641))
    self.assertEqual(json.loads(config.to_json_best_effort())[
        'lr_decay_steps'], 600_547)
    config.num_train_steps = 10  # Still settable on its own.
    self.assertEqual(config.num_train_steps, 10)

  def test_imagenet_finetune_needs_init_from(self):
    config = imagenet.get_config('sact_101_finetune')
    with self.assertRaisesRegex(validation.ConfigError,
                                r'init_from=.*--config.init_from='):
      validation.validate_config(config)

  @parameterized.parameters(
      (default, 'smoke'), (default, None), (cifar10, 'smoke'),
      (cifar10, 'act_110,smoke'), (imagenet, 'smoke'))
  def test_configs_validate(self, module, arg):
    validation.validate_config(module.get_config(arg))

  @parameterized.parameters(
      (cifar10, 'sact_33'), (cifar10, 'bogus'), (default, 'sact'),
      (imagenet, 'act_101_finetune_finetune'))
  def test_unknown_variant(self, module, arg):
    with self.assertRaisesRegex(ValueError, 'Unknown config variant'):
      module.get_config(arg)


  def test_resuming_compares_nested_fields(self):
    """A detector field counts; a field the old record lacks does not."""
    workdir = train_helpers.tempdir(self)
    config = default.get_config('smoke')
    config.detector = {'crop_size': 8, 'rpn_nms_iou': 0.7}
    record = json.loads(config.to_json_best_effort())
    del record['detector']['rpn_nms_iou']  # Written before it existed.
    evaluate.save_json(record, os.path.join(workdir, main_job.CONFIG_FILE))
    with mock.patch.object(checkpoint, 'latest_run_step', return_value=1):
      main_job.check_resumable(config, workdir)
      config.detector.crop_size = 14
      with self.assertRaisesRegex(validation.ConfigError,
                                  r'\(detector\.crop_size 8 -> 14, says'):
        main_job.check_resumable(config, workdir)


  def test_the_config_of_a_missing_workdir(self):
    with self.assertRaisesRegex(validation.ConfigError,
                                r'^/nonexistent/run does not exist\.$'):
      main_job.read_config('/nonexistent/run')

  def test_a_run_resumes_after_its_init_from_moved(self):
    """Only a run's first start reads init_from: resuming needs it not."""
    root = train_helpers.tempdir(self)
    source, moved = os.path.join(root, 'init'), os.path.join(root, 'moved')
    workdir = os.path.join(root, 'run')
    config = _config(init_from=source, num_train_steps=1)
    spec = validation.model_spec(config)
    checkpoint.save_model(source, spec.create(nnx.Rngs(0)), spec)
    validation.validate_config(config, workdir)
    main_job.write_config(config, workdir)
    train.train(config, workdir)
    shutil.move(source, moved)
    for path in (source, moved, None):  # As given, updated or left out.
      resumed = _config(init_from=path, num_train_steps=2)
      validation.validate_config(resumed, workdir)
      main_job.check_resumable(resumed, workdir)
    self.assertEqual(int(train.train(resumed, workdir).state.step), 2)
    # A first start still needs it.
    with self.assertRaisesRegex(validation.ConfigError,
                                'is not a sact_jax model checkpoint'):
      validation.validate_config(_config(init_from=source),
                                 os.path.join(root, 'other'))

  def test_an_extended_run_is_no_longer_finished(self):
    workdir = train_helpers.tempdir(self)
    eval_path = os.path.join(workdir, main_job.EVAL_FILE)
    evaluate.save_json({'top1_accuracy': 0.5}, eval_path)
    config = default.get_config('smoke')
    with mock.patch.object(checkpoint, 'latest_run_step',
                           return_value=config.num_train_steps):
      main_job.write_config(config, workdir)
      self.assertTrue(main_job.is_finished(config, workdir))
      config.num_train_steps += 1
      self.assertFalse(main_job.is_finished(config, workdir))
      main_job.write_config(config, workdir)
    self.assertFalse(os.path.exists(eval_path))
    self.assertEqual(main_job.read_config(workdir).num_train_steps,
                     config.num_train_steps)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('unknown_dataset', {'dataset': 'mnist'}, r"Unknown dataset 'mnist'"),
      ('negative_tau', {'tau': -0.1}, r'tau must be >= 0, got -0.1'),
      ('eps_zero', {'eps': 0.0}, r'eps must lie in \(0, 1\), got 0.0'),
      ('eps_one', {'eps': 1.0}, r'eps must lie in \(0, 1\), got 1.0'),
      ('model_type', {'model_type': 'dense'}, r'model_type must be one of'),
      ('classes', {'num_classes': 10}, r'num_classes=10 does not fit'),
      ('image_size', {'image_size': 64}, r'image_size=64 does not match'),
      ('schedule', {'lr_boundaries': (5, 3), 'lr_scales': (0.1, 0.01)},
       r'lr_boundaries must be increasing'),
      ('schedule_kind', {'lr_schedule': 'step'},
       r"lr_schedule must be 'piecewise', 'staircase' or 'cosine'"),
      ('decay_steps', {'lr_schedule': 'staircase'},
       r'lr_decay_steps must be an integer >= 1 .* got None'),
      ('decay_factor', {'lr_schedule': 'staircase', 'lr_decay_steps': 5,
                        'lr_decay_factor': 1.5},
       r'lr_decay_factor must lie in \(0, 1\], got 1.5'),
      ('eval_examples', {'num_eval_examples': 100_000},
       r'num_eval_examples=100000 is more than the \d+ images of the test '
       r'split of sact_shapes'),
      ('ponder_maps', {'num_ponder_maps': 100_000},
       r'num_ponder_maps=100000 is more than the \d+ images'),
      ('eval_ponder_maps', {'num_eval_ponder_maps': 100_000},
       r'num_eval_ponder_maps=100000 is more than'),
      ('init_from', {'init_from': '/nonexistent'},
       r"init_from='/nonexistent' is not a sact_jax model checkpoint"),
  )
  def test_config_errors(self, overrides, pattern):
    with self.assertRaisesRegex(validation.ConfigError, pattern):
      validation.validate_config(_config(**overrides))

  def test_batch_not_divisible_by_devices(self):
    with mock.patch.object(jax, 'device_count', return_value=8):
      with self.assertRaisesRegex(
          validation.ConfigError,
          r'batch_size=12 is not divisible by the 8 devices'):
        validation.validate_config(_config(batch_size=12))

  @parameterized.parameters((16, 32, 32), (16, 32, 32, 1), (16, 32, 32, 4))
  def test_images_of_wrong_shape(self, *shape):
    batch = {'image': np.zeros(shape, np.float32),
             'label': np.zeros(16, np.int32)}
    with self.assertRaisesRegex(ValueError, r'\[batch, height, width, 3\]'):
      train.check_batch(batch, _config())
    # The model's own check, before any weight is touched.
    model = checkpoint.ModelSpec('cifar', (1, 1, 1), 'sact', 6,
                                 base_channels=4).abstract_model()
    with self.assertRaisesRegex(ValueError, r'\[batch, height, width, 3\]'):
      model(jnp.zeros(shape))

  def test_workdir_of_another_model(self):
    workdir = train_helpers.tempdir(self)
    train.train(_config(num_train_steps=1), workdir)
    with self.assertRaisesRegex(
        validation.ConfigError,
        r'holds a checkpoint of a different model \(cifar '
        r'sact units=\[2, 1, 1\].*than the config \(cifar sact units=\[1, 1, '
        r'1\]'):
      validation.validate_config(_config(units=(1, 1, 1)), workdir)
    with self.assertRaisesRegex(evaluate.EvaluationError, 'another model'):
      evaluate.load_model(_config(model_type='act'), workdir=workdir)

  def test_no_checkpoint_to_restore(self):
    with self.assertRaisesRegex(evaluate.EvaluationError,
                                'No training checkpoint'):
      evaluate.load_model(_config(), workdir=train_helpers.tempdir(self))


class LauncherTest(parameterized.TestCase):
  """`python -m experiments.train`: one error line, no traceback."""

  def _run(self, *args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    return subprocess.run(
        [sys.executable, '-m', 'experiments.train',
         f'--compilation_cache_dir={_CACHE_DIR}', *args],
        cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout,
        check=False)

  @parameterized.named_parameters(
      ('negative_tau', ['--config=sact_jax/configs/default.py:smoke',
                        '--config.tau=-1'], 'tau must be >= 0, got -1'),
      ('infinite_learning_rate',
       ['--config=sact_jax/configs/default.py:smoke',
        '--config.learning_rate=inf'], 'learning_rate must be finite, got inf'),
  )
  def test_bad_config_fails_cleanly(self, args, message):
    workdir = train_helpers.tempdir(self)
    proc = self._run(*args, f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn(f'error: {message}', proc.stderr)
    self.assertNotIn('Traceback', proc.stderr)
    self.assertEqual(os.listdir(workdir), [])  # No work started.

  @parameterized.named_parameters(
      ('variant', ['--config=sact_jax/configs/cifar10.py:sact_33'],
       "Unknown config variant 'sact_33'"),
      ('file', ['--config=sact_jax/configs/nope.py'],
       "No such file or directory: 'sact_jax/configs/nope.py'"),
      ('field', ['--config=sact_jax/configs/default.py', '--config.tua=1'],
       "Unknown config field 'tua'"),
  )
  def test_unknown_config(self, args, message):
    proc = self._run(*args, f'--workdir={train_helpers.tempdir(self)}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith('error: ')]
    self.assertLen(errors, 1)
    self.assertIn(message, errors[0])
    self.assertNotIn('Traceback', proc.stderr)

  def test_main_job_smoke_run(self):
    """The launcher trains, evaluates and draws into the workdir."""
    workdir = train_helpers.tempdir(self)
    common = ['--config=sact_jax/configs/default.py:smoke',
              f'--config.data_dir={_data_dir()}', f'--workdir={workdir}']
    proc = self._run(*common)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertRegex(proc.stderr, r'step 6/6 \| loss [0-9.]+ \| accuracy')
    for name in ('eval.json', train.METRICS_FILE, train.CHECKPOINT_DIR,
                 train.TENSORBOARD_DIR, main_job.PONDER_MAPS_DIR):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    with open(os.path.join(workdir, 'eval.json')) as f:
      self.assertIn('top1_accuracy', f.read())

    # Without --config, evaluation takes the run's config.json.
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    output = os.path.join(workdir, 'again.json')
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}',
         f'--output={output}', f'--compilation_cache_dir={_CACHE_DIR}'],
        cwd=_REPO, env=env, capture_output=True, text=True, timeout=240,
        check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, 'eval.json')) as f:
      first = json.load(f)
    with open(output) as f:
      again = json.load(f)
    self.assertEqual(again['top1_accuracy'], first['top1_accuracy'])
    self.assertEqual(again['dataset'], first['dataset'])

    # Ponder maps drawn again go beside training's, which stay.
    training_maps = sorted(os.listdir(
        os.path.join(workdir, main_job.PONDER_MAPS_DIR)))
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.export_ponder_maps',
         f'--workdir={workdir}', '--num_images=9'],  # Two pages.
        cwd=_REPO, env=env, capture_output=True, text=True, timeout=240,
        check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(sorted(os.listdir(
        os.path.join(workdir, main_job.PONDER_MAPS_DIR))), training_maps)
    self.assertEqual(
        sorted(os.listdir(os.path.join(workdir, 'export_ponder_maps'))),
        ['ponder_maps_0.png', 'ponder_maps_1.png'])

    # Resumed under settings that are not the run's: refused, its record
    # (config.json) kept.
    with open(os.path.join(workdir, main_job.CONFIG_FILE)) as f:
      record = f.read()
    for override, message in (
        ('--config.tau=0.5', r'holds a run trained with other settings '
         r'\(tau 0\.\d+ -> 0\.5, says its config\.json\)'),
        ('--config.num_train_steps=3',
         'num_train_steps=3 is below the step-6 checkpoint')):
      proc = self._run(*common, override)
      self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
      self.assertRegex(proc.stderr.splitlines()[-1], f'^error: .*{message}')
      with open(os.path.join(workdir, main_job.CONFIG_FILE)) as f:
        self.assertEqual(f.read(), record)


if __name__ == '__main__':
  absltest.main()
