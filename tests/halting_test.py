"""Tests of the halting heads in `sact_jax.halting`."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import halting
from sact_jax import layers
import testing_utils as tu


class GlobalTermTest(parameterized.TestCase):

  @parameterized.product(head=('act', 'sact'),
                         activation=(layers.identity, layers.leaky_relu))
  def test_global_term_is_flax_batch_norms(self, head, activation):
    """The global term in training with the factory's `layers.BatchNorm`
    (an affine map with its own backward pass): the same logits,
    gradients and running averages as with `nnx.BatchNorm`."""
    def make(ours):
      factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3)
      cls = halting.ActHead if head == 'act' else halting.SactHead
      h = cls(6, factory=factory, activation=activation, rngs=nnx.Rngs(0))
      self.assertIsInstance(h.global_bn, layers.BatchNorm)
      if not ours:
        h.global_bn = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-3,
                                    rngs=nnx.Rngs(0))
      tu.randomize_batch_norm(h.global_bn, np.random.default_rng(0))
      return h

    mean_BxC = tu.images((5, 1, 1, 6), seed=6)[:, 0, 0] * 2.0 + 0.5
    results = []
    for ours in (True, False):
      graphdef, state = nnx.split(make(ours))

      def logits(state, mean_BxC):
        h = nnx.merge(graphdef, state)
        return h.global_logits(mean_BxC), nnx.state(h, nnx.BatchStat)

      out, stats = logits(state, mean_BxC)
      # A cotangent that weighs every image differently.
      grads = jax.grad(lambda s, m: jnp.sum(
          logits(s, m)[0] * jnp.arange(1.0, 6.0)), argnums=(0, 1))(
              state, mean_BxC)
      results.append((out, stats, grads))
    (out, stats, grads), (want, want_stats, want_grads) = results
    chex.assert_shape(out, (5,))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats, want_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-5)
    self.assertGreater(float(jnp.abs(want_grads[1]).max()), 1e-3)


class SactHeadTest(parameterized.TestCase):

  @parameterized.parameters((2, 5, 7), (1, 1, 1), (3, 2, 9), (1, 14, 14))
  def test_folded_local_bn_equals_bn_then_conv(self, *shape):
    head = tu.sact_head(6, layers.identity, True)
    head.eval()
    self.assertTrue(head.folds_local_bn)
    x = tu.images((*shape, 6), seed=3)
    expected = head.local_conv(head.local_features(x))[..., 0]
    got = head.local_logits(x)
    chex.assert_shape(got, shape)
    # The border positions carry the shift's taps of the inside only.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    kernel_9xC = head.local_conv.kernel[...].reshape(9, -1)
    rows_Sx6 = x.reshape(-1, 6)
    np.testing.assert_allclose(head.local_taps(rows_Sx6),
                               head.local_features(rows_Sx6) @ kernel_9xC.T,
                               rtol=1e-5, atol=1e-5)

  @parameterized.product(shape=((2, 5, 7), (1, 1, 1), (1, 3, 2)),
                         activation=(layers.identity, layers.leaky_relu))
  def test_local_logits_from_tap_map_equal_the_conv(self, shape, activation):
    """The local term from a map of every position's taps (tap d of
    neighbour d, zero outside the image) is the 3x3 conv's, borders
    included."""
    head = tu.sact_head(6, activation, True)
    head.eval()
    x = tu.images((*shape, 6), seed=4)
    taps = head.local_taps(x.reshape(-1, 6)).reshape(*shape, 9)
    got = head.local_logits_from_tap_map(taps)
    chex.assert_shape(got, shape)
    np.testing.assert_allclose(got, head.local_logits(x), rtol=1e-5,
                               atol=1e-5)

  def test_no_fold_in_training_or_with_a_nonlinearity(self):
    head = tu.sact_head(4, layers.identity, True)
    self.assertFalse(head.folds_local_bn)  # Training: batch statistics.
    leaky = tu.sact_head(4, layers.leaky_relu, True)
    leaky.eval()
    self.assertFalse(leaky.folds_local_bn)

  @parameterized.product(activation=(layers.identity, layers.leaky_relu),
                         train=(True, False))
  def test_window_sums_equal_the_conv(self, activation, train):
    """With XLA's convolutions (GPUs, TPUs) the local term is one fused
    reduction (`conv.window_sum`; in training `conv.affine_window_sum`
    or, with the identity, the fold of the batch statistics): the conv's
    values, gradients and running averages."""
    head = tu.sact_head(6, activation, False)
    self.assertTrue(head.sums_windows)
    self.assertFalse(tu.sact_head(6, activation, True).sums_windows)
    if not train:
      head.eval()
    self.assertFalse(head.folds_local_bn)
    x = tu.images((2, 5, 7, 6), seed=4)
    graphdef, state = nnx.split(head)

    def local(state, x, windows):
      h = nnx.merge(graphdef, state)
      if windows:
        return h.local_logits(x)
      return h.local_conv(h.local_features(x))[..., 0]

    got = local(state, x, True)
    chex.assert_shape(got, (2, 5, 7))
    np.testing.assert_allclose(got, local(state, x, False), rtol=1e-5,
                               atol=1e-5)
    loss = lambda state, x, windows: jnp.sum(local(state, x, windows) ** 2)
    chex.assert_trees_all_close(
        jax.grad(loss, argnums=(0, 1))(state, x, True),
        jax.grad(loss, argnums=(0, 1))(state, x, False), rtol=1e-4,
        atol=1e-4)
    if train:  # The running averages move as BatchNorm's call moves them.
      windows, conv = (tu.sact_head(6, activation, False) for _ in range(2))
      windows.local_logits(x)
      conv.local_conv(conv.local_features(x))
      for name in ('mean', 'var'):
        got = getattr(windows.local_bn, name)[...]
        np.testing.assert_allclose(got, getattr(conv.local_bn, name)[...],
                                   rtol=1e-5, atol=1e-6)
        self.assertFalse(np.allclose(got, getattr(head.local_bn, name)[...]))

  @parameterized.parameters((2, 5, 7), (1, 1, 1), (4, 14, 14))
  def test_batch_statistics_fold_equals_bn_then_sums(self, *shape):
    """In training with window sums (GPUs, TPUs) the identity-activation
    head folds the batch statistics: BatchNorm-then-sums' values,
    gradients and running averages."""
    head = tu.sact_head(6, layers.identity, False)
    self.assertTrue(head.folds_batch_statistics)
    self.assertFalse(tu.sact_head(6, layers.leaky_relu, False)
                     .folds_batch_statistics)
    self.assertFalse(tu.sact_head(6, layers.identity, True)
                     .folds_batch_statistics)
    x = tu.images((*shape, 6), seed=5) * 2.0 + 0.5
    before = {name: np.asarray(getattr(head.local_bn, name)[...])
              for name in ('mean', 'var')}

    def local(x, folded):
      h = tu.sact_head(6, layers.identity, False)  # Fresh statistics.
      if folded:
        out = h.local_logits(x)
      else:
        out = h.local_conv(h.local_features(x))[..., 0]
      return out, {name: np.asarray(getattr(h.local_bn, name)[...])
                   for name in before}

    (got, got_stats), (expected, expected_stats) = (
        local(x, True), local(x, False))
    chex.assert_shape(got, shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for name in before:
      np.testing.assert_allclose(got_stats[name], expected_stats[name],
                                 rtol=1e-5, atol=1e-6)
      self.assertFalse(np.allclose(got_stats[name], before[name]))
    graphdef, state = nnx.split(head)

    def loss(state, x, folded):
      h = nnx.merge(graphdef, state)
      if folded:
        return jnp.sum(jnp.sin(h.local_logits(x)))
      return jnp.sum(jnp.sin(h.local_conv(h.local_features(x))[..., 0]))

    chex.assert_trees_all_close(
        jax.grad(loss, argnums=(0, 1))(state, x, True),
        jax.grad(loss, argnums=(0, 1))(state, x, False), rtol=1e-4,
        atol=1e-4)

  def test_folded_head_gradient_matches(self):
    head = tu.sact_head(5, layers.identity, True)
    head.eval()
    x = tu.images((2, 4, 4, 5), seed=1)
    graphdef, state = nnx.split(head)

    def loss(state, folded):
      h = nnx.merge(graphdef, state)
      if folded:
        return jnp.sum(h.local_logits(x) ** 2)
      return jnp.sum(h.local_conv(h.local_features(x))[..., 0] ** 2)

    got = jax.grad(loss)(state, True)
    expected = jax.grad(loss)(state, False)
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-4)


if __name__ == '__main__':
  absltest.main()
