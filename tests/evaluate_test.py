"""Tests of sact_jax/evaluate.py and the experiments/evaluate.py launcher."""

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import ml_collections
import numpy as np

from sact_jax import checkpoint as checkpoint_lib
from sact_jax import data as data_lib
from sact_jax import evaluate
from sact_jax import models
from sact_jax import onednn
from sact_jax import sparse
import testing_utils as tu

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATASET = 'sact_shapes/tiny'  # 64 test images.


def fast_model(model_type: str, units=(2, 2, 2), *, num_classes: int = 6,
               base_channels: int = 4, seed: int = 0) -> nnx.Module:
  """A CIFAR ResNet with random numpy weights and BatchNorm statistics.

  Skips the random initialisers (which compile one op per shape: seconds);
  nonzero BatchNorm statistics and biases make halting vary across images.
  """
  abstract = nnx.eval_shape(lambda: models.create_model(
      'cifar', units, model_type, num_classes=num_classes,
      base_channels=base_channels, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-2].key, leaf.shape
    if name == 'kernel':
      # Conv [kh, kw, cin, cout] or dense [cin, cout], maybe stacked in front.
      fan_in = math.prod(shape[-4:-1] if len(shape) >= 4 else shape[-2:-1])
      return rng.normal(0, math.sqrt(2 / fan_in), shape).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name == 'scale':
      return (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    return (0.3 * rng.normal(size=shape)).astype(np.float32)

  state = jax.tree_util.tree_map_with_path(fill, state)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def save_fast_model(directory: str, model_type: str = 'sact') -> str:
  """`fast_model(model_type)` as a model checkpoint, for launcher tests."""
  model = fast_model(model_type)
  checkpoint_lib.save_model(directory, model,
                            models.ModelSpec.from_model(model))
  return directory


def make_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      'dataset': _DATASET, 'data_dir': data_dir, 'eval_batch_size': 24,
      'num_eval_examples': None})
  config.update(overrides)
  return config


def direct_metrics(model, batch, count: int):
  """Metrics of the first `count` images of `batch` from one forward pass."""
  logits, aux = evaluate.predict(model, batch['image'])
  return evaluate.compute_metrics(
      np.asarray(logits)[:count], batch['label'][:count],
      np.asarray(aux['flops'])[:count],
      [np.asarray(p)[:count] for p in aux['ponder_cost']],
      batch['mask'][:count],
      vanilla_flops=models.ModelSpec.from_model(model).vanilla_flops(
          (32, 32, 3)))


def whole_test_split(data_dir: str):
  """The 64 test images of the tiny dataset in one batch."""
  (batch,) = list(data_lib.make_dataset(
      _DATASET, 'test', batch_size=64, train=False, data_dir=data_dir))
  return batch


def assert_metrics_match(test, got, want):
  for key, value in want.items():
    if isinstance(value, list):
      np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
    elif isinstance(value, float):
      test.assertAlmostEqual(got[key], value, delta=1e-5 * abs(value),
                             msg=key)
    else:
      test.assertEqual(got[key], value, msg=key)


