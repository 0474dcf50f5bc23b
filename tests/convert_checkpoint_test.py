"""Tests of the TF checkpoint converter (library and launcher).

The fixtures in tests/testdata/<case>/ are TF checkpoints written by the
original implementation, with its outputs on a fixed batch (see
/work/shared/parity/README.md).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import numpy as np

from sact_jax import checkpoint
from sact_jax import models
from sact_jax import reference
from sact_jax import tf_checkpoint

_REPO = pathlib.Path(__file__).resolve().parent.parent
_TESTDATA = _REPO / 'tests' / 'testdata'
_CASES = {
    'cifar_sact': (
        models.ModelSpec('cifar', (2, 2, 2), 'sact', num_classes=10,
                         base_channels=16),
        'inputs_cifar_32x32.npz', ('block_1', 'block_2', 'block_3')),
    'imagenet_sact': (
        models.ModelSpec('imagenet', (2, 3, 2, 1), 'sact',
                         num_classes=1001, base_channels=8),
        'inputs_imagenet_96x96.npz', ('block1', 'block2', 'block3', 'block4')),
}
_CIFAR_SPEC = _CASES['cifar_sact'][0]
_LAUNCHER_FLAGS = ('--family=cifar', '--units=2,2,2', '--model_type=sact',
                   '--num_classes=10')


def _tempdir(test) -> pathlib.Path:
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return pathlib.Path(path)


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
  return {checkpoint.path_str(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_state(test, model, expected_model):
  found, expected = _flat(model), _flat(expected_model)
  test.assertEqual(found.keys(), expected.keys())
  for name, value in expected.items():
    np.testing.assert_array_equal(found[name], value, err_msg=name)


def _reference_model(params, spec=_CIFAR_SPEC):
  return reference.load_reference_model(
      params, family=spec.family, units=spec.units,
      model_type=spec.model_type, num_classes=spec.num_classes,
      base_channels=spec.base_channels)


def _run_launcher(*args, code=None):
  """Runs the launcher in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  command = ([sys.executable, '-c', code, *args] if code else
             [sys.executable, '-m', 'experiments.convert_checkpoint', *args])
  return subprocess.run(command, cwd=_REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


@nnx.jit
def _forward(model, images):
  return model(images)


class ConvertFixturesTest(parameterized.TestCase):
  """The original's checkpoints, converted, give the original's outputs."""

  @parameterized.parameters('cifar_sact', 'imagenet_sact')
  def test_converted_model_matches_reference_outputs(self, case):
    spec, inputs_file, blocks = _CASES[case]
    output = _tempdir(self) / 'converted'
    result = tf_checkpoint.convert_tf_checkpoint(_TESTDATA / case, output,
                                                 spec)
    self.assertEqual(result.source, str(_TESTDATA / case / 'model.ckpt'))
    self.assertFalse(result.selection.used_ema)
    self.assertEqual(result.selection.skipped, {})  # Only model variables.
    params = np.load(_TESTDATA / case / 'params.npz')
    self.assertLen(result.selection.sources, len(params.files))

    model, restored_spec = checkpoint.restore_model(output)
    self.assertEqual(restored_spec, spec)
    self.assertEqual(checkpoint.read_metadata(output), {
        'converted_from': str(_TESTDATA / case / 'model.ckpt'),
        'moving_average_weights': False})
    images = np.load(_TESTDATA / inputs_file)['images']
    expected = np.load(_TESTDATA / case / 'outputs.npz')
    logits, aux = _forward(model, images)
    scale = np.max(np.abs(expected['logits']))
    self.assertLessEqual(
        np.max(np.abs(np.asarray(logits) - expected['logits'])), 1e-4 * scale)
    self.assertLen(aux['num_units'], len(blocks))
    for block, num_units in zip(blocks, aux['num_units']):
      np.testing.assert_array_equal(num_units,
                                    expected[f'{block}/num_units'],
                                    err_msg=block)
    np.testing.assert_array_equal(np.asarray(aux['flops'], np.int64),
                                  expected['flops'])


class TrainingCheckpointTest(absltest.TestCase):
  """A checkpoint as training leaves it: slots, step, moving averages."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    cls.root = pathlib.Path(tempfile.mkdtemp())
    cls.params = dict(np.load(_TESTDATA / 'cifar_sact' / 'params.npz'))
    rng = np.random.default_rng(0)
    cls.raw = {n: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
               for n, v in cls.params.items()}
    tensors = dict(cls.raw)
    for name, value in cls.params.items():
      tensors[f'{name}/ExponentialMovingAverage'] = value
      if 'moving_' not in name:
        tensors[f'{name}/Momentum'] = np.zeros_like(value)
    tensors['global_step'] = np.int64(100000)
    tensors['total_loss/ExponentialMovingAverage'] = np.float32(0.4)
    cls.train_dir = cls.root / 'train'
    cls.train_dir.mkdir()
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(cls.train_dir / 'model.ckpt-100000'),
                      tensor_names=names, shape_and_slices=[''] * len(names),
                      tensors=[tensors[n] for n in names])
    (cls.train_dir / 'checkpoint').write_text(
        'model_checkpoint_path: "model.ckpt-100000"\n')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_moving_averages_by_default(self):
    """As the reference's evaluator: EMA shadows replace the raw values."""
    output = _tempdir(self) / 'ema'
    result = tf_checkpoint.convert_tf_checkpoint(self.train_dir, output,
                                                 _CIFAR_SPEC)
    self.assertEqual(result.source,
                     str(self.train_dir / 'model.ckpt-100000'))
    self.assertTrue(result.selection.used_ema)
    model, _ = checkpoint.restore_model(output)
    _assert_same_state(self, model, _reference_model(self.params))

    reasons = {}
    for name, reason in result.selection.skipped.items():
      reasons.setdefault(reason, []).append(name)
    num_moving = sum('moving_' in n for n in self.params)
    self.assertCountEqual(reasons, [
        "outside the model scope 'resnet_residual'",
        'optimizer slot (Momentum)',
        'raw value (moving-average shadow used)'])
    self.assertCountEqual(
        reasons["outside the model scope 'resnet_residual'"],
        ['global_step', 'total_loss/ExponentialMovingAverage'])
    self.assertLen(reasons['optimizer slot (Momentum)'],
                   len(self.params) - num_moving)
    self.assertCountEqual(reasons['raw value (moving-average shadow used)'],
                          self.params)
    self.assertTrue(checkpoint.read_metadata(output)['moving_average_weights'])

  def test_raw_values_on_request(self):
    result = tf_checkpoint.convert_tf_checkpoint(
        self.train_dir / 'model.ckpt-100000.index', _tempdir(self) / 'raw',
        _CIFAR_SPEC, ema=False)
    self.assertFalse(result.selection.used_ema)
    _assert_same_state(self, result.model, _reference_model(self.raw))

  def test_wrong_architecture(self):
    act = models.ModelSpec('cifar', (2, 2, 2), 'act', num_classes=10)
    output = _tempdir(self) / 'act'
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                'missing from the reference weights'):
      tf_checkpoint.convert_tf_checkpoint(self.train_dir, output, act)
    self.assertFalse(output.exists())

  def test_checkpoint_paths(self):
    prefix = str(self.train_dir / 'model.ckpt-100000')
    for path in (self.train_dir, prefix, prefix + '.index',
                 prefix + '.data-00000-of-00001'):
      self.assertEqual(tf_checkpoint.resolve_tf_checkpoint(path), prefix)
    # A directory without a state file, but with one checkpoint.
    bare = _tempdir(self)
    for f in self.train_dir.glob('model.ckpt-*'):
      shutil.copy(f, bare)
    self.assertEqual(tf_checkpoint.resolve_tf_checkpoint(bare),
                     str(bare / 'model.ckpt-100000'))
    with self.assertRaisesRegex(FileNotFoundError, 'No TF checkpoint'):
      tf_checkpoint.resolve_tf_checkpoint(bare / 'model.ckpt')
    with self.assertRaisesRegex(FileNotFoundError, '0 \\*.index files'):
      tf_checkpoint.resolve_tf_checkpoint(_tempdir(self))
    # A state file naming a path that does not exist here (as in the
    # released archives) falls back to the only checkpoint present.
    (bare / 'checkpoint').write_text(
        'model_checkpoint_path: "/home/someone/train/model.ckpt-1"\n')
    self.assertEqual(tf_checkpoint.resolve_tf_checkpoint(bare),
                     str(bare / 'model.ckpt-100000'))

  def test_read_tf_checkpoint(self):
    values = tf_checkpoint.read_tf_checkpoint(self.train_dir)
    self.assertEqual(int(values['global_step']), 100000)
    name = 'resnet_residual/Conv/weights'
    np.testing.assert_array_equal(values[name], self.raw[name])
    some = tf_checkpoint.read_tf_checkpoint(self.train_dir, [name])
    self.assertEqual(list(some), [name])
    with self.assertRaisesRegex(checkpoint.CheckpointError, 'not in'):
      tf_checkpoint.read_tf_checkpoint(self.train_dir, ['nope'])


