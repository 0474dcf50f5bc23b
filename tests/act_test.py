"""Tests of the pure halting arithmetic in `sact_jax.act`."""

import contextlib
import io

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax import ad_checkpoint
from jax import lax
import jax.numpy as jnp
import numpy as np

from sact_jax import act
import testing_utils as tu


def _np_halting(halting, eps):
  """Sequential float32 ACT in numpy, one position at a time.

  Returns probs `[L, ...]`, num_units, remainder and ponder cost `[...]`.
  """
  halting = np.asarray(halting, np.float32)
  num_layers = halting.shape[0]
  flat = halting.reshape(num_layers, -1)
  probs = np.zeros_like(flat)
  num_units = np.zeros(flat.shape[1], np.int32)
  remainder = np.zeros(flat.shape[1], np.float32)
  threshold = np.float32(1.0 - eps)
  for j in range(flat.shape[1]):
    cumulative = np.float32(0.0)
    for l in range(num_layers):
      h = np.float32(1.0) if l == num_layers - 1 else flat[l, j]
      if cumulative + h >= threshold:
        num_units[j] = l + 1
        remainder[j] = np.float32(1.0) - cumulative
        probs[l, j] = remainder[j]
        break
      probs[l, j] = h
      cumulative = cumulative + h
  trailing = halting.shape[1:]
  return (probs.reshape(halting.shape), num_units.reshape(trailing),
          remainder.reshape(trailing),
          (num_units + remainder).reshape(trailing))


def _incremental(halting, xs, eps):
  """Algorithm 1: `act.step` under `lax.scan`, then `act.finish`."""
  state = act.init_state(xs[0], halting.shape[1:])

  def body(state, inputs):
    h, x = inputs
    return act.step(state, h, x, eps), None

  state, _ = lax.scan(body, state, (halting[:-1], xs[:-1]))
  return act.finish(state, xs[-1], eps)


def _closed_form_output(halting, xs, eps):
  dist = act.halting_distribution(halting, eps)
  extra = xs.ndim - halting.ndim
  probs = dist.probs.reshape(dist.probs.shape + (1,) * extra)
  return dist, jnp.sum(probs * xs, axis=0)


def _straddling_halting(rng, num_layers, batch_shape, eps, delta):
  """Scores whose partial sums land `delta` above or below `1 - eps`.

  Each position gets a target unit n (1..L-1) where the cumulative sum
  reaches `1 - eps + s * delta`, s = +-1, split over units 1..n at random:
  s = +1 halts exactly there, s = -1 misses it by `delta`.
  """
  size = int(np.prod(batch_shape))
  halting = rng.uniform(0.0, 0.2, size=(num_layers, size))
  for j in range(size):
    n = rng.integers(1, num_layers)
    sign = rng.choice([-1.0, 1.0])
    weights = rng.dirichlet(np.ones(n))
    halting[:n, j] = weights * (1.0 - eps + sign * delta)
  return jnp.asarray(halting.reshape((num_layers,) + batch_shape),
                     jnp.float32)


class HaltingDistributionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('halts_at_second', [0.3, 0.8, 0.5], 0.01, [0.3, 0.7, 0.0], 2, 0.7),
      ('last_score_ignored', [0.3, 0.8, 0.0], 0.01, [0.3, 0.7, 0.0], 2, 0.7),
      ('never_halts_early', [0.1, 0.2, 0.3, 0.9], 0.01,
       [0.1, 0.2, 0.3, 0.4], 4, 0.4),
      ('halts_at_first', [0.995, 0.5, 0.5], 0.01, [1.0, 0.0, 0.0], 1, 1.0),
      ('first_exactly_at_threshold', [0.99, 0.5], 0.01, [1.0, 0.0], 1, 1.0),
      ('small_eps_runs_on', [0.5, 0.45, 0.2], 0.01, [0.5, 0.45, 0.05], 3,
       0.05),
      ('large_eps_stops', [0.5, 0.45, 0.2], 0.1, [0.5, 0.5, 0.0], 2, 0.5),
      ('single_unit', [0.2], 0.01, [1.0], 1, 1.0),
  )
  def test_hand_worked(self, halting, eps, probs, num_units, remainder):
    """N, R, p and rho = N + R of small cases worked out by hand."""
    fn = self.variant(act.halting_distribution, static_argnames='eps')
    dist = fn(jnp.asarray(halting, jnp.float32), eps=eps)
    chex.assert_trees_all_close(dist.probs, jnp.asarray(probs), atol=1e-6)
    self.assertEqual(int(dist.num_units), num_units)
    self.assertEqual(dist.num_units.dtype, jnp.int32)
    self.assertAlmostEqual(float(dist.remainder), remainder, places=6)
    self.assertAlmostEqual(float(dist.ponder_cost), num_units + remainder,
                           places=5)
    # Algorithm 1 makes the same decisions; output = sum_l p^l x^l.
    xs = jnp.arange(1.0, len(halting) + 1.0)[:, None] ** 2
    state = self.variant(_incremental, static_argnames='eps')(
        jnp.asarray(halting, jnp.float32), xs, eps=eps)
    self.assertEqual(int(state.num_units), num_units)
    self.assertAlmostEqual(float(state.remainder), remainder, places=6)
    self.assertAlmostEqual(float(state.ponder_cost), num_units + remainder,
                           places=5)
    self.assertAlmostEqual(float(state.output[0]),
                           float(np.dot(probs, np.asarray(xs)[:, 0])),
                           places=4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((5,), 0.01), ((2, 3, 4), 0.01),
                            ((2, 3, 4), 0.2))
  def test_matches_numpy_on_trailing_shapes(self, batch_shape, eps):
    """`[B]` (ACT) and `[B, H, W]` (SACT) score tensors, vs numpy."""
    rng = np.random.default_rng(0)
    halting = jnp.asarray(rng.uniform(0.0, 0.7, (4,) + batch_shape),
                          jnp.float32)
    fn = self.variant(act.halting_distribution, static_argnames='eps')
    dist = fn(halting, eps=eps)
    probs, num_units, remainder, ponder = _np_halting(halting, eps)
    chex.assert_shape(dist.probs, (4,) + batch_shape)
    chex.assert_shape((dist.num_units, dist.remainder, dist.ponder_cost),
                      batch_shape)
    np.testing.assert_array_equal(dist.num_units, num_units)
    np.testing.assert_allclose(dist.probs, probs, atol=1e-6)
    np.testing.assert_allclose(dist.remainder, remainder, atol=1e-6)
    np.testing.assert_allclose(dist.ponder_cost, ponder, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(dist.probs, axis=0), 1.0, atol=1e-6)
    # Several units actually occur, so the test covers more than one branch.
    self.assertGreater(len(np.unique(num_units)), 1)

  def test_last_score_is_ignored(self):
    rng = np.random.default_rng(1)
    halting = jnp.asarray(rng.uniform(0.0, 0.4, (3, 6)), jnp.float32)
    a = act.halting_distribution(halting.at[-1].set(0.0))
    b = act.halting_distribution(halting.at[-1].set(0.77))
    chex.assert_trees_all_equal(a, b)

  @parameterized.parameters(((),), ((3,),), ((2, 2, 3),))
  def test_ponder_gradient_is_minus_one_before_halting(self, batch_shape):
    """d rho / d h^l = -1 for l < N - 1 (0-based), 0 otherwise."""
    rng = np.random.default_rng(2)
    halting = jnp.asarray(rng.uniform(0.05, 0.6, (5,) + batch_shape),
                          jnp.float32)
    jac = jax.jit(jax.jacrev(
        lambda h: act.halting_distribution(h).ponder_cost))(halting)
    n = np.asarray(act.halting_distribution(halting).num_units)
    size = int(np.prod(batch_shape, dtype=int))
    jac = np.asarray(jac).reshape(size, 5, size)
    n = n.reshape(size)
    expected = np.zeros_like(jac)
    for j in range(size):
      expected[j, :n[j] - 1, j] = -1.0
    np.testing.assert_array_equal(jac, expected)

  def test_output_gradient_flows_through_probs(self):
    """Output = sum_l p^l x^l; d out / d h^l = x^l - x^{N-1} before N."""
    halting = jnp.asarray([0.2, 0.3, 0.9, 0.5], jnp.float32)  # N = 3.
    xs = jnp.asarray([1.0, 2.0, 5.0, 11.0], jnp.float32)
    grad = jax.jit(jax.grad(
        lambda h: _closed_form_output(h, xs, 0.01)[1]))(halting)
    np.testing.assert_allclose(grad, [1.0 - 5.0, 2.0 - 5.0, 0.0, 0.0])