class MetricsTest(parameterized.TestCase):
  """`compute_metrics` on hand-made arrays with known answers."""

  def test_known_values(self):
    """Accuracies, FLOPs statistics and ponder inside/outside by hand."""
    # 4 images, 7 classes; the label's rank is 0, 2, 4 and 5.
    logits = np.tile(np.arange(7, 0, -1, dtype=np.float32), (4, 1))
    labels = np.array([0, 2, 4, 5])
    flops = np.array([1e6, 2e6, 3e6, 4e6], np.float32)
    # Object: the top row's left half of a 4x4 image.
    mask = np.zeros((4, 4, 4), np.float32)
    mask[:, 0, :2] = 1
    # Block 1 at image resolution: 3 on the object, 1 elsewhere.
    ponder1 = np.where(mask > 0, 3.0, 1.0).astype(np.float32)
    # Block 2 at 2x2: the object covers half of cell (0, 0).
    ponder2 = np.tile(np.array([[5.0, 2.0], [2.0, 2.0]], np.float32),
                      (4, 1, 1))
    metrics = evaluate.compute_metrics(logits, labels, flops,
                                       [ponder1, ponder2], mask,
                                       vanilla_flops=5e6)
    self.assertEqual(metrics['num_examples'], 4)
    self.assertAlmostEqual(metrics['top1_accuracy'], 0.25)
    self.assertAlmostEqual(metrics['top5_accuracy'], 0.75)
    self.assertAlmostEqual(metrics['flops_mean'], 2.5e6)
    self.assertAlmostEqual(metrics['flops_std'], math.sqrt(1.25) * 1e6,
                           delta=1e-3)
    self.assertEqual(metrics['vanilla_flops'], 5_000_000)
    self.assertAlmostEqual(metrics['flops_percent_of_vanilla'], 50.0)
    self.assertAlmostEqual(metrics['flops_std_percent_of_vanilla'],
                           100 * math.sqrt(1.25) / 5, places=6)
    np.testing.assert_allclose(metrics['ponder_cost_per_block'],
                               [(2 * 3 + 14 * 1) / 16, 11 / 4], rtol=1e-6)
    self.assertAlmostEqual(metrics['ponder_cost_total'], 20 / 16 + 11 / 4,
                           places=6)
    # Cell (0, 0) of block 2 is half object: weight 0.5 inside and outside.
    outside2 = (0.5 * 5 + 3 * 2) / 3.5
    np.testing.assert_allclose(metrics['ponder_inside_per_block'], [3, 5],
                               rtol=1e-6)
    np.testing.assert_allclose(metrics['ponder_outside_per_block'],
                               [1, outside2], rtol=1e-6)
    self.assertAlmostEqual(metrics['ponder_inside_total'], 8, places=5)
    self.assertAlmostEqual(metrics['ponder_outside_total'], 1 + outside2,
                           places=5)
    self.assertAlmostEqual(metrics['ponder_inside_outside_ratio'],
                           8 / (1 + outside2), places=5)
    json.dumps(metrics, allow_nan=False)  # JSON-ready.

  def test_top5_counts_ties_like_in_top_k(self):
    """A label tied with the 5th-best logit is in the top 5."""
    logits = np.array([[5, 4, 3, 2, 1, 1, 0]], np.float32)
    for label, top5 in ((5, 1.0), (6, 0.0)):
      metrics = evaluate.compute_metrics(logits, [label], [1.0], [])
      self.assertEqual(metrics['top5_accuracy'], top5)

  def test_top1_is_the_argmax(self):
    """Of two tied classes the first is the prediction (the reference's
    accuracy of tf.argmax), unlike in_top_k(k=1)."""
    logits = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
    metrics = evaluate.compute_metrics(logits, [0, 1], [1.0, 1.0], [])
    self.assertEqual(metrics['top1_accuracy'], 0.5)
    self.assertEqual(metrics['top5_accuracy'], 1.0)

  @parameterized.named_parameters(
      ('nan_row', [[np.nan] * 7], 0),
      ('one_inf_logit', [[5, 4, 3, 2, 1, np.inf, 0]], 0),
      ('label_too_large', [[5, 4, 3, 2, 1, 1, 0]], 7),
      ('negative_label', [[5, 4, 3, 2, 1, 1, 0]], -1),
  )
  def test_non_finite_logits_and_bad_labels_are_wrong(self, logits, label):
    """As tf.nn.in_top_k: never correct, so a diverged model scores 0%."""
    metrics = evaluate.compute_metrics(np.array(logits, np.float32), [label],
                                       [1.0], [])
    self.assertEqual(metrics['top1_accuracy'], 0.0)
    self.assertEqual(metrics['top5_accuracy'], 0.0)

  def test_act_and_vanilla_have_no_inside_outside(self):
    """Masks are only scored against spatial (SACT) ponder maps."""
    logits = np.eye(3, dtype=np.float32)
    mask = np.ones((3, 4, 4), np.float32)
    act = evaluate.compute_metrics(logits, [0, 1, 2], [1.0, 1.0, 1.0],
                                   [np.array([2.0, 3.0, 4.0])], mask)
    self.assertEqual(act['ponder_cost_per_block'], [3.0])
    self.assertIsNone(act['ponder_inside_per_block'])
    self.assertIsNone(act['ponder_inside_outside_ratio'])
    vanilla = evaluate.compute_metrics(logits, [0, 1, 2], [1.0, 1.0, 1.0], [],
                                       mask, vanilla_flops=1.0)
    self.assertEqual(vanilla['top1_accuracy'], 1.0)
    self.assertEqual(vanilla['ponder_cost_per_block'], [])
    self.assertEqual(vanilla['ponder_cost_total'], 0.0)
    self.assertEqual(vanilla['flops_percent_of_vanilla'], 100.0)

  def test_empty_mask_gives_none_not_nan(self):
    """No object anywhere: inside is undefined (JSON null)."""
    metrics = evaluate.compute_metrics(
        np.eye(2, dtype=np.float32), [0, 1], [1.0, 1.0],
        [np.ones((2, 2, 2), np.float32)], np.zeros((2, 4, 4), np.float32))
    self.assertEqual(metrics['ponder_inside_per_block'], [None])
    self.assertEqual(metrics['ponder_outside_per_block'], [1.0])
    self.assertIsNone(metrics['ponder_inside_outside_ratio'])

  @parameterized.parameters((32, 8), (7, 3), (5, 5), (3, 7))
  def test_resize_mask_averages_area(self, size_in, size_out):
    """Cells hold the covered fraction: mass and [0, 1] range are kept."""
    rng = np.random.default_rng(size_in * 10 + size_out)
    mask = (rng.random((2, size_in, size_in)) < 0.3).astype(np.float32)
    small = np.asarray(evaluate.resize_mask(mask, (size_out, size_out)))
    self.assertEqual(small.shape, (2, size_out, size_out))
    cell_area = (size_in / size_out)**2
    np.testing.assert_allclose(small.sum((1, 2)) * cell_area,
                               mask.sum((1, 2)), rtol=1e-5)
    self.assertTrue(np.all(small >= -1e-6) and np.all(small <= 1 + 1e-6))
    if size_in % size_out == 0:  # Integer factor: a box filter.
      k = size_in // size_out
      box = mask.reshape(2, size_out, k, size_out, k).mean((2, 4))
      np.testing.assert_allclose(small, box, atol=1e-6)

  def test_save_json_writes_all_or_nothing(self):
    path = os.path.join(self.enter_context(tempfile.TemporaryDirectory()),
                        'new', 'eval.json')
    evaluate.save_json({'a': 1.5, 'b': None}, path)
    with open(path) as f:
      self.assertEqual(json.load(f), {'a': 1.5, 'b': None})
    with self.assertRaises(ValueError):  # NaN is not JSON.
      evaluate.save_json({'a': float('nan')}, path)
    with open(path) as f:  # The old file is intact, no temp file left.
      self.assertEqual(json.load(f), {'a': 1.5, 'b': None})
    self.assertEqual(os.listdir(os.path.dirname(path)), ['eval.json'])

  def test_summarize_rejects_empty(self):
    with self.assertRaisesRegex(ValueError, 'No examples'):
      evaluate.summarize({'correct_top1': [], 'correct_top5': [],
                          'flops': [], 'ponder_cost': np.zeros((0, 0))})


