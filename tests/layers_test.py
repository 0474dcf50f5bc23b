"""Tests of `sact_jax.layers`' BatchNorm affines."""

import contextlib
import io

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

from sact_jax import layers
import testing_utils as tu


def _bn(channels: int, **kwargs) -> nnx.BatchNorm:
  bn = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-3,
                     rngs=nnx.Rngs(0), **kwargs)
  tu.randomize_batch_norm(bn, np.random.default_rng(1))
  return bn


class LeakyReluTest(absltest.TestCase):

  def test_values_and_gradient(self):
    x = jnp.array([-3.0, -1e-30, -0.0, 0.0, 1e-30, 2.5, jnp.nan, -jnp.inf,
                   jnp.inf])
    got = layers.leaky_relu(x)
    np.testing.assert_array_equal(got, jnp.maximum(x, 0.1 * x))
    np.testing.assert_array_equal(jnp.signbit(got),
                                  jnp.signbit(jnp.maximum(x, 0.1 * x)))
    grad = jax.vmap(jax.grad(layers.leaky_relu))(x[:6])
    # TensorFlow's gradient of the maximum: 1 from 0 up, 0.1 below.
    np.testing.assert_allclose(grad, [0.1, 0.1, 1.0, 1.0, 1.0, 1.0],
                               rtol=1e-7)

  def test_backward_keeps_only_the_output(self):
    x = jnp.linspace(-2.0, 2.0, 24).reshape(2, 3, 4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      ad_checkpoint.print_saved_residuals(
          lambda x: jnp.sum(jnp.sin(layers.leaky_relu(x))), x)
    kept = [line for line in out.getvalue().splitlines()
            if 'literal' not in line]
    # The output (for sin's derivative too), and no bool map of its side.
    self.assertNotEmpty(kept)
    self.assertFalse([line for line in kept if line.startswith('bool')])
    got = jax.grad(lambda x: jnp.sum(jnp.sin(layers.leaky_relu(x))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.maximum(x, 0.1 * x))))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6)


class BatchNormAffineTest(parameterized.TestCase):

  @parameterized.parameters(((3, 4, 5, 6),), ((7, 6),), ((1, 1, 1, 6),))
  def test_batch_statistics_affine_is_the_training_batch_norm(self, shape):
    x = tu.images(shape, seed=2) * 3.0 - 1.0
    ours, theirs = _bn(6), _bn(6)
    scale_C, shift_C = layers.batch_statistics_affine(ours, x)
    chex.assert_shape((scale_C, shift_C), (6,))
    np.testing.assert_allclose(x * scale_C + shift_C, theirs(x), rtol=1e-5,
                               atol=1e-5)
    # The running averages moved as nnx.BatchNorm's call moves them.
    for name in ('mean', 'var'):
      np.testing.assert_allclose(getattr(ours, name)[...],
                                 getattr(theirs, name)[...], rtol=1e-5,
                                 atol=1e-6)
      self.assertFalse(np.allclose(getattr(ours, name)[...],
                                   getattr(_bn(6), name)[...]))

  @parameterized.parameters(((3, 4, 5, 6),), ((7, 6),))
  def test_batch_statistics_affine_grads_are_the_batch_norms(self, shape):
    """Its own backward pass (a custom VJP keeping `x` and one small
    array): the gradients of autodiff through `nnx.BatchNorm`, for the
    input, the scale and the bias, also through the statistics."""
    x = tu.images(shape, seed=4) * 2.0 + 0.5
    w = tu.images(shape, seed=5)  # Weighs every output differently.
    graphdef, state = nnx.split(_bn(6))

    def loss(state, x, ours):
      bn = nnx.merge(graphdef, state)
      if ours:
        scale_C, shift_C = layers.batch_statistics_affine(bn, x)
        y = x * scale_C + shift_C
      else:
        y = bn(x)
      return jnp.sum(w * y)

    grads = jax.grad(loss, argnums=(0, 1))(state, x, True)
    want = jax.grad(loss, argnums=(0, 1))(state, x, False)
    chex.assert_trees_all_close(grads, want, rtol=1e-4, atol=1e-5)
    # Not vacuous: the statistics' own gradients matter here.
    self.assertGreater(float(jnp.abs(want[1]).max()), 0.1)

  def test_batch_norm_affine_is_the_evaluation_batch_norm(self):
    bn = _bn(6)
    bn.eval()
    x = tu.images((2, 3, 3, 6), seed=3)
    scale_C, shift_C = layers.batch_norm_affine(bn)
    np.testing.assert_allclose(x * scale_C + shift_C, bn(x), rtol=1e-5,
                               atol=1e-5)

  def test_other_batch_norms_are_refused(self):
    x = jnp.ones((2, 6))
    with self.assertRaisesRegex(ValueError, 'fast variance'):
      layers.batch_statistics_affine(_bn(6, use_fast_variance=False), x)


