"""Tests of model-only checkpoints and fine-tuning restores."""

import json
import os
import pathlib
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import checkpoint
from sact_jax import halting
from sact_jax import models

# Small enough to build and run in well under a second once compiled.
SACT = models.ModelSpec('cifar', (2, 2), 'sact', num_classes=5,
                        base_channels=4)
VANILLA = models.ModelSpec('cifar', (2, 2), 'vanilla', num_classes=5,
                           base_channels=4)


def _tempdir(test) -> pathlib.Path:
  # Not absltest's create_tempdir: it needs parsed flags, which pytest lacks.
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return pathlib.Path(path)


def _random_model(spec: models.ModelSpec, seed: int) -> nnx.Module:
  """A model whose every variable, BN statistics included, is random.

  Filled through `eval_shape` + numpy: a real init compiles every random op
  (about 15 s here), and random BN statistics make the round trip check them.
  """
  graphdef, state = nnx.split(spec.abstract_model())
  rng = np.random.default_rng(seed)
  for path, variable in nnx.to_flat_state(state):
    if path[-1] == 'var':
      value = rng.uniform(0.5, 1.5, variable.shape)
    elif path[-2:] == ('local_conv', 'bias'):
      # About logit(0.99): some positions halt after one unit, some do not.
      value = np.full(variable.shape, 4.6)
    else:
      value = rng.normal(0.0, 0.3, variable.shape)
    variable.set_value(jnp.asarray(value, jnp.float32))
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
  return {checkpoint.path_str(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model))}


@nnx.jit
def _forward(model, images):
  return model(images)


def _images(seed=0):
  return jax.random.normal(jax.random.key(seed), (2, 8, 8, 3))


class SaveRestoreTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)
    self.model = _random_model(SACT, seed=1)

  def _assert_no_leftovers(self, *expected):
    self.assertCountEqual([p.name for p in self.root.iterdir()], expected)

  def test_round_trip(self):
    """Every variable (BN statistics too), the spec and the outputs return."""
    path = checkpoint.save_model(self.root / 'ckpt', self.model, SACT,
                                 metadata={'step': 7})
    self.assertEqual(path, self.root / 'ckpt')
    restored, spec = checkpoint.restore_model(path)
    self.assertEqual(spec, SACT)
    self.assertEqual(checkpoint.read_spec(path), SACT)
    self.assertEqual(checkpoint.read_metadata(path), {'step': 7})

    expected, found = _flat(self.model), _flat(restored)
    self.assertEqual(expected.keys(), found.keys())
    for name in expected:
      np.testing.assert_array_equal(found[name], expected[name], err_msg=name)
    stats = nnx.state(restored, nnx.BatchStat)
    self.assertNotEmpty(jax.tree.leaves(stats))

    self.assertTrue(restored.head_bn.use_running_average)  # Eval mode.
    logits, aux = _forward(self.model, _images())
    logits2, aux2 = _forward(restored, _images())
    np.testing.assert_array_equal(logits2, logits)
    np.testing.assert_array_equal(aux2['flops'], aux['flops'])
    for a, b in zip(aux2['num_units'], aux['num_units'], strict=True):
      np.testing.assert_array_equal(a, b)
    # Random halting heads: some positions stop before the last unit.
    self.assertEqual(set(np.unique(aux['num_units'][0])), {1, 2})
    self._assert_no_leftovers('ckpt')
    # Created with the umask (not mkdtemp's 0700).
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o777 & ~_umask())

  def test_runtime_options_at_restore(self):
    checkpoint.save_model(self.root / 'ckpt', self.model, SACT)
    restored, _ = checkpoint.restore_model(self.root / 'ckpt', remat=True,
                                           unroll=True)
    self.assertTrue(restored.blocks[0].remat)
    self.assertTrue(restored.blocks[1].unroll)
    for name, value in _flat(self.model).items():
      np.testing.assert_array_equal(_flat(restored)[name], value)

  def test_refuses_to_overwrite(self):
    checkpoint.save_model(self.root / 'ckpt', self.model, SACT)
    other = _random_model(SACT, seed=2)
    with self.assertRaisesRegex(FileExistsError, 'overwrite'):
      checkpoint.save_model(self.root / 'ckpt', other, SACT)
    restored, _ = checkpoint.restore_model(self.root / 'ckpt')
    np.testing.assert_array_equal(restored.logits.kernel[...],
                                  self.model.logits.kernel[...])

    checkpoint.save_model(self.root / 'ckpt', other, SACT, overwrite=True)
    restored, _ = checkpoint.restore_model(self.root / 'ckpt')
    np.testing.assert_array_equal(restored.logits.kernel[...],
                                  other.logits.kernel[...])
    self._assert_no_leftovers('ckpt')

  def test_overwrite_keeps_other_tools_outputs(self):
    """An eval.json beside the weights: overwriting is refused."""
    checkpoint.save_model(self.root / 'ckpt', self.model, SACT)
    (self.root / 'ckpt' / 'eval.json').write_text('{}')
    with self.assertRaisesRegex(FileExistsError,
                                r'also holds eval.json, not part of'):
      checkpoint.save_model(self.root / 'ckpt', _random_model(SACT, seed=2),
                            SACT, overwrite=True)
    self.assertEqual((self.root / 'ckpt' / 'eval.json').read_text(), '{}')

  def test_never_replaces_a_foreign_directory(self):
    precious = self.root / 'mine' / 'notes.txt'
    precious.parent.mkdir()
    precious.write_text('keep me')
    with self.assertRaisesRegex(FileExistsError, 'not a sact_jax model'):
      checkpoint.save_model(precious.parent, self.model, SACT,
                            overwrite=True)
    self.assertEqual(precious.read_text(), 'keep me')
    (self.root / 'empty').mkdir()  # An empty directory may be filled.
    checkpoint.save_model(self.root / 'empty', self.model, SACT)
    self.assertTrue(checkpoint.is_model_checkpoint(self.root / 'empty'))

  def test_failed_save_leaves_nothing(self):
    """A crash mid-write neither creates nor damages a checkpoint."""
    boom = mock.patch.object(checkpoint, '_replace_directory',
                             side_effect=RuntimeError('disk full'))
    with boom, self.assertRaisesRegex(RuntimeError, 'disk full'):
      checkpoint.save_model(self.root / 'ckpt', self.model, SACT)
    self._assert_no_leftovers()

    checkpoint.save_model(self.root / 'ckpt', self.model, SACT)
    broken = mock.patch.object(checkpoint.ocp.args, 'StandardSave',
                               side_effect=RuntimeError('disk full'))
    with broken, self.assertRaisesRegex(RuntimeError, 'disk full'):
      checkpoint.save_model(self.root / 'ckpt', _random_model(SACT, 3), SACT,
                            overwrite=True)
    self._assert_no_leftovers('ckpt')
    restored, _ = checkpoint.restore_model(self.root / 'ckpt')
    np.testing.assert_array_equal(restored.logits.kernel[...],
                                  self.model.logits.kernel[...])

  def test_save_checks_the_spec(self):
    wrong = models.ModelSpec('cifar', (2, 2), 'sact', num_classes=6,
                             base_channels=4)
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                r'logits/bias: .*\(5,\).*\(6,\)'):
      checkpoint.save_model(self.root / 'ckpt', self.model, wrong)
    act = models.ModelSpec('cifar', (2, 2), 'act', num_classes=5,
                           base_channels=4)
    with self.assertRaisesRegex(checkpoint.CheckpointError, 'model_type'):
      checkpoint.save_model(self.root / 'ckpt', self.model, act)
    with self.assertRaisesRegex(TypeError,
                                r'spec must be a models.ModelSpec .*dict'):
      checkpoint.save_model(self.root / 'ckpt', self.model, SACT.to_dict())
    self._assert_no_leftovers()

  def test_restore_errors(self):
    with self.assertRaisesRegex(FileNotFoundError, 'no such directory'):
      checkpoint.restore_model(self.root / 'absent')
    (self.root / 'plain').mkdir()
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'not a sact_jax model checkpoint'):
      checkpoint.restore_model(self.root / 'plain')

    path = checkpoint.save_model(self.root / 'ckpt', self.model, SACT)
    spec_file = path / checkpoint.SPEC_FILE
    content = json.loads(spec_file.read_text())
    # A checkpoint whose spec says another model: the state does not fit.
    content['spec']['num_classes'] = 7
    spec_file.write_text(json.dumps(content))
    with self.assertRaisesRegex(
        checkpoint.CheckpointError,
        r'does not fit .*shape mismatch.*logits/bias: checkpoint \(5,\) vs '
        r'model \(7,\)'):
      checkpoint.restore_model(path)
    content['spec'].update(num_classes=5, units=[2, 3])
    spec_file.write_text(json.dumps(content))
    with self.assertRaisesRegex(checkpoint.CheckpointError, 'steps'):
      checkpoint.restore_model(path)
    content['spec'].update(units=[2, 2], model_type='vanilla')
    spec_file.write_text(json.dumps(content))
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'unexpected variable.*head'):
      checkpoint.restore_model(path)
    content['format'] = 'something else'
    spec_file.write_text(json.dumps(content))
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'not a sact_jax model spec'):
      checkpoint.restore_model(path)
    spec_file.write_text('{not json')
    with self.assertRaisesRegex(checkpoint.CheckpointError, 'Cannot read'):
      checkpoint.restore_model(path)