class IncrementalTest(parameterized.TestCase):
  """Algorithm 1 (carry through the units) equals the closed form."""

  @parameterized.named_parameters(
      ('act_random', (6,), 0.01, None),
      ('sact_random', (2, 3, 4), 0.01, None),
      ('sact_random_eps', (2, 3, 4), 0.15, None),
      ('act_straddle', (16,), 0.01, 1e-3),
      ('sact_straddle', (2, 4, 4), 0.01, 1e-5),
  )
  def test_scan_equals_closed_form(self, batch_shape, eps, delta):
    rng = np.random.default_rng(3)
    num_layers, channels = 5, 3
    if delta is None:
      halting = jnp.asarray(rng.uniform(0.0, 0.6,
                                        (num_layers,) + batch_shape),
                            jnp.float32)
    else:
      halting = _straddling_halting(rng, num_layers, batch_shape, eps, delta)
    xs = jnp.asarray(rng.normal(size=(num_layers,) + batch_shape
                                + (channels,)), jnp.float32)
    state = jax.jit(_incremental, static_argnums=2)(halting, xs, eps)
    dist, output = jax.jit(_closed_form_output, static_argnums=2)(
        halting, xs, eps)
    np.testing.assert_array_equal(state.num_units, dist.num_units)
    np.testing.assert_allclose(state.remainder, dist.remainder, atol=1e-6)
    np.testing.assert_allclose(state.ponder_cost, dist.ponder_cost,
                               atol=1e-5)
    np.testing.assert_allclose(state.output, output, atol=1e-5)
    np.testing.assert_array_equal(state.running, 0.0)
    self.assertGreater(len(np.unique(dist.num_units)), 1)
    if delta is not None:
      # Straddling cases hit the numpy reference's decisions exactly.
      np.testing.assert_array_equal(dist.num_units,
                                    _np_halting(halting, eps)[1])

  @parameterized.parameters(((6,),), ((2, 3, 4),))
  def test_gradients_equal_closed_form(self, batch_shape):
    rng = np.random.default_rng(4)
    num_layers, channels = 4, 2
    halting = jnp.asarray(rng.uniform(0.0, 0.6, (num_layers,) + batch_shape),
                          jnp.float32)
    xs = jnp.asarray(rng.normal(size=(num_layers,) + batch_shape
                                + (channels,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=batch_shape + (channels,)), jnp.float32)

    def loss_scan(h, xs):
      state = _incremental(h, xs, 0.01)
      return jnp.sum(state.output * w) + jnp.sum(state.ponder_cost)

    def loss_closed(h, xs):
      dist, output = _closed_form_output(h, xs, 0.01)
      return jnp.sum(output * w) + jnp.sum(dist.ponder_cost)

    g_scan = jax.jit(jax.grad(loss_scan, argnums=(0, 1)))(halting, xs)
    g_closed = jax.jit(jax.grad(loss_closed, argnums=(0, 1)))(halting, xs)
    chex.assert_trees_all_close(g_scan, g_closed, atol=1e-5)
    # Not vacuous: the halting gradient is nonzero somewhere.
    self.assertGreater(float(jnp.max(jnp.abs(g_scan[0]))), 0.1)

  def test_halted_positions_ignore_later_scores(self):
    x = jnp.ones((2, 3))
    state = act.init_state(x, (2,))
    state = act.step(state, jnp.asarray([0.995, 0.2]), x)
    np.testing.assert_array_equal(state.running, [0.0, 1.0])
    later = act.step(state, jnp.asarray([0.7, 0.3]), 2.0 * x)
    self.assertEqual(float(later.cumulative[0]), float(state.cumulative[0]))
    self.assertEqual(float(later.ponder_cost[0]), float(state.ponder_cost[0]))
    self.assertEqual(int(later.num_units[0]), 1)
    np.testing.assert_array_equal(later.output[0], state.output[0])
    # The running image carries on: ponder 2 units so far, output 0.2 + 0.6.
    self.assertEqual(int(later.num_units[1]), 2)
    np.testing.assert_allclose(later.output[1], 0.2 + 0.3 * 2.0, rtol=1e-6)


class StepVjpTest(parameterized.TestCase):
  """`act.step`'s own backward pass against autodiff of its arithmetic."""

  @staticmethod
  def _inputs(batch_shape, seed):
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    x_shape = batch_shape + (2, 3) if len(batch_shape) == 1 else (
        batch_shape + (3,))
    # Halted (0), running, and running ones that halt at this unit.
    running = f32(rng.uniform(size=batch_shape) > 0.25)
    cumulative = f32(rng.uniform(0.0, 0.9, batch_shape))
    halting = f32(rng.uniform(0.0, 1.0, batch_shape))
    state = act.HaltingState(
        cumulative=cumulative, remainder=f32(rng.uniform(size=batch_shape)),
        output=f32(rng.normal(size=x_shape)),
        ponder_cost=f32(rng.uniform(1.0, 3.0, batch_shape)),
        num_units=jnp.ones(batch_shape, jnp.int32), running=running)
    return state, halting, f32(rng.normal(size=x_shape)), rng

  @staticmethod
  def _autodiff(state, halting, x):
    floats = act._Floats(state.cumulative, state.remainder, state.output,
                         state.ponder_cost, state.running)
    return act._step_values(floats, halting, x, 0.01)

  @parameterized.named_parameters(('act', (16,)), ('sact', (2, 4, 5)))
  def test_gradients_equal_autodiff(self, batch_shape):
    state, halting, x, rng = self._inputs(batch_shape, seed=11)
    halts = (state.running > 0) & (state.cumulative + halting >= 0.99)
    # Every case occurs: halted before, halting now, running on.
    self.assertTrue(bool(jnp.any(halts)))
    self.assertTrue(bool(jnp.any(state.running == 0)))
    self.assertTrue(bool(jnp.any((state.running > 0) & ~halts)))
    fields = ('cumulative', 'remainder', 'output', 'ponder_cost', 'running')
    floats = lambda s: tuple(getattr(s, f) for f in fields)
    with_floats = lambda f: state._replace(**dict(zip(fields, f)))
    got, vjp = jax.vjp(lambda f, h, x: floats(act.step(with_floats(f), h, x)),
                       floats(state), halting, x)
    want, want_vjp = jax.vjp(
        lambda f, h, x: tuple(self._autodiff(with_floats(f), h, x)),
        floats(state), halting, x)
    chex.assert_trees_all_equal(got, want)
    # A cotangent that weighs every output differently.
    g = tuple(jnp.asarray(rng.normal(size=a.shape), jnp.float32)
              for a in got)
    grads, want_grads = vjp(g), want_vjp(g)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-5)
    self.assertGreater(float(jnp.abs(grads[1]).max()), 0.1)
    self.assertGreater(float(jnp.abs(grads[0][0]).max()), 0.1)

  def test_an_array_eps_under_jit_is_the_float_eps(self):
    """eps may be traced (a swept hyperparameter); it gets no gradient."""
    state, halting, x, rng = self._inputs((2, 4, 5), seed=13)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(h, x, eps):
      after = act.finish(act.step(state, h, x, eps), 2.0 * x, eps)
      return jnp.sum(after.output * g) + jnp.sum(after.ponder_cost)

    want = jax.value_and_grad(loss, argnums=(0, 1))(halting, x, 0.01)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        halting, x, jnp.float32(0.01))
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-6)
    chex.assert_trees_all_close(got[1][:2], want[1], rtol=1e-6, atol=1e-6)
    self.assertEqual(float(got[1][2]), 0.0)

  def test_keeps_the_output_and_one_array(self):
    """Autodiff of the arithmetic keeps five arrays of the halting shape;
    `step` keeps one stacked `[3, ...]` array besides `x`."""
    state, halting, x, _ = self._inputs((2, 4, 5), seed=12)

    def kept(fn):
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        ad_checkpoint.print_saved_residuals(
            lambda h, x: jnp.sum(fn(state, h, x).output), halting, x)
      return [line.split(' ')[0] for line in out.getvalue().splitlines()
              if 'literal' not in line]

    self.assertCountEqual(kept(act.step), ['f32[3,2,4,5]', 'f32[2,4,5,3]'])
    self.assertGreater(len(kept(self._autodiff)), 2)