class SelectModelVariablesTest(absltest.TestCase):
  """Pure name filtering (no TensorFlow needed)."""

  def test_imagenet_scope_and_slots(self):
    names = ['resnet_v2/conv1/weights', 'resnet_v2/conv1/weights/Momentum',
             'resnet_v2/logits/biases', 'global_step', 'learning_rate',
             'resnet_residual/Conv/weights']
    selection = tf_checkpoint.select_model_variables(names, 'imagenet')
    self.assertEqual(selection.sources, {
        'resnet_v2/conv1/weights': 'resnet_v2/conv1/weights',
        'resnet_v2/logits/biases': 'resnet_v2/logits/biases'})
    self.assertFalse(selection.used_ema)
    self.assertCountEqual(selection.skipped, [
        'resnet_v2/conv1/weights/Momentum', 'global_step', 'learning_rate',
        'resnet_residual/Conv/weights'])

  def test_partial_moving_averages(self):
    names = ['resnet_v2/a/weights', 'resnet_v2/a/weights/'
             'ExponentialMovingAverage', 'resnet_v2/b/weights']
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                r'1 of 2 .*resnet_v2/b/weights.*--ema=no'):
      tf_checkpoint.select_model_variables(names, 'imagenet')
    selection = tf_checkpoint.select_model_variables(names, 'imagenet',
                                                     ema=False)
    self.assertEqual(sorted(selection.sources),
                     ['resnet_v2/a/weights', 'resnet_v2/b/weights'])
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'no ExponentialMovingAverage'):
      tf_checkpoint.select_model_variables(['resnet_v2/b/weights'],
                                           'imagenet', ema=True)

  def test_unknown_family(self):
    with self.assertRaisesRegex(ValueError, 'family'):
      tf_checkpoint.select_model_variables([], 'mnist')

  def test_bad_arguments_are_refused_up_front(self):
    """`ema='no'` (the flag's spelling) is truthy; a string is a list."""
    names = ['resnet_v2/logits/weights',
             'resnet_v2/logits/weights/ExponentialMovingAverage']
    with self.assertRaisesRegex(TypeError,
                                "ema must be True, False or None, got 'no'"):
      tf_checkpoint.select_model_variables(names, 'imagenet', ema='no')
    self.assertFalse(tf_checkpoint.select_model_variables(
        names, 'imagenet', ema=np.bool_(False)).used_ema)
    output = _tempdir(self) / 'out'
    with self.assertRaisesRegex(TypeError, "ema must be True, False or None"):
      tf_checkpoint.convert_tf_checkpoint('/nonexistent', output,
                                          _CIFAR_SPEC, ema='no')
    with self.assertRaisesRegex(TypeError,
                                'spec must be a models.ModelSpec .*dict'):
      tf_checkpoint.convert_tf_checkpoint('/nonexistent', output,
                                          _CIFAR_SPEC.to_dict())
    with self.assertRaisesRegex(TypeError, "got the single 'global_step'"):
      tf_checkpoint.read_tf_checkpoint('/nonexistent', 'global_step')
    self.assertFalse(output.exists())


