"""Tests of sact_jax/saliency_eval.py and the experiments/saliency launcher."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from sact_jax import saliency
from sact_jax import saliency_eval

import evaluate_test  # Same directory: its fast model builder and config.
import saliency_test  # Its CAT2000-layout folder writer.

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_scores(test, result, num_images):
  test.assertEqual(result.num_images, num_images)
  scores = result.scores
  test.assertEqual(set(scores), set(saliency_eval.SOURCES))
  for source, metrics in scores.items():
    test.assertEqual(set(metrics), set(saliency.METRICS), source)
    for name, value in metrics.items():
      test.assertTrue(np.isfinite(value), f'{source} {name}: {value}')
  # A constant map's AUC-Judd is (F + 2) / (2F + 2) for F fixations.
  test.assertBetween(scores['uniform']['auc_judd'], 0.5, 0.75)


class SampleFixationsTest(absltest.TestCase):

  def test_inside_the_mask(self):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    fixations = saliency_eval.sample_fixations(
        mask, 4, np.random.default_rng(0))
    self.assertEqual(fixations.sum(), 4)
    self.assertTrue(np.all(mask[fixations] == 1))
    # Fewer object pixels than fixations: all of them.
    np.testing.assert_array_equal(saliency_eval.sample_fixations(
        mask, 100, np.random.default_rng(0)), mask > 0)
    with self.assertRaisesRegex(ValueError, 'empty'):
      saliency_eval.sample_fixations(np.zeros((4, 4)), 3,
                                     np.random.default_rng(0))


class EvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = cls.enterClassContext(tempfile.TemporaryDirectory())
    cls.model = evaluate_test.fast_model('sact')

  def test_dataset(self):
    config = evaluate_test.make_config(os.path.join(self.tmp, 'data'))
    scores = saliency_eval.evaluate_saliency_on_dataset(
        self.model, config, num_images=30, rng=np.random.default_rng(0))
    assert_scores(self, scores, 30)
    table = saliency_eval.markdown_table(scores)
    self.assertLen(table.splitlines(), 5)
    self.assertIn('| SACT ponder maps |', table)
    self.assertIn('| ACT ponder maps |',
                  saliency_eval.markdown_table(scores, 'act'))
    # Same seed, same numbers.
    again = saliency_eval.evaluate_saliency_on_dataset(
        self.model, config, num_images=30, rng=np.random.default_rng(0))
    self.assertEqual(scores, again)

  def test_cat2000(self):
    root = os.path.join(self.tmp, 'cat2000')
    stimuli = saliency_test.write_cat2000(root)
    scores = saliency_eval.evaluate_saliency_on_cat2000(
        self.model, 'cifar', root, image_size=16,
        rng=np.random.default_rng(0))
    assert_scores(self, scores, len(stimuli))

  def test_cat2000_density(self):
    fixations = np.zeros((10, 50), bool)
    fixations[5, 25] = True
    density = saliency_eval.cat2000_density(fixations)
    self.assertAlmostEqual(density.sum(), 1.0)
    self.assertEqual(np.unravel_index(density.argmax(), density.shape),
                     (5, 25))


def _run(args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.saliency', *args], cwd=_REPO,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


class LauncherTest(absltest.TestCase):

  def test_launcher(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    checkpoint = os.path.join(tmp, 'ckpt')
    evaluate_test.save_fast_model(checkpoint)
    root = os.path.join(tmp, 'cat2000')
    saliency_test.write_cat2000(root)
    missing = _run([f'--checkpoint={checkpoint}',
                    f'--cat2000_dir={tmp}/missing'])
    self.assertEqual(missing.returncode, 2, missing.stderr[-2000:])
    self.assertRegex(missing.stderr.strip().splitlines()[-1],
                     f'^error: .*{tmp}/missing')
    self.assertNotIn('Traceback', missing.stderr)
    neither = _run([f'--cat2000_dir={root}'])
    self.assertEqual(neither.returncode, 2, neither.stderr[-2000:])
    self.assertRegex(neither.stderr.strip().splitlines()[-1],
                     '^error: Give exactly one of --workdir')
    output = os.path.join(tmp, 'scores.json')
    ok = _run([f'--checkpoint={checkpoint}', f'--cat2000_dir={root}',
               '--image_size=16', f'--output={output}'])
    self.assertEqual(ok.returncode, 0, ok.stderr[-3000:])
    for row in ('| SACT ponder maps |', '| centre bias |', '| uniform |'):
      self.assertIn(row, ok.stdout)
    self.assertIn('auc_judd', ok.stdout)
    self.assertIn('SACT cifar ResNet (2, 2, 2) on cat2000_dir=', ok.stdout)
    self.assertIn(': 4 images, seed 0', ok.stdout)
    with open(output) as f:
      written = json.load(f)
    # The numbers and what they were measured on.
    self.assertEqual(
        {k: written[k] for k in ('cat2000_dir', 'image_size', 'num_images',
                                 'seed')},
        {'cat2000_dir': root, 'image_size': 16, 'num_images': 4, 'seed': 0})
    self.assertEqual((written['model']['model_type'],
                      written['model']['units']), ('sact', [2, 2, 2]))
    assert_scores(self, saliency_eval.SaliencyScores(
        written['scores'], written['num_images']), 4)


if __name__ == '__main__':
  absltest.main()