class MaskTest(parameterized.TestCase):

  @parameterized.parameters(((2, 5, 4), (2, 5, 4, 3)), ((2,), (2, 5, 4, 3)))
  def test_masked_residual(self, mask_shape, x_shape):
    rng = np.random.default_rng(5)
    x = rng.normal(size=x_shape).astype(np.float32)
    residual = rng.normal(size=x_shape).astype(np.float32)
    mask = (rng.uniform(size=mask_shape) < 0.5).astype(np.float32)
    got = act.masked_residual(jnp.asarray(x), jnp.asarray(residual),
                              jnp.asarray(mask))
    m = mask.reshape(mask_shape + (1,) * (len(x_shape) - len(mask_shape)))
    np.testing.assert_array_equal(got, x + m * residual)
    # Halted positions keep their value exactly.
    np.testing.assert_array_equal(np.asarray(got)[np.broadcast_to(
        m == 0, x_shape)], x[np.broadcast_to(m == 0, x_shape)])

  @parameterized.parameters((0.1,), (0.5,), (0.0,))
  def test_dilate_mask_is_3x3_max_pool(self, density):
    rng = np.random.default_rng(6)
    mask = (rng.uniform(size=(3, 7, 6)) < density).astype(np.float32)
    mask[0, 0, 0] = 1.0 if density else 0.0  # A corner exercises padding.
    got = jax.jit(act.dilate_mask)(jnp.asarray(mask))
    np.testing.assert_array_equal(got, tu.np_dilate(mask))

  def test_dilate_mask_hand_case(self):
    """A corner dilates to 2 x 2 (SAME, zeros outside), a centre to 3 x 3."""
    mask = np.zeros((1, 5, 5), np.float32)
    mask[0, 0, 0] = mask[0, 3, 3] = 1.0
    expected = [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(act.dilate_mask(jnp.asarray(mask))[0],
                                  expected)



class BadInputTest(parameterized.TestCase):
  """Shapes that would broadcast into wrong results raise instead."""

  def test_masked_residual_shapes(self):
    x = jnp.zeros((1, 3, 3, 2))
    for mask in (jnp.ones((1, 3)), jnp.ones((1, 3, 3, 2, 1))):
      with self.assertRaisesRegex(ValueError, 'per-image'):
        act.masked_residual(x, x, mask)
    for mask in (jnp.ones((1, 3, 2)), jnp.ones((2,))):
      with self.assertRaisesRegex(ValueError, 'does not start with the '
                                  'halting shape'):
        act.masked_residual(x, x, mask)
    with self.assertRaisesRegex(ValueError, 'residual has shape'):
      act.masked_residual(x, x[..., :1], jnp.ones((1, 3, 3)))

  def test_state_and_step_shapes(self):
    with self.assertRaisesRegex(ValueError, r'x has shape \(2, 3\)'):
      act.init_state(jnp.zeros((2, 3)), (5,))
    state = act.init_state(jnp.zeros((2, 4, 4, 3)), (2, 4, 4))
    with self.assertRaisesRegex(ValueError, 'halting has shape'):
      act.step(state, jnp.ones((2, 4)), jnp.zeros((2, 4, 4, 3)))
    with self.assertRaisesRegex(ValueError, 'x has shape'):
      act.step(state, jnp.ones((2, 4, 4)), jnp.zeros((1, 4, 4, 3)))

  def test_step_shapes_are_exact(self):
    """A head's raw [..., 1] output or an x without channels, which would
    broadcast or fail deep inside JAX."""
    x = jnp.ones((1, 4, 4, 8))
    state = act.init_state(x, (1, 4, 4))
    with self.assertRaisesRegex(
        ValueError, r'halting has shape \(1, 4, 4, 1\); expected the halting '
        r'shape \(1, 4, 4\) \(drop the channel axis'):
      act.step(state, jnp.full((1, 4, 4, 1), 0.3), x)
    with self.assertRaisesRegex(ValueError, r'x has shape \(1, 4, 4\); '
                                r'expected .* \(1, 4, 4, 8\)'):
      act.step(state, jnp.full((1, 4, 4), 0.3), jnp.ones((1, 4, 4)))

  @parameterized.parameters((0.0,), (1.0,), (-0.5,), (np.float32(1.5),),
                            (np.float64(0.0),), (np.array(2.0),))
  def test_eps_outside_unit_interval(self, eps):
    with self.assertRaisesRegex(ValueError, r'eps must lie in \(0, 1\)'):
      act.halting_distribution(jnp.ones((3, 2)), eps)
    state = act.init_state(jnp.zeros((2, 1)), (2,))
    with self.assertRaisesRegex(ValueError, r'eps must lie in \(0, 1\)'):
      act.step(state, jnp.ones((2,)), jnp.zeros((2, 1)), eps)

  def test_eps_as_a_string(self):
    with self.assertRaisesRegex(TypeError,
                                r"eps must be a number in \(0, 1\), got "
                                r"'0.01'\."):
      act.halting_distribution(jnp.ones((3, 2)), '0.01')

  @parameterized.named_parameters(
      ('int', np.array([[0], [0], [1]]), r'got dtype int'),
      ('bool', np.array([[False], [False], [True]]), r'got dtype bool'),
      ('negative', np.array([[-0.5], [0.3], [0.1]], np.float32),
       r'got values in \[-0.5, 0.3\]'),
      ('logits', np.array([[2.0], [0.3], [0.1]], np.float32),
       r'got values in \[0.3, 2\]'),
      ('nan', np.array([[np.nan], [0.5], [0.9]], np.float32), r'got NaN'))
  def test_bad_halting_scores(self, halting, message):
    """Each used to give a confident, wrong halting distribution."""
    error = TypeError if halting.dtype.kind in 'bi' else ValueError
    with self.assertRaisesRegex(
        error, r'halting scores must be floats in \[0, 1\] \(sigmoid '
        r'outputs\), ' + message):
      act.halting_distribution(halting)
    if error is ValueError:  # Values are unknown under jit: not checked.
      jax.jit(act.halting_distribution)(halting)

  @parameterized.parameters(((),), ((0, 2),))
  def test_no_units(self, shape):
    with self.assertRaisesRegex(ValueError, 'L >= 1 units'):
      act.halting_distribution(jnp.ones(shape))

  def test_dilate_mask_rank(self):
    with self.assertRaisesRegex(ValueError, r'\[B, H, W\] mask'):
      act.dilate_mask(jnp.ones((4, 4)))

if __name__ == '__main__':
  absltest.main()
