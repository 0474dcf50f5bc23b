"""Tests of sact_jax/saliency.py: metrics, post-processing, CAT2000 loader."""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
import scipy.io

from sact_jax import saliency

# Saliency 1..9 row-major; fixations on the 5 and the 9.
_RAMP = np.arange(1.0, 10.0).reshape(3, 3)
_FIX = np.zeros((3, 3), bool)
_FIX[1, 1] = _FIX[2, 2] = True


def _random_case(seed=0, shape=(16, 16), num_fixations=12):
  rng = np.random.default_rng(seed)
  fixations = np.zeros(shape, bool)
  fixations.flat[rng.choice(fixations.size, num_fixations, replace=False)] = 1
  return rng.random(shape), fixations


def _benchmark_auc_judd(saliency_map, fixations, rng):
  """The MIT benchmark's AUC_Judd (jitter on), written out for the tests."""
  sal = saliency_map + rng.random(saliency_map.shape) / 1e7
  sal = ((sal - sal.min()) / (sal.max() - sal.min())).ravel()
  fixated = fixations.ravel()
  thresholds = np.sort(sal[fixated])[::-1]
  count = np.arange(1, thresholds.size + 1)
  above = np.sum(sal[None, :] >= thresholds[:, None], axis=1)
  tp = np.concatenate([[0.0], count / thresholds.size, [1.0]])
  fp = np.concatenate([[0.0], (above - count) / (sal.size - thresholds.size),
                       [1.0]])
  return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2))


class HandComputedTest(absltest.TestCase):

  def test_auc_judd(self):
    # Thresholds 9 and 5; 2 fixated pixels, 7 others.
    #   t=9: tp=1/2, fp=0/7;  t=5: tp=1, fp=|{6,7,8}|/7=3/7.
    # ROC (0,0) (0,1/2) (3/7,1) (1,1):
    #   area = 3/7 * (1/2 + 1)/2 + 4/7 * 1 = 9/28 + 16/28 = 25/28.
    self.assertAlmostEqual(saliency.auc_judd(_RAMP, _FIX), 25 / 28)

  def test_nss(self):
    # Mean 5; sample variance (16+9+4+1+0+1+4+9+16)/8 = 7.5.
    # Standardised: 9 -> 4/sqrt(7.5), 5 -> 0; mean 2/sqrt(7.5).
    self.assertAlmostEqual(saliency.nss(_RAMP, _FIX), 2 / np.sqrt(7.5))

  def test_auc_shuffled(self):
    # Negatives: the 1 and the 7 (exactly #fixations, so every split uses
    # both). Normalised to [0, 1]: fixated 1.0 and 0.5, negatives 0, 0.75.
    # Thresholds 1.0, 0.9, ..., 0: tp=1/2 for t>0.5, 1 below; fp=0 for
    # t>0.75, 1/2 for 0<t<=0.75, 1 at t=0.
    # ROC (0,0) (0,1/2) (1/2,1/2) (1/2,1) (1,1): area 1/4 + 1/2 = 3/4.
    others = np.zeros((3, 3), bool)
    others[0, 0] = others[2, 0] = True
    score = saliency.auc_shuffled(_RAMP, _FIX, others, num_splits=3,
                                  rng=np.random.default_rng(0))
    self.assertAlmostEqual(score, 0.75)

  def test_distribution_metrics(self):
    p = np.array([[1.0, 3.0]])  # -> [1/4, 3/4]
    q = np.array([[1.0, 1.0]])  # -> [1/2, 1/2]
    # KL(q || p) = 1/2 log(2) + 1/2 log(2/3) (eps is negligible here).
    self.assertAlmostEqual(saliency.kl_div(p, q),
                           0.5 * np.log(2) + 0.5 * np.log(2 / 3))
    # SIM min-max normalises first: p -> [0, 1], q constant -> uniform.
    self.assertAlmostEqual(saliency.similarity(p, q), 0.5)
    self.assertAlmostEqual(
        saliency.cc(np.array([[1.0, 2.0, 3.0]]), np.array([[3.0, 2.0, 1.0]])),
        -1.0)