class EvaluateModelTest(absltest.TestCase):
  """`evaluate_model` on a tiny SACT model over the tiny `sact_shapes`."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = cls.enterClassContext(tempfile.TemporaryDirectory())
    cls.model = fast_model('sact')
    # The whole test split in one batch, for a direct forward pass.
    cls.batch = whole_test_split(cls.data_dir)

  def test_matches_direct_forward_pass_and_writes_json(self):
    """Batches of 24, 24, 16: every image once, same numbers, eval.json."""
    # The batched and the direct forward must agree on every unit count.
    tu.assert_halting_margin(lambda m, x: m(x), self.model,
                             self.batch['image'])
    self.model.train()  # evaluate_model must use eval mode on its own.
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    metrics = evaluate.evaluate_model(self.model, make_config(self.data_dir),
                                      workdir=workdir)
    self.assertFalse(self.model.head_bn.use_running_average)  # Unchanged.
    self.model.eval()
    self.assertEqual(metrics['num_examples'], 64)
    assert_metrics_match(self, metrics,
                         direct_metrics(self.model, self.batch, 64))
    self.assertGreater(metrics['flops_percent_of_vanilla'], 0)
    self.assertLen(metrics['ponder_inside_per_block'], 3)
    self.assertEqual(metrics['model'], {
        'family': 'cifar', 'units': [2, 2, 2], 'model_type': 'sact',
        'num_classes': 6, 'base_channels': 4, 'eps': 0.01})
    self.assertEqual(metrics['split'], 'test')
    self.assertEqual(metrics['image_shape'], [32, 32, 3])
    self.assertEqual(os.listdir(workdir), ['eval.json'])  # No temp files.
    umask = os.umask(0)
    os.umask(umask)
    self.assertEqual(os.stat(os.path.join(workdir, 'eval.json')).st_mode
                     & 0o777, 0o666 & ~umask)
    with open(os.path.join(workdir, 'eval.json')) as f:
      self.assertEqual(json.load(f), metrics)
    table = evaluate.format_table(metrics)
    self.assertIn('(64 images)', table)
    self.assertIn('ponder inside objects', table)

  def test_partial_last_batch_counted_once(self):
    """40 images in batches of 24: the padded 16 are counted, the rest not."""
    metrics = evaluate.evaluate_model(
        self.model, make_config(self.data_dir, num_eval_examples=40))
    self.assertEqual(metrics['num_examples'], 40)
    self.assertEqual(metrics['split'], 'test[:40]')
    assert_metrics_match(self, metrics,
                         direct_metrics(self.model, self.batch, 40))

  def test_sparse_inference_gives_the_same_metrics(self):
    """`sparse=True`: the dense numbers, plus the sparse path's timing."""
    # Seed 11: a model on which the 8 zero rows that would pad the last
    # batch to 24 add overhead (1.0M FLOPs against 3.0M for the 16 real
    # images), unlike seed 0's, and whose halting decisions on these images
    # keep the margin that exact sparse-dense agreement needs.
    model = fast_model('sact', seed=11)
    tu.assert_halting_margin(lambda m, x: m(x), model,
                             self.batch['image'][:40])
    metrics = evaluate.evaluate_model(
        model, make_config(self.data_dir, num_eval_examples=40), sparse=True)
    self.assertEqual(metrics['inference'], 'sparse')
    self.assertEqual(metrics['num_examples'], 40)
    assert_metrics_match(self, metrics, direct_metrics(model, self.batch, 40))
    self.assertGreater(metrics['model_seconds'], 0.0)
    self.assertIn('sparse inference', evaluate.format_table(metrics))
    # The overhead of the real images only (batches of 24 and 16, the last
    # not padded), in calls made in the same order on a fresh eval copy.
    model = nnx.merge(*evaluate.eval_split_model(model))
    overhead = sum(
        float(sparse.apply(model, self.batch['image'][rows])[1][
            'flops_overhead']) for rows in (slice(0, 24), slice(24, 40)))
    self.assertAlmostEqual(metrics['flops_overhead_per_image'],
                           overhead / 40, delta=1e-6 * overhead)

  def test_vanilla_is_100_percent_of_vanilla(self):
    """A vanilla model's FLOPs are constant and equal to the reference."""
    metrics = evaluate.evaluate_model(
        fast_model('vanilla', units=(1, 1, 1)),
        make_config(self.data_dir, eval_batch_size=64))
    self.assertEqual(metrics['flops_percent_of_vanilla'], 100.0)
    self.assertEqual(metrics['flops_std'], 0.0)
    self.assertEqual(metrics['ponder_cost_per_block'], [])
    self.assertIsNone(metrics['ponder_inside_total'])

  def test_wrong_number_of_classes(self):
    """A model for another label set fails before reading any data."""
    abstract = nnx.eval_shape(lambda: models.create_model(
        'cifar', (1, 1, 1), 'sact', num_classes=10, base_channels=4,
        rngs=nnx.Rngs(0)))
    with self.assertRaisesRegex(ValueError, 'num_classes=10 does not fit'):
      evaluate.evaluate_model(abstract, make_config('/nonexistent'))

  def test_a_dataset_without_classes_is_an_evaluation_error(self):
    """E.g. the config of a detection run: one line, nothing read."""
    with self.assertRaisesRegex(evaluate.EvaluationError,
                                "Cannot evaluate a classifier on 'nope'"):
      evaluate.evaluate_model(fast_model('sact'),
                              make_config('/nonexistent', dataset='nope'))

  def test_predict_refuses_integer_images(self):
    """Its float32 cast would hide raw [0, 255] pixels from the model."""
    model = fast_model('sact')
    for images in (np.zeros((1, 8, 8, 3), np.uint8), [[[[0, 0, 0]]]]):
      with self.assertRaisesRegex(TypeError, r'images have dtype (uint8|int)'):
        evaluate.predict(model, images)

  def test_load_model_needs_exactly_one_source(self):
    with self.assertRaisesRegex(ValueError, 'exactly one.*got neither'):
      evaluate.load_model(None)
    with self.assertRaisesRegex(ValueError, 'exactly one.*got both'):
      evaluate.load_model(None, workdir='a', checkpoint='b')