class _SteeperHead(halting.SactHead):
  """A researcher's head: same variables, another halting probability."""

  def probability(self, local_logits, global_logits):
    return jax.nn.sigmoid(2.0 * (local_logits + global_logits))


class CustomClassesTest(absltest.TestCase):

  def test_a_model_of_custom_classes_is_restored_only_as_such(self):
    root = _tempdir(self)
    default = _random_model(SACT, seed=3)
    custom = nnx.merge(nnx.graphdef(SACT.abstract_model(head_cls=_SteeperHead)),
                       nnx.state(default))
    custom.eval()
    path = checkpoint.save_model(root / 'ckpt', custom, SACT)
    with self.assertRaisesRegex(
        checkpoint.CheckpointError,
        r'built with checkpoint_test\._SteeperHead, but restore_model built '
        'one with sact_jax classes only: pass the same classes'):
      checkpoint.restore_model(path)
    restored, _ = checkpoint.restore_model(path, head_cls=_SteeperHead)
    logits, aux = _forward(restored, _images())
    want_logits, want_aux = _forward(custom, _images())
    np.testing.assert_array_equal(logits, want_logits)
    np.testing.assert_array_equal(aux['ponder_loss'], want_aux['ponder_loss'])
    # The classes matter: the default heads halt elsewhere.
    self.assertNotEqual(float(_forward(default, _images())[1]['ponder_loss']),
                        float(want_aux['ponder_loss']))
    # And the other way round.
    plain = checkpoint.save_model(root / 'plain', default, SACT)
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'built with sact_jax classes only, but'):
      checkpoint.restore_model(plain, head_cls=_SteeperHead)

  def test_a_training_workdir_is_named_as_such(self):
    workdir = _tempdir(self)
    (workdir / checkpoint.RUN_DIR).mkdir()
    for read in (checkpoint.restore_model, checkpoint.read_spec,
                 checkpoint.read_metadata):
      with self.assertRaisesRegex(checkpoint.CheckpointError,
                                  'is a training workdir, not a model '
                                  'checkpoint: .* restore_latest_model'):
        read(workdir)


class RestoreIntoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)
    self.vanilla = _random_model(VANILLA, seed=4)
    self.vanilla_dir = checkpoint.save_model(self.root / 'vanilla',
                                             self.vanilla, VANILLA)

  def test_finetuning_restores_trunk_and_keeps_heads(self):
    """The reference's fine-tuning: all but the halting heads come back."""
    sact = _random_model(SACT, seed=5)
    sact.train()
    before = _flat(sact)
    report = checkpoint.restore_into(sact, self.vanilla_dir,
                                     exclude=checkpoint.HALTING_HEADS)
    after, vanilla = _flat(sact), _flat(self.vanilla)

    heads = sorted(n for n in before if '/steps/head/' in n)
    self.assertLen(heads, 2 * 11)  # 2 blocks x 11 SACT head variables.
    self.assertEqual(sorted(report.skipped), heads)
    self.assertCountEqual(report.restored, vanilla.keys())
    self.assertEqual(report.unused, ())
    self.assertIn('head_bn/mean', report.restored)  # Trunk, not a halting head.
    for name in vanilla:
      np.testing.assert_array_equal(after[name], vanilla[name], err_msg=name)
    for name in heads:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    self.assertFalse(sact.head_bn.use_running_average)  # Mode is kept.
    self.assertIn(f'restored {len(vanilla)} variable(s), skipped 22',
                  report.summary())

  def test_missing_variables_change_nothing(self):
    sact = _random_model(SACT, seed=5)
    before = _flat(sact)
    with self.assertRaisesRegex(
        checkpoint.CheckpointError,
        r'22 model variable\(s\) missing .*steps/head.*exclude='):
      checkpoint.restore_into(sact, self.vanilla_dir)
    deeper = _random_model(models.ModelSpec(
        'cifar', (2, 3), 'sact', num_classes=5, base_channels=4), seed=6)
    deeper_before = _flat(deeper)
    with self.assertRaisesRegex(
        checkpoint.CheckpointError,
        r'shape mismatch.*blocks/1/steps/unit/.*source \(1, .* vs model '
        r'\(2, '):
      checkpoint.restore_into(deeper, self.vanilla_dir,
                              exclude=checkpoint.HALTING_HEADS)
    for model, old in ((sact, before), (deeper, deeper_before)):
      for name, value in _flat(model).items():
        np.testing.assert_array_equal(value, old[name], err_msg=name)

  def test_from_a_model_reports_unused(self):
    """An adaptive source into a vanilla model: its heads go unused."""
    sact = _random_model(SACT, seed=7)
    vanilla = _random_model(VANILLA, seed=8)
    report = checkpoint.restore_into(vanilla, sact)
    self.assertEqual(report.skipped, ())
    self.assertLen(report.unused, 22)
    self.assertTrue(all('/steps/head/' in n for n in report.unused))
    source = _flat(sact)
    for name, value in _flat(vanilla).items():
      np.testing.assert_array_equal(value, source[name], err_msg=name)

  def test_exclude_accepts_any_nnx_filter(self):
    """E.g. a new classifier as well as new heads (another label set)."""
    sact = _random_model(SACT, seed=9)
    before = _flat(sact)
    report = checkpoint.restore_into(
        sact, self.vanilla,
        exclude=nnx.Any(checkpoint.HALTING_HEADS, nnx.PathContains('logits')))
    self.assertIn('logits/kernel', report.skipped)
    self.assertIn('logits/kernel', report.unused)
    np.testing.assert_array_equal(_flat(sact)['logits/kernel'],
                                  before['logits/kernel'])

  def test_exclude_by_string_or_matching_nothing_is_refused(self):
    """A string is a tag filter: `exclude='head'` would restore the heads."""
    sact = _random_model(SACT, seed=9)
    before = _flat(sact)
    for exclude, message in (
        ('head', r"exclude='head': a string is an NNX tag filter, not a "
                 r"path; use checkpoint.HALTING_HEADS or "
                 r"nnx.PathContains\('head'\)"),
        (['logits'], r"exclude=\['logits'\]: a string is an NNX tag filter"),
        (nnx.Any(checkpoint.HALTING_HEADS, 'logits'),
         r'a string is an NNX tag filter'),
        (nnx.PathContains('heads'), r'matches no variable of the model')):
      with self.subTest(exclude=exclude):
        with self.assertRaisesRegex(checkpoint.CheckpointError, message):
          checkpoint.restore_into(sact, self.vanilla, exclude=exclude)
    for name, value in _flat(sact).items():
      np.testing.assert_array_equal(value, before[name], err_msg=name)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


if __name__ == '__main__':
  absltest.main()