class PropertyTest(parameterized.TestCase):

  def test_map_equal_to_fixations(self):
    _, fixations = _random_case()
    as_map = fixations.astype(np.float64)
    self.assertAlmostEqual(saliency.auc_judd(as_map, fixations), 1.0)
    borji = saliency.auc_borji(as_map, fixations,
                               rng=np.random.default_rng(0))
    # A random negative hits a fixation with probability 12/256.
    self.assertGreater(borji, 0.9)
    self.assertLessEqual(borji, 1.0)

  def test_constant_map_is_chance(self):
    _, fixations = _random_case()
    constant = np.full(fixations.shape, 3.0)
    # AUC-Judd's curve starts with a straight line from (0, 0), so a
    # constant map scores (F + 2) / (2F + 2) in the benchmark, F = 12.
    self.assertAlmostEqual(saliency.auc_judd(constant, fixations), 14 / 26)
    self.assertAlmostEqual(
        saliency.auc_borji(constant, fixations, rng=np.random.default_rng(0)),
        0.5)
    self.assertEqual(saliency.nss(constant, fixations), 0.0)

  def test_random_map_auc_borji_near_half(self):
    # A map independent of the fixations: AUC-Borji near chance.
    scores = [saliency.auc_borji(*_random_case(seed, (32, 32), 50),
                                 rng=np.random.default_rng(seed))
              for seed in range(5)]
    self.assertAlmostEqual(np.mean(scores), 0.5, delta=0.05)

  @parameterized.parameters((2.0, 5.0), (0.1, -3.0), (1e3, 1e3))
  def test_nss_affine_invariant(self, a, b):
    sal, fixations = _random_case()
    self.assertAlmostEqual(saliency.nss(a * sal + b, fixations),
                           saliency.nss(sal, fixations), places=10)

  def test_auc_judd_fixations_tied_below_everything(self):
    # Both fixated pixels hold the lowest value: ROC (0,0) (1,1/2) (1,1).
    self.assertAlmostEqual(saliency.auc_judd(1.0 - _FIX, _FIX), 0.25)

  @parameterized.parameters(0, 1, 2)
  def test_auc_judd_is_the_benchmarks_mean_over_jitter(self, seed):
    """Maps with many ties (a coarse map upsampled, as ponder maps are)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, (3, 3)).astype(np.float64)
    sal = np.kron(coarse, np.ones((4, 4)))
    fixations = np.zeros(sal.shape, bool)
    fixations.flat[rng.choice(sal.size, 10, replace=False)] = True
    jittered = [_benchmark_auc_judd(sal, fixations, rng) for _ in range(4000)]
    # The jittered scores' standard deviation is below 0.1, so the mean of
    # 4000 is within 0.005 of its expectation (3 sigma).
    self.assertAlmostEqual(saliency.auc_judd(sal, fixations),
                           np.mean(jittered), delta=0.005)

  def test_auc_judd_rank_invariant(self):
    sal, fixations = _random_case()
    self.assertAlmostEqual(saliency.auc_judd(np.exp(3 * sal), fixations),
                           saliency.auc_judd(sal, fixations))

  def test_identical_distributions(self):
    density = _random_case()[0] + 0.1
    self.assertAlmostEqual(saliency.cc(density, density), 1.0)
    self.assertAlmostEqual(saliency.kl_div(density, density), 0.0, places=12)
    self.assertAlmostEqual(saliency.similarity(density, density), 1.0)
    self.assertGreater(saliency.kl_div(np.roll(density, 5), density), 0.0)
    self.assertLess(saliency.similarity(np.roll(density, 5), density), 1.0)

  def test_resizes_saliency_to_fixations(self):
    small = np.zeros((8, 8))
    small[2, 5] = 1.0
    fixations = np.zeros((16, 16), bool)
    fixations[4:6, 10:12] = True  # The same place at twice the size.
    density = fixations.astype(np.float64)
    rng = np.random.default_rng(0)
    self.assertGreater(saliency.auc_judd(small, fixations), 0.95)
    self.assertGreater(saliency.auc_borji(small, fixations, rng=rng), 0.9)
    self.assertGreater(saliency.nss(small, fixations), 3.0)
    self.assertGreater(saliency.cc(small, density), 0.5)
    self.assertTrue(np.isfinite(saliency.kl_div(small, density)))
    self.assertGreater(saliency.similarity(small, density), 0.2)

  def test_shuffled_auc_penalises_center_bias(self):
    # Fixations of every image are central: a centre prior beats a uniform
    # map on AUC-Judd but not on shuffled AUC.
    rng = np.random.default_rng(0)
    fixations, others = np.zeros((2, 32, 32), bool)
    fixations[14:18, 14:18] = True
    others[13:19, 13:19] = True
    center = saliency.center_bias((32, 32))
    self.assertGreater(saliency.auc_judd(center, fixations), 0.9)
    self.assertLess(saliency.auc_shuffled(center, fixations, others, rng=rng),
                    0.7)


class PostProcessingTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(blur_sigma=None, center_bias_weight=0.0),
      dict(blur_sigma=0.0, center_bias_weight=0.0),
      dict(blur_sigma=3.0, center_bias_weight=0.3),
      dict(blur_sigma=(1.0, 2.0), center_bias_weight=1.0))
  def test_distribution(self, blur_sigma, center_bias_weight):
    ponder = np.random.default_rng(0).uniform(1, 6, (4, 5))
    out = saliency.ponder_to_saliency(
        ponder, (24, 30, 3), blur_sigma=blur_sigma,
        center_bias_weight=center_bias_weight)
    self.assertEqual(out.shape, (24, 30))
    self.assertTrue(np.all(out >= 0))
    self.assertAlmostEqual(out.sum(), 1.0)

  def test_steps(self):
    ponder = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = saliency.ponder_to_saliency(ponder, (4, 4), blur_sigma=0.0,
                                      temperature=0.5)
    # Nearest resize: 2x2 blocks; softmax of 2 * ponder.
    expected = np.repeat(np.repeat(np.exp(2 * ponder), 2, 0), 2, 1)
    np.testing.assert_allclose(out, expected / expected.sum())
    full_bias = saliency.ponder_to_saliency(ponder, (4, 4),
                                            center_bias_weight=1.0)
    np.testing.assert_allclose(full_bias, saliency.center_bias((4, 4)))
    # A lower temperature sharpens the distribution.
    sharp = saliency.ponder_to_saliency(ponder, (4, 4), blur_sigma=0.0,
                                        temperature=0.1)
    self.assertGreater(sharp.max(), out.max())

  def test_baselines(self):
    center = saliency.center_bias((9, 13))
    self.assertAlmostEqual(center.sum(), 1.0)
    self.assertEqual(np.unravel_index(center.argmax(), center.shape), (4, 6))
    np.testing.assert_allclose(center, center[::-1, ::-1])
    np.testing.assert_allclose(saliency.uniform((3, 4)),
                               np.full((3, 4), 1 / 12))

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'temperature'):
      saliency.ponder_to_saliency(np.ones((2, 2)), (4, 4), temperature=0.0)
    with self.assertRaisesRegex(ValueError, 'center_bias_weight'):
      saliency.ponder_to_saliency(np.ones((2, 2)), (4, 4),
                                  center_bias_weight=1.5)
    with self.assertRaisesRegex(ValueError, '2-D'):
      saliency.ponder_to_saliency(np.ones((1, 2, 2)), (4, 4))
    with self.assertRaisesRegex(ValueError, 'sigma_fraction'):
      saliency.center_bias((4, 4), sigma_fraction=0.0)
    with self.assertRaisesRegex(ValueError, r'got an array of shape '
                                r'\(4, 4, 3\) \(pass image.shape'):
      saliency.ponder_to_saliency(np.ones((2, 2)), np.zeros((4, 4, 3)))
    saliency_map, fixations = _random_case()
    with self.assertRaisesRegex(TypeError, 'rng must be a numpy Generator .*'
                                'got int'):
      saliency.auc_borji(saliency_map, fixations, rng=0)
    with self.assertRaisesRegex(TypeError, 'rng must be a numpy Generator'):
      saliency.auc_shuffled(saliency_map, fixations, fixations, rng=0)
    with self.assertRaisesRegex(TypeError, 'rng must be a numpy Generator'):
      saliency.evaluate_maps([saliency_map] * 2, [fixations] * 2,
                             [fixations + 0.5] * 2, rng=0)


class EvaluateMapsTest(absltest.TestCase):

  def test_means(self):
    cases = [_random_case(seed) for seed in range(3)]
    maps = [c[0] for c in cases]
    fixations = [c[1] for c in cases]
    densities = [f.astype(np.float64) + 0.01 for f in fixations]
    result = saliency.evaluate_maps(maps, fixations, densities,
                                    rng=np.random.default_rng(0))
    self.assertEqual(tuple(result), saliency.METRICS)
    expected_judd = np.mean([saliency.auc_judd(m, f)
                             for m, f in zip(maps, fixations)])
    self.assertAlmostEqual(result['auc_judd'], expected_judd)
    self.assertAlmostEqual(result['cc'], np.mean(
        [saliency.cc(m, d) for m, d in zip(maps, densities)]))
    # Perfect maps score better everywhere than random ones.
    perfect = saliency.evaluate_maps(densities, fixations, densities,
                                     rng=np.random.default_rng(0))
    for name in saliency.METRICS:
      if name == 'kl_div':
        self.assertLess(perfect[name], result[name])
      else:
        self.assertGreater(perfect[name], result[name], name)

  def test_bad_input(self):
    fixations = _random_case()[1]
    with self.assertRaisesRegex(ValueError, 'at least 2'):
      saliency.evaluate_maps([fixations], [fixations], [fixations],
                             rng=np.random.default_rng(0))
    with self.assertRaisesRegex(ValueError, '2 saliency maps, 1 fixation'):
      saliency.evaluate_maps([fixations] * 2, [fixations], [fixations] * 2,
                             rng=np.random.default_rng(0))


class BadInputTest(parameterized.TestCase):

  def test_no_fixations(self):
    empty = np.zeros((4, 4))
    rng = np.random.default_rng(0)
    for fn in (saliency.auc_judd, saliency.nss):
      with self.assertRaisesRegex(ValueError, 'no fixations'):
        fn(np.ones((4, 4)), empty)
    with self.assertRaisesRegex(ValueError, 'no fixations'):
      saliency.auc_borji(np.ones((4, 4)), empty, rng=rng)
    with self.assertRaisesRegex(ValueError, 'other_fixation_map has no'):
      saliency.auc_shuffled(np.ones((4, 4)), np.eye(4), empty, rng=rng)

  def test_a_density_for_a_fixation_map(self):
    """Blurred, it is > 0 almost everywhere: "fixated everywhere"."""
    saliency_map, fixations = _random_case()
    density = fixations + 0.01
    rng = np.random.default_rng(0)
    message = (r'fixation_map has fractional values \(in \[0.01, 1.01\]\): '
               r'a fixation density\?')
    for fn in (saliency.auc_judd, saliency.nss):
      with self.assertRaisesRegex(ValueError, message):
        fn(saliency_map, density)
    with self.assertRaisesRegex(ValueError, message):
      saliency.auc_borji(saliency_map, density, rng=rng)
    with self.assertRaisesRegex(ValueError, 'other_fixation_map has fract'):
      saliency.auc_shuffled(saliency_map, fixations, density, rng=rng)
    with self.assertRaisesRegex(ValueError, message):  # Swapped arguments.
      saliency.evaluate_maps([saliency_map] * 2, [density] * 2,
                             [fixations] * 2, rng=rng)
    # 0/1 floats and counts are binary maps.
    self.assertEqual(saliency.nss(saliency_map, fixations.astype(float)),
                     saliency.nss(saliency_map, 3 * fixations))

  def test_not_2d(self):
    fixations = np.eye(4)
    with self.assertRaisesRegex(ValueError, 'saliency_map must be a 2-D'):
      saliency.auc_judd(np.ones((4, 4, 3)), fixations)
    with self.assertRaisesRegex(ValueError, 'fixation_map must be a 2-D'):
      saliency.nss(np.ones((4, 4)), np.ones((4, 4, 1)))
    with self.assertRaisesRegex(ValueError, 'fixation_density must be a 2-D'):
      saliency.cc(np.ones((4, 4)), np.ones((2, 4, 4)))

  def test_other_shapes_and_values(self):
    rng = np.random.default_rng(0)
    with self.assertRaisesRegex(ValueError, 'other_fixation_map has shape'):
      saliency.auc_shuffled(np.ones((4, 4)), np.eye(4), np.eye(5), rng=rng)
    with self.assertRaisesRegex(ValueError, 'negative'):
      saliency.kl_div(-np.ones((4, 4)), np.ones((4, 4)))
    with self.assertRaisesRegex(ValueError, 'all zeros'):
      saliency.similarity(np.ones((4, 4)), np.zeros((4, 4)))
    with self.assertRaisesRegex(ValueError, 'non-finite'):
      saliency.nss(np.full((4, 4), np.nan), np.eye(4))
    with self.assertRaisesRegex(ValueError, 'everywhere'):
      saliency.auc_judd(np.ones((4, 4)), np.ones((4, 4)))
    with self.assertRaisesRegex(ValueError, 'num_splits'):
      saliency.auc_borji(np.ones((4, 4)), np.eye(4), num_splits=0, rng=rng)


def write_cat2000(root: str) -> dict[str, np.ndarray]:
  """Writes a CAT2000-layout folder; returns each image's fixation map.

  2 categories x 2 images, fixations as 8x8 blocks (one image's as exact
  locations in a .mat instead). Uniform 8x8-aligned blocks in a greyscale
  JPEG at quality 100 decode exactly, so "nonzero = fixated" gives back the
  blocks.
  """
  expected = {}
  rng = np.random.default_rng(0)
  for c, category in enumerate(('Action', 'Indoor')):
    os.makedirs(os.path.join(root, 'Stimuli', category))
    os.makedirs(os.path.join(root, 'FIXATIONMAPS', category))
    for i in range(2):
      stem = f'{i + 1:03d}'
      pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(
          os.path.join(root, 'Stimuli', category, stem + '.jpg'))
      fixations = np.zeros((16, 24), bool)
      fixations[8 * (i % 2):8 * (i % 2) + 8, 8 * c:8 * c + 8] = True
      Image.fromarray(fixations.astype(np.uint8) * 255, 'L').save(
          os.path.join(root, 'FIXATIONMAPS', category, stem + '.jpg'),
          quality=100)
      expected[f'{category}/{stem}'] = fixations
  # One stimulus with exact locations in a .mat, overriding its map image.
  locations = np.zeros((16, 24), np.uint8)
  locations[3, 7] = locations[10, 20] = 1
  scipy.io.savemat(os.path.join(root, 'Stimuli', 'Indoor', '002.mat'),
                   {'fixLocs': locations})
  expected['Indoor/002'] = locations.astype(bool)
  return expected


class LoadCat2000Test(absltest.TestCase):

  def test_loads(self):
    with tempfile.TemporaryDirectory() as root:
      expected = write_cat2000(root)
      loaded = list(saliency.load_cat2000(root))
    self.assertEqual([name for name, _, _ in loaded], sorted(expected))
    for name, image, fixations in loaded:
      self.assertEqual(image.dtype, np.uint8)
      self.assertEqual(image.shape, (16, 24, 3))
      self.assertEqual(fixations.dtype, bool)
      np.testing.assert_array_equal(fixations, expected[name], err_msg=name)

  def test_errors(self):
    with tempfile.TemporaryDirectory() as root:
      with self.assertRaisesRegex(FileNotFoundError, 'No Stimuli folder'):
        list(saliency.load_cat2000(root))
      write_cat2000(root)
      os.remove(os.path.join(root, 'FIXATIONMAPS', 'Action', '002.jpg'))
      with self.assertRaisesRegex(FileNotFoundError,
                                  'Action/002 has no fixation map'):
        list(saliency.load_cat2000(root))


if __name__ == '__main__':
  absltest.main()