class WithoutTensorFlowTest(absltest.TestCase):

  def test_clear_error(self):
    output = _tempdir(self) / 'out'
    with mock.patch.dict(sys.modules, {'tensorflow': None}):
      with self.assertRaises(tf_checkpoint.TensorFlowMissingError) as caught:
        tf_checkpoint.read_tf_checkpoint(_TESTDATA / 'cifar_sact')
      self.assertIn('pip install -e .[tf]', str(caught.exception))
      self.assertIsNone(caught.exception.__cause__)
      with self.assertRaises(tf_checkpoint.TensorFlowMissingError):
        tf_checkpoint.convert_tf_checkpoint(_TESTDATA / 'cifar_sact', output,
                                            _CIFAR_SPEC)
    self.assertFalse(output.exists())


class LauncherTest(absltest.TestCase):

  def test_end_to_end(self):
    output = _tempdir(self) / 'converted'
    args = (f'--tf_checkpoint={_TESTDATA / "cifar_sact"}', *_LAUNCHER_FLAGS,
            f'--output={output}')
    run = _run_launcher(*args)
    self.assertEqual(run.returncode, 0, run.stderr)
    self.assertIn('Read 107 model variables', run.stdout)
    self.assertIn('174,317 parameters', run.stdout)
    model, spec = checkpoint.restore_model(output)
    # No --base_channels: the family default, stored as None.
    self.assertEqual(spec, models.ModelSpec('cifar', (2, 2, 2), 'sact',
                                            num_classes=10))
    params = dict(np.load(_TESTDATA / 'cifar_sact' / 'params.npz'))
    _assert_same_state(self, model, _reference_model(params))

    # A second run must not replace it silently, and says so in one line.
    run = _run_launcher(*args)
    self.assertEqual(run.returncode, 2, run.stderr[-2000:])  # Bad input.
    self.assertNotIn('Traceback', run.stderr)
    self.assertEqual(run.stderr.strip().splitlines()[-1],
                     f'error: {output} already exists; pass overwrite=True '
                     '(--overwrite) to replace it.')

  def test_damaged_or_unwritable(self):
    """A damaged TF checkpoint, an output that cannot be made: one line."""
    root = _tempdir(self)
    source = _TESTDATA / 'cifar_sact'
    damaged = root / 'damaged'
    shutil.copytree(source, damaged)
    index = next(damaged.glob('*.index'))
    index.write_bytes(b'not an sstable')
    blocker = root / 'file'
    blocker.write_text('not a directory')
    for tf_dir, output, message in (
        (damaged, root / 'out', 'Cannot read the TF checkpoint '),
        (source, blocker / 'out',
         f'Cannot create or write to the directory {blocker}')):
      run = _run_launcher(f'--tf_checkpoint={tf_dir}', *_LAUNCHER_FLAGS,
                          f'--output={output}')
      self.assertEqual(run.returncode, 2, run.stderr[-2000:])
      self.assertNotIn('Traceback', run.stderr)
      self.assertStartsWith(run.stderr.strip().splitlines()[-1],
                            f'error: {message}')
      self.assertFalse(output.exists())

  def test_without_tensorflow(self):
    """No TensorFlow: one line naming the `tf` extra, no traceback."""
    output = _tempdir(self) / 'converted'
    code = ('import runpy, sys\n'
            "sys.modules['tensorflow'] = None\n"
            "sys.argv[0] = 'convert_checkpoint'\n"
            "runpy.run_module('experiments.convert_checkpoint', "
            "run_name='__main__')\n")
    run = _run_launcher(f'--tf_checkpoint={_TESTDATA / "cifar_sact"}',
                        *_LAUNCHER_FLAGS, f'--output={output}', code=code)
    self.assertEqual(run.returncode, 2, run.stderr[-2000:])  # Bad input.
    self.assertNotIn('Traceback', run.stderr)
    self.assertEqual(run.stderr.strip().splitlines()[-1],
                     f'error: {tf_checkpoint.TF_MISSING_MESSAGE}')
    self.assertFalse(output.exists())


if __name__ == '__main__':
  absltest.main()