def _run(args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate', *args,
       '--compilation_cache_dir='], cwd=_REPO,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})


class LauncherTest(absltest.TestCase):
  """`python -m experiments.evaluate` end to end, in subprocesses."""

  def test_launcher(self):
    """Bad flags fail in one line; --checkpoint evaluates on 8 devices.

    The evaluation runs data-parallel on 8 fake CPU devices with a batch of
    20 (rounded up to 24 rows) and must give the numbers of one forward pass
    on one device.
    """
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    model = fast_model('sact')
    checkpoint = os.path.join(tmp, 'ckpt')
    checkpoint_lib.save_model(checkpoint, model, models.ModelSpec(
        'cifar', (2, 2, 2), 'sact', num_classes=6, base_channels=4))
    output = os.path.join(tmp, 'out', 'metrics.json')
    data_dir = os.path.join(tmp, 'data')
    config = ['--config=sact_jax/configs/default.py:smoke',
              f'--config.data_dir={data_dir}',
              '--config.eval_batch_size=20']
    # (Both sources: see test_load_model_needs_exactly_one_source and the
    # export_ponder_maps launcher test; the launchers share the check.)
    runs = {
        'neither': config,
        'missing': [*config, f'--checkpoint={tmp}/missing'],
        'ok': [*config, f'--checkpoint={checkpoint}', f'--output={output}'],
        # Sparse inference on one of the 8 devices the weights are on.
        'sparse': [*config, f'--checkpoint={checkpoint}',
                   '--inference=sparse', f'--output={output}.sparse'],
    }
    envs = [{'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
            if name in ('ok', 'sparse') else None for name in runs]
    batch = whole_test_split(data_dir)  # Prepared once, not by both runs.
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
      results = dict(zip(runs, pool.map(_run, runs.values(), envs)))
    # Bad input: one line, exit status 2 (experiments/_cli.py).
    neither = results['neither']
    self.assertEqual(neither.returncode, 2, neither.stderr[-2000:])
    self.assertEqual(neither.stderr.strip().splitlines()[-1],
                     'error: Give exactly one of --workdir (a training run) '
                     'and --checkpoint (a model-only checkpoint), got '
                     'neither.')
    missing = results['missing']
    self.assertEqual(missing.returncode, 2, missing.stderr[-2000:])
    self.assertRegex(missing.stderr.strip().splitlines()[-1],
                     f'^error: .*{tmp}/missing')
    self.assertNotIn('Traceback', missing.stderr)
    ok = results['ok']
    self.assertEqual(ok.returncode, 0, ok.stderr[-3000:])
    # The table once, on stdout; jax's line on the absent TPU dropped.
    self.assertEqual(ok.stdout.count('top-1 accuracy'), 1, ok.stdout)
    self.assertNotIn('top-1 accuracy', ok.stderr)
    self.assertNotIn('Unable to initialize backend', ok.stderr)
    with open(output) as f:
      metrics = json.load(f)
    self.assertEqual(metrics['num_devices'], 8)
    # Like with like: with 8 devices the launcher runs XLA's convolutions
    # (`onednn.enabled`); halting decisions are threshold comparisons, so
    # the other kernels' rounding could move a position to another unit.
    with onednn.disabled():
      want = direct_metrics(model, batch, 64)
    assert_metrics_match(self, metrics, want)
    sparse_run = results['sparse']
    self.assertEqual(sparse_run.returncode, 0, sparse_run.stderr[-3000:])
    with open(f'{output}.sparse') as f:
      metrics = json.load(f)
    self.assertEqual((metrics['inference'], metrics['num_examples']),
                     ('sparse', 64))
    assert_metrics_match(self, metrics, want)


if __name__ == '__main__':
  absltest.main()