class BatchNormTest(parameterized.TestCase):
  """`layers.BatchNorm`: nnx's in values, the affine map's backward pass."""

  def _pair(self, **kwargs):
    ours = layers.BatchNorm(6, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0),
                            **kwargs)
    theirs = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0),
                           **kwargs)
    tu.randomize_batch_norm(ours, np.random.default_rng(1))
    tu.randomize_batch_norm(theirs, np.random.default_rng(1))
    return ours, theirs

  def test_the_factory_builds_it(self):
    factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3)
    bn = factory.batch_norm(6, rngs=nnx.Rngs(0))
    self.assertIsInstance(bn, layers.BatchNorm)
    self.assertEqual((bn.momentum, bn.epsilon), (0.9, 1e-3))

  @parameterized.parameters(((3, 4, 5, 6),), ((7, 6),))
  def test_training_values_grads_and_statistics_are_nnx(self, shape):
    x = tu.images(shape, seed=2) * 3.0 - 1.0
    w = tu.images(shape, seed=5)
    ours, theirs = self._pair()
    splits = [nnx.split(bn) for bn in (ours, theirs)]

    def loss(state, x, which):
      bn = nnx.merge(splits[which][0], state)
      y = bn(x)
      return jnp.sum(w * y), (y, nnx.state(bn, nnx.BatchStat))

    results = [jax.grad(loss, argnums=(0, 1), has_aux=True)(
        splits[i][1], x, i) for i in (0, 1)]
    (grads, (y, stats)), (want, (y_want, stats_want)) = results
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, want, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(stats, stats_want, rtol=1e-5, atol=1e-6)
    self.assertGreater(float(jnp.abs(want[1]).max()), 0.1)
    # The running averages moved.
    self.assertFalse(np.allclose(stats['mean'][...],
                                 splits[0][1]['mean'][...]))

  def test_backward_keeps_the_input_and_small_arrays(self):
    """No centred or normalised map is kept: one map-sized residual."""
    ours, theirs = self._pair()
    x = tu.images((2, 4, 4, 6), seed=3)

    def kept_maps(bn):
      graphdef, state = nnx.split(bn)
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        ad_checkpoint.print_saved_residuals(
            lambda x, state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x))),
            x, state)
      return [line for line in out.getvalue().splitlines()
              if line.startswith('f32[2,4,4,6]')]

    # Ours: x and sin's derivative; nnx's also a square and a centred map.
    self.assertEqual(sorted(kept_maps(ours))[0],
                     'f32[2,4,4,6] from the argument x')
    self.assertLen(kept_maps(ours), 2)
    self.assertGreater(len(kept_maps(theirs)), 2)

  def test_evaluation_and_masks_are_nnx(self):
    ours, theirs = self._pair()
    x = tu.images((2, 3, 3, 6), seed=3)
    mask = jnp.arange(18).reshape(2, 3, 3, 1) % 3 > 0
    np.testing.assert_array_equal(ours(x, mask=mask),
                                  theirs(x, mask=mask))
    ours.eval()
    theirs.eval()
    np.testing.assert_array_equal(ours(x), theirs(x))
    # Asked for batch statistics, it is the affine map again.
    np.testing.assert_allclose(ours(x, use_running_average=False),
                               theirs(x, use_running_average=False),
                               rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
