"""Tests of `sact_jax.conv`: the CPU formulations against `lax`, routing,
compiler options."""

import contextlib
import io

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
from jax import ad_checkpoint
from jax import lax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np

from sact_jax import conv
from sact_jax import layers
from sact_jax import onednn

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_CASES = (
    ('1x1_same', (1, 1), 'SAME'),
    ('3x3_same', (3, 3), 'SAME'),
    ('3x3_valid', (3, 3), 'VALID'),
    ('5x5_same', (5, 5), 'SAME'),
    ('2x2_same_asymmetric', (2, 2), 'SAME'),  # Pads (0, 1): asymmetric.
    ('1x3_same', (1, 3), 'SAME'),
    ('3x2_valid', (3, 2), 'VALID'),
    ('3x3_explicit_asymmetric', (3, 3), ((0, 2), (1, 0))),
    ('2x3_explicit_asymmetric', (2, 3), ((2, 0), (0, 1))),
    ('3x3_explicit_wide', (3, 3), ((2, 2), (3, 1))),
)


def _inputs(kernel_hw, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel_hw + (3, 4)), jnp.float32)
  return x, w


def _ours(padding, strides=(1, 1)):
  return lambda x, w: conv.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC)


def _lax(padding, strides=(1, 1)):
  return lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC)


def _uses_custom_vjp(fn, *args) -> bool:
  return 'custom_vjp_call' in str(jax.make_jaxpr(fn)(*args))


def _assert_conv2d_matches_lax(forward, backward, kernel_hw, strides,
                               padding, seed):
  """`conv2d` in these formulations: output and both gradients as `lax`'s.

  Inputs from `_inputs(kernel_hw, seed)`, the cotangent from `seed + 1`.
  """
  x, w = _inputs(kernel_hw, seed=seed)
  pads = conv.explicit_padding(padding, kernel_hw, strides, x.shape[1:3])
  y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, strides, pads, None,
                                            forward, backward), x, w)
  y_ref, vjp_ref = jax.vjp(_lax(padding, strides), x, w)
  chex.assert_shape(y, y_ref.shape)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(
      np.random.default_rng(seed + 1).normal(size=y.shape), jnp.float32)
  for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


class ConvTest(parameterized.TestCase):

  @parameterized.named_parameters(
      [(name + suffix, kernel_hw, padding, xla_only)
       for name, kernel_hw, padding in _CASES
       for suffix, xla_only in (('', False), ('_xla_only', True))])
  def test_values_and_vjp_match_lax(self, kernel_hw, padding, xla_only):
    """With oneDNN's kernels where available, and with XLA's only."""
    if xla_only:
      self.enter_context(onednn.disabled())
    x, w = _inputs(kernel_hw)
    y, vjp = jax.vjp(_ours(padding), x, w)
    y_ref, vjp_ref = jax.vjp(_lax(padding), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(
        np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    dx, dw = vjp(cotangent)
    dx_ref, dw_ref = vjp_ref(cotangent)
    chex.assert_shape(dx, x.shape)
    chex.assert_shape(dw, w.shape)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
    self.assertTrue(_uses_custom_vjp(_ours(padding), x, w))

  @parameterized.named_parameters(
      ('3x3_same', (3, 3), 'SAME'),
      ('2x3_explicit', (2, 3), ((2, 0), (0, 1))))
  def test_check_grads(self, kernel_hw, padding):
    """Numerical gradients, to second order (reverse mode only: custom_vjp)."""
    x, w = _inputs(kernel_hw, seed=2)
    x = x[:1, :5, :4]
    jtu.check_grads(jax.jit(_ours(padding)), (x, w), order=2,
                    modes=('rev',), atol=2e-2, rtol=2e-2)

  @parameterized.named_parameters(
      ('routed', conv.conv_general_dilated),
      ('as_dots', lambda x, w, strides, padding, dimension_numbers:
       conv.conv2d(x, w, strides, ((1, 1), (1, 1)), None, 'dot', 'dot')))
  def test_gradient_inside_scan_matches_lax(self, conv_under_test):
    """The use case: stacked kernels under `lax.scan`, differentiated."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    ws = jnp.asarray(0.3 * rng.normal(size=(3, 3, 3, 4, 4)), jnp.float32)

    def loss(conv_fn, x, ws):
      def body(x, w):
        return jnp.tanh(conv_fn(x, w, (1, 1), 'SAME',
                                dimension_numbers=_NHWC)), None
      y, _ = lax.scan(body, x, ws)
      return jnp.sum(y ** 2)

    grads = jax.jit(jax.grad(
        lambda x, ws: loss(conv_under_test, x, ws),
        argnums=(0, 1)))(x, ws)
    grads_ref = jax.jit(jax.grad(
        lambda x, ws: loss(lax.conv_general_dilated, x, ws),
        argnums=(0, 1)))(x, ws)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
      ('rhs_dilated', dict(rhs_dilation=(2, 2))),
      ('lhs_dilated', dict(lhs_dilation=(2, 1), padding=((1, 1), (1, 1)))),
      ('grouped', dict(feature_group_count=3)),
      ('nchw', dict(dimension_numbers=('NCHW', 'OIHW', 'NCHW'))),
      ('no_dimension_numbers', dict(dimension_numbers=None)),
  )
  def test_falls_back_to_lax(self, overrides):
    """Anything but undilated NHWC/HWIO runs `lax` itself, equal values."""
    rng = np.random.default_rng(4)
    kwargs = dict(window_strides=(1, 1), padding='SAME',
                  dimension_numbers=_NHWC)
    kwargs.update(overrides)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    groups = kwargs.get('feature_group_count', 1)
    w = jnp.asarray(rng.normal(size=(3, 3, 3 // groups, 6)), jnp.float32)
    numbers = kwargs['dimension_numbers']
    if numbers is None or numbers[0] == 'NCHW':  # lax default: NCHW / OIHW.
      x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)

    def ours(x, w):
      return conv.conv_general_dilated(x, w, **kwargs)

    def ref(x, w):
      return lax.conv_general_dilated(x, w, **kwargs)

    self.assertFalse(_uses_custom_vjp(ours, x, w))
    np.testing.assert_array_equal(ours(x, w), ref(x, w))
    g = jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), (0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(x, w)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-6)

  @parameterized.parameters((True,), (False,))
  def test_layer_factory_routes_convs(self, fast):
    """`nnx.Conv` from the factory takes this module's path iff asked to."""
    factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3,
                                  fast_conv_backward=fast)
    stride1 = factory.conv(3, 4, 3, rngs=nnx.Rngs(0))
    strided = factory.conv(3, 4, 3, stride=2, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 6, 6, 3))
    self.assertEqual(_uses_custom_vjp(lambda x: stride1(x), x), fast)
    self.assertEqual(_uses_custom_vjp(lambda x: strided(x), x), fast)
    expected = lax.conv_general_dilated(
        x, stride1.kernel[...], (1, 1), 'SAME', dimension_numbers=_NHWC)
    # Another kernel sums the 27 products in another order (oneDNN's AVX2
    # and AVX-512 kernels differ too): float32 rounding of the sum, not of
    # each output (5e-6 relative where an output nearly cancels).
    np.testing.assert_allclose(stride1(x), expected, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(expected))))


_DOT_CASES = (
    ('3x3_s1_same', (3, 3), (1, 1), 'SAME'),
    ('3x3_s2_same_odd', (3, 3), (2, 2), 'SAME'),  # 7x6 input: odd and even.
    ('1x1_s1', (1, 1), (1, 1), 'SAME'),
    ('1x1_s2', (1, 1), (2, 2), 'SAME'),
    ('7x7_s2_explicit', (7, 7), (2, 2), ((3, 3), (3, 3))),
    ('3x3_s2_explicit', (3, 3), (2, 2), ((1, 1), (1, 1))),
    ('2x2_s2_same', (2, 2), (2, 2), 'SAME'),
    ('3x2_s21_valid', (3, 2), (2, 1), 'VALID'),
)


class DotFormulationTest(parameterized.TestCase):
  """`conv2d` as one dot over the input windows, forward and backward."""

  @parameterized.named_parameters(*_DOT_CASES)
  def test_values_and_vjp_match_lax(self, kernel_hw, strides, padding):
    _assert_conv2d_matches_lax('dot', 'dot', kernel_hw, strides, padding,
                               seed=0)

  def test_patches_follow_the_kernel_layout(self):
    """Row features are in `w.reshape(-1, O)` order: (i, j, c)."""
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    rows = conv.patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    chex.assert_shape(rows, (2, 4, 4, 27))
    # Output position (1, 2) of image 1: tap (i, j) reads x[1, i, 1 + j].
    for i in range(3):
      for j in range(3):
        np.testing.assert_array_equal(
            rows[1, 1, 2, (i * 3 + j) * 3:(i * 3 + j + 1) * 3],
            x[1, i, 1 + j])

  @parameterized.named_parameters(
      ('stride1', (1, 1), ((1, 1), (1, 1))),
      ('stride2_asymmetric', (2, 2), ((0, 1), (1, 0))),
      ('stride_hw', (2, 1), ((2, 0), (1, 1))),
  )
  def test_taps_check_grads(self, strides, padding):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 12, 1)), jnp.float32)
    fn = jax.jit(lambda x, w: conv.conv2d(x, w, strides, padding, None,
                                          'taps', 'taps'))
    want = lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=_NHWC)
    np.testing.assert_allclose(fn(x, w), want, rtol=1e-5, atol=1e-5)
    jtu.check_grads(fn, (x, w), order=1, modes=('rev',), atol=2e-2,
                    rtol=2e-2)

  def test_check_grads(self):
    x, w = _inputs((3, 3), seed=2)
    x = x[:1, :5, :4]
    fn = jax.jit(lambda x, w: conv.conv2d(x, w, (2, 2), ((1, 1), (1, 1)),
                                          None, 'dot', 'dot'))
    jtu.check_grads(fn, (x, w), order=2, modes=('rev',), atol=2e-2,
                    rtol=2e-2)


class WindowSumTest(parameterized.TestCase):
  """`window_sum`: a conv to one channel as one reduction (accelerators)."""

  @parameterized.named_parameters(
      ('3x3_same', (3, 3), ((1, 1), (1, 1))),
      ('3x3_valid', (3, 3), ((0, 0), (0, 0))),
      ('3x3_asymmetric', (3, 3), ((0, 2), (2, 1))),
      ('1x1', (1, 1), ((0, 0), (0, 0))),
      ('5x3', (5, 3), ((2, 2), (1, 1))),
  )
  def test_values_and_grads_match_lax(self, kernel_hw, padding):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel_hw, 12, 1)), jnp.float32)
    fn = jax.jit(lambda x, w: conv.window_sum(x, w, padding))
    want = lax.conv_general_dilated(x, w, (1, 1), padding,
                                    dimension_numbers=_NHWC)
    got = fn(x, w)
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jtu.check_grads(fn, (x, w), order=1, modes=('rev',), atol=2e-2,
                    rtol=2e-2)

  def test_one_output_channel_only(self):
    with self.assertRaisesRegex(ValueError, 'one output channel'):
      conv.window_sum(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)),
                      ((1, 1), (1, 1)))


class AffineWindowSumTest(parameterized.TestCase):
  """`affine_window_sum`: the SACT head's local term in training on
  accelerators, with a backward pass that keeps only its inputs."""

  @staticmethod
  def _reference(x, scale, shift, w, padding, activation):
    """The same composition through XLA's conv and plain autodiff."""
    return lax.conv_general_dilated(activation(x * scale + shift), w,
                                    (1, 1), padding,
                                    dimension_numbers=_NHWC)

  @parameterized.product(
      activation=(layers.leaky_relu, layers.identity, jax.nn.relu),
      padding=(((1, 1), (1, 1)), ((0, 2), (2, 1))))
  def test_values_and_grads_match_autodiff(self, activation, padding):
    rng = np.random.default_rng(6)
    args = [jnp.asarray(rng.normal(size=shape), jnp.float32)
            for shape in ((2, 7, 6, 5), (5,), (5,), (3, 3, 5, 1))]
    got_fn = jax.jit(lambda *a: conv.affine_window_sum(*a, padding,
                                                       activation))
    want_fn = jax.jit(lambda *a: self._reference(*a, padding, activation))
    want = want_fn(*args)
    got = got_fn(*args)
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A cotangent that weighs every output differently.
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grads = jax.vjp(got_fn, *args)[1](g)
    want_grads = jax.vjp(want_fn, *args)[1](g)
    for got_grad, want_grad in zip(grads, want_grads):
      chex.assert_shape(got_grad, want_grad.shape)
      # Sums over 84 positions of products of unit normals.
      np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)
    self.assertGreater(float(jnp.abs(grads[0]).max()), 0.1)

  def test_backward_keeps_only_the_inputs(self):
    """What autodiff of the composition would keep (the normalised map,
    the activation's side of 0) is recomputed instead."""
    x = jnp.ones((2, 5, 4, 3))
    args = (x, jnp.ones(3), jnp.zeros(3), jnp.ones((3, 3, 3, 1)))
    padding = ((1, 1), (1, 1))

    def residual_maps(fn):
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        ad_checkpoint.print_saved_residuals(
            lambda *a: jnp.sum(fn(*a, padding, layers.leaky_relu)), *args)
      return [line for line in out.getvalue().splitlines()
              if '[2,5,4,3]' in line and 'from the argument' not in line]

    self.assertEqual(residual_maps(conv.affine_window_sum), [])
    self.assertNotEmpty(residual_maps(self._reference))


class SpaceToDepthTest(parameterized.TestCase):
  """`conv2d` forward as a stride-1 conv over space-to-depth blocks."""

  @parameterized.named_parameters(
      *[c for c in _DOT_CASES if c[2] != (1, 1)],
      ('2x2_s2_valid_crops_a_row', (2, 2), (2, 2), 'VALID'),  # 7 -> 6 rows.
      ('5x5_s3_same', (5, 5), (3, 3), 'SAME'),
      ('3x3_s3_wide_padding', (3, 3), (3, 3), ((4, 2), (0, 5))),
  )
  def test_values_and_vjp_match_lax(self, kernel_hw, strides, padding):
    _assert_conv2d_matches_lax('s2d', 's2d', kernel_hw, strides, padding,
                               seed=8)

  def test_stem_through_the_layer_route(self):
    """Without oneDNN, the ImageNet stem's shape takes 's2d' and keeps
    `lax`'s values."""
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.normal(size=(1, 38, 31, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 7, 3, 8)), jnp.float32)
    self.assertEqual(conv.formulation(x.shape, w.shape, (2, 2))[0], 's2d')
    with onednn.disabled():
      np.testing.assert_allclose(
          jax.jit(_ours('SAME', (2, 2)))(x, w), _lax('SAME', (2, 2))(x, w),
          rtol=1e-5, atol=1e-4)


class FormulationTest(parameterized.TestCase):
  """`formulation`'s choices, and each choice's values equal `lax`'s."""

  @parameterized.named_parameters(
      ('1x1', (32, 56, 56, 256), (1, 1, 256, 64), (1, 1), ('dot', 'dot')),
      ('1x1_strided', (32, 56, 56, 256), (1, 1, 256, 512), (2, 2),
       ('conv', 'dot')),
      ('3x3_narrow', (128, 32, 32, 16), (3, 3, 16, 16), (1, 1),
       ('conv', 'conv')),
      ('3x3_wide_many_rows', (32, 14, 14, 256), (3, 3, 256, 256), (1, 1),
       ('conv', 'conv')),
      ('3x3_wide_few_rows', (1, 14, 14, 256), (3, 3, 256, 256), (1, 1),
       ('conv', 'dot')),
      ('3x3_wide_strided_few_rows', (1, 56, 56, 128), (3, 3, 128, 128),
       (2, 2), ('conv', 'dot')),
      ('stem', (1, 224, 224, 3), (7, 7, 3, 64), (2, 2), ('s2d', 'conv')),
      ('strided_many_inputs', (1, 224, 224, 5), (7, 7, 5, 64), (2, 2),
       ('conv', 'conv')),
      ('unstrided_few_inputs', (1, 32, 32, 3), (3, 3, 3, 16), (1, 1),
       ('conv', 'conv')),
      ('sact_head', (128, 32, 32, 16), (3, 3, 16, 1), (1, 1),
       ('taps', 'taps')),
      ('few_outputs', (8, 14, 14, 64), (3, 3, 64, 7), (2, 2),
       ('taps', 'taps')),
      ('too_many_outputs_for_taps', (8, 14, 14, 64), (3, 3, 64, 8), (1, 1),
       ('conv', 'conv')),
  )
  def test_choices_without_onednn(self, x_shape, w_shape, strides,
                                  expected):
    self.assertEqual(conv.formulation(x_shape, w_shape, strides), expected)

  @parameterized.named_parameters(
      ('1x1', (32, 56, 56, 256), (1, 1, 256, 64), (1, 1)),
      ('3x3_strided', (1, 56, 56, 128), (3, 3, 128, 128), (2, 2)),
      ('stem', (1, 224, 224, 3), (7, 7, 3, 64), (2, 2)),
      ('3x3_narrow', (128, 32, 32, 16), (3, 3, 16, 16), (1, 1)),
  )
  def test_choices_with_onednn(self, x_shape, w_shape, strides):
    self.assertEqual(conv.formulation(x_shape, w_shape, strides, True),
                     ('onednn', 'onednn'))

  @parameterized.named_parameters(
      ('1x1', (32, 56, 56, 256), (1, 1, 256, 64), (1, 1), 'dot'),
      ('1x1_strided', (32, 56, 56, 256), (1, 1, 256, 512), (2, 2), 'conv'),
      ('3x3_few_rows', (1, 14, 14, 256), (3, 3, 256, 256), (1, 1), 'conv'),
      ('3x3_many_rows', (32, 14, 14, 256), (3, 3, 256, 256), (1, 1),
       'onednn'),
      ('3x3_strided_many_rows', (1, 56, 56, 128), (3, 3, 128, 128), (2, 2),
       'onednn'),
      ('stem', (1, 224, 224, 3), (7, 7, 3, 64), (2, 2), 'onednn'),
  )
  def test_forward_where_onednn_copies_its_weights(self, x_shape, w_shape,
                                                   strides, forward):
    self.assertEqual(conv.formulation(x_shape, w_shape, strides, True, True),
                     (forward, 'onednn'))

  def test_chosen_formulation(self):
    """What `conv_general_dilated` runs: oneDNN's passes only where they
    are enabled and the operands share a dtype, its forward as the copy
    question says."""
    x_shape, w_shape, pads = (1, 6, 6, 8), (1, 1, 8, 8), ((0, 0), (0, 0))
    with onednn.disabled():
      self.assertEqual(conv.chosen_formulation(x_shape, w_shape, (1, 1), pads,
                                               jnp.float32), ('dot', 'dot'))
    self.assertEqual(conv.chosen_formulation(x_shape, w_shape, (1, 1), pads,
                                             None), ('dot', 'dot'))
    if onednn.enabled():
      copies = onednn.forward_copies_weights(x_shape, w_shape, (1, 1), pads)
      self.assertEqual(conv.chosen_formulation(x_shape, w_shape, (1, 1),
                                               pads, jnp.float32),
                       ('dot' if copies else 'onednn', 'onednn'))

  def test_head_with_onednn(self):
    # CIFAR's head: taps both ways; ImageNet's: oneDNN's backward.
    self.assertEqual(conv.formulation((128, 32, 32, 16), (3, 3, 16, 1),
                                      (1, 1), True), ('taps', 'taps'))
    self.assertEqual(conv.formulation((128, 8, 8, 64), (3, 3, 64, 1),
                                      (1, 1), True), ('taps', 'taps'))
    self.assertEqual(conv.formulation((32, 56, 56, 256), (3, 3, 256, 1),
                                      (1, 1), True), ('taps', 'onednn'))

  @parameterized.named_parameters(
      ('3x3_7x7', (1, 7, 7, 512), (3, 3, 512, 512), (1, 1), 'rows'),
      ('3x3_strided_to_7x7', (1, 14, 14, 512), (3, 3, 512, 512), (2, 2),
       'rows'),
      ('3x3_256_rows', (4, 8, 8, 64), (3, 3, 64, 64), (1, 1), 'rows'),
      ('1x1_4096_rows', (1, 64, 64, 256), (1, 1, 256, 64), (1, 1), 'rows'),
      ('3x3_784_rows', (1, 28, 28, 128), (3, 3, 128, 128), (1, 1),
       'onednn'),
      ('1x1_past_4096_rows', (2, 56, 56, 256), (1, 1, 256, 64), (1, 1),
       'onednn'),
      ('1x1_one_row_already', (1, 1, 200, 1024), (1, 1, 1024, 256), (1, 1),
       'onednn'),
  )
  def test_few_positions_as_one_row(self, x_shape, w_shape, strides,
                                    forward):
    """'rows' where oneDNN would split the row, and few positions; not for
    a kernel wider than 1x1 whose direct forward runs as two halves of its
    rows (one image)."""
    self.assertEqual(conv.formulation(x_shape, w_shape, strides, True, False,
                                      True), (forward, 'onednn'))
    self.assertEqual(conv.formulation(x_shape, w_shape, strides, True, False,
                                      False), ('onednn', 'onednn'))
    self.assertEqual(
        conv.formulation(x_shape, w_shape, strides, True, False, True, True),
        (forward if w_shape[:2] == (1, 1) else 'onednn', 'onednn'))

  @parameterized.named_parameters(
      [(f'{name}_stride{stride}', kernel_hw, padding, stride)
       for name, kernel_hw, padding in _CASES for stride in (1, 2)])
  def test_rows_forward_matches_lax(self, kernel_hw, padding, stride):
    """'rows' as the forward of a convolution not differentiated (under
    differentiation `test_every_combination_matches_lax` runs oneDNN's)."""
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')
    x, w = _inputs(kernel_hw)
    strides = (stride, stride)
    pads = conv.explicit_padding(padding, kernel_hw, strides, x.shape[1:3])
    got = jax.jit(lambda x, w: conv.conv2d(x, w, strides, pads, None, 'rows',
                                           'onednn'))(x, w)
    want = _lax(padding, strides)(x, w)
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.product(stride=(1, 2), stacked=(False, True))
  def test_rows_through_the_route(self, stride, stacked):
    """A convolution with 64 output positions (4 images) and 19 MFLOPs:
    'rows' where oneDNN splits it (two CPUs), with the values and input
    gradient of
    `lax`'s, its kernel read from a stack in place too; differentiated,
    oneDNN's convolution (but from a stack: `onednn.forward_stacked`).

    The route of a CPU whose oneDNN forward reads the weights in place
    (AVX-512), taken on any: where it would copy them (AVX2), this small
    convolution is XLA's (`test_forward_where_onednn_copies_its_weights`).
    """
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')
    self.enter_context(absltest.mock.patch.object(
        onednn, 'forward_copies_weights', return_value=False))
    rng = np.random.default_rng(stride)
    size = 4 * stride
    x = jnp.asarray(rng.normal(size=(4, size, size, 128)), jnp.float32)
    stack = jnp.asarray(rng.normal(size=(3, 3, 3, 128, 128)) / 34.0,
                        jnp.float32)
    pads = conv.explicit_padding('SAME', (3, 3), (stride, stride),
                                 (size, size))
    splits = onednn.forward_splits((1, 1, 64, 1152), (1, 1, 1152, 128))
    self.assertEqual(
        conv.chosen_formulation(x.shape, stack.shape[1:], (stride, stride),
                                pads, jnp.float32),
        ('rows' if splits else 'onednn', 'onednn'))

    def ours(x, stack):
      if not stacked:
        return _ours('SAME', (stride, stride))(x, stack[1])
      with conv.stacked_unit(jnp.int32(1)):
        return _ours('SAME', (stride, stride))(x, stack)

    y = jax.jit(ours)(x, stack)
    y_ref = _lax('SAME', (stride, stride))(x, stack[1])
    chex.assert_shape(y, y_ref.shape)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    text = jax.jit(ours).lower(x, stack).as_text()
    self.assertEqual('1x1x64x1152xf32' in text, splits)
    cotangent = jnp.asarray(rng.normal(size=(4, 4, 4, 128)), jnp.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(ours(x, stack), cotangent)))
    np.testing.assert_allclose(
        grad(x), jax.vjp(_lax('SAME', (stride, stride)), x,
                         stack[1])[1](cotangent)[0], rtol=1e-5, atol=1e-4)
    # Differentiated, a kernel of its own runs oneDNN's convolution.
    self.assertEqual('1x1x64x1152xf32' in grad.lower(x).as_text(),
                     splits and stacked)
    self.assertEqual('OnednnConvForwardStacked' in text, stacked)

  @parameterized.product(forward=conv.FORMULATIONS,
                         backward=conv.FORMULATIONS, stride=(1, 2),
                         kernel=(1, 3))
  def test_every_combination_matches_lax(self, forward, backward, stride,
                                         kernel):
    _assert_conv2d_matches_lax(forward, backward, (kernel, kernel),
                               (stride, stride), 'SAME', seed=5)


class WindowsTest(parameterized.TestCase):
  """`conv._windows`: 'rows'' windows as one custom call (row_gather.cc)."""

  @parameterized.named_parameters(
      ('3x3_same', (1, 14, 14, 8), (3, 3), (1, 1), ((1, 1), (1, 1))),
      ('3x3_stride2_odd', (2, 9, 7, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
      ('3x3_asymmetric', (2, 6, 6, 4), (3, 3), (2, 2), ((0, 1), (0, 1))),
      ('7x7_stride2', (1, 8, 8, 3), (7, 7), (2, 2), ((3, 3), (3, 3))),
      ('3x1_hw_strides', (1, 6, 5, 2), (3, 1), (2, 1), ((2, 0), (0, 0))),
  )
  def test_values_and_gradient_are_patches(self, x_shape, kernel_hw,
                                           strides, padding):
    """The same copies as `patches` (exactly, zeros outside the map), in
    one call, and the same input gradient."""
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')
    rng = np.random.default_rng(len(x_shape) + x_shape[-1])
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    windows = jax.jit(conv._windows, static_argnums=(1, 2, 3))
    got = windows(x, kernel_hw, strides, padding)
    want = conv.patches(x, kernel_hw, strides, padding)
    chex.assert_equal_shape([got, want])
    np.testing.assert_array_equal(got, want)
    self.assertIn('SactWindows', windows.lower(
        x, kernel_hw, strides, padding).as_text())
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda x: jnp.sum(
        f(x, kernel_hw, strides, padding) * g))(x)
    np.testing.assert_allclose(grad(conv._windows), grad(conv.patches),
                               rtol=1e-6, atol=1e-6)

  def test_rows_reads_3x3_windows_in_one_call(self):
    """'rows' copies a 3x3 kernel's windows in one custom call (no
    concatenation) and takes a 1x1 kernel's map as it is (no copy)."""
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')
    for kernel_hw, calls in (((3, 3), 1), ((1, 1), 0)):
      x, w = _inputs(kernel_hw)
      pads = conv.explicit_padding('SAME', kernel_hw, (1, 1), x.shape[1:3])
      hlo = jax.jit(lambda x, w: conv.conv2d(
          x, w, (1, 1), pads, None, 'rows', 'onednn')).lower(x, w).as_text()
      self.assertEqual(hlo.count('SactWindows'), calls, kernel_hw)
      self.assertNotIn('concatenate', hlo)


def _reference_post_ops(post, x, w, operands, strides):
  """What `conv_affine_relu` / `conv_add_into` compute, from `lax`."""
  y = lax.conv_general_dilated(x, w, strides, 'SAME', dimension_numbers=_NHWC,
                               precision=lax.Precision.HIGHEST)
  if post == 'affine_relu':
    scale, shift = operands
    return jax.nn.relu(y * scale + shift)
  bias, into = operands
  return into + y + bias


def _ours_post_ops(post, x, w, operands, strides):
  fn = conv.conv_affine_relu if post == 'affine_relu' else conv.conv_add_into
  return fn(x, w, strides, 'SAME', *operands)


_POST_OPS_CASES = (
    # 3x3 over 4 x 16 x 16 positions: oneDNN's direct convolution.
    ('direct_3x3', (4, 16, 16, 32), (3, 3, 32, 48), 1, 'onednn'),
    ('direct_3x3_stride2', (4, 17, 17, 32), (3, 3, 32, 48), 2, 'onednn'),
    ('direct_1x1', (2, 16, 16, 64), (1, 1, 64, 40), 1, 'onednn'),
    # 64 positions, 19 MFLOPs: two matmul halves over the windows (of 4
    # images: one image's direct forward would run as halves of its rows).
    ('rows_3x3', (4, 4, 4, 128), (3, 3, 128, 128), 1, 'rows'),
    ('rows_3x3_stride2', (4, 8, 8, 128), (3, 3, 128, 128), 2, 'rows'),
    ('rows_1x1', (1, 8, 8, 512), (1, 1, 512, 256), 1, 'rows'),
)


class ConvPostOpsTest(parameterized.TestCase):
  """`conv_affine_relu` and `conv_add_into`: a convolution and what follows
  it per channel, in one oneDNN call where oneDNN's forward runs it."""

  @parameterized.named_parameters(
      [(f'{name}_{post}', post, *case) for name, *case in _POST_OPS_CASES
       for post in ('affine_relu', 'add_into')])
  def test_values_gradients_and_one_call(self, post, x_shape, w_shape,
                                         stride, route):
    """The values and the gradients of the steps apart; the post-ops in
    the call (plain and from a stack), nothing left to XLA's fusions.
    `conv_add_into` keeps 'rows' and its sum apart."""
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')
    self.enter_context(absltest.mock.patch.object(
        onednn, 'forward_copies_weights', return_value=False))
    strides = (stride, stride)
    pads = conv.explicit_padding('SAME', w_shape[:2], strides, x_shape[1:3])
    if route == 'rows' and not onednn.windows_split(x_shape, w_shape,
                                                    strides, pads):
      self.skipTest('One CPU: oneDNN does not split the row here.')
    self.assertEqual(conv.chosen_formulation(x_shape, w_shape, strides, pads,
                                             jnp.float32)[0], route)
    rng = np.random.default_rng(sum(x_shape) + stride)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    fan_in = np.prod(w_shape[:3])
    stack = jnp.asarray(rng.normal(size=(3, *w_shape)) / np.sqrt(fan_in),
                        jnp.float32)
    cout = w_shape[-1]
    out_shape = (x_shape[0], *(-(-n // stride) for n in x_shape[1:3]), cout)
    if post == 'affine_relu':
      operands = (jnp.asarray(rng.uniform(0.5, 1.5, cout), jnp.float32),
                  jnp.asarray(rng.normal(size=cout), jnp.float32))
    else:
      operands = (jnp.asarray(rng.normal(size=cout), jnp.float32),
                  jnp.asarray(rng.normal(size=out_shape), jnp.float32))

    def plain(x, w, operands):
      return _ours_post_ops(post, x, w[1], operands, strides)

    def stacked(x, w, operands):
      with conv.stacked_unit(jnp.int32(1)):
        return _ours_post_ops(post, x, w, operands, strides)

    want = _reference_post_ops(post, x, stack[1], operands, strides)
    if post == 'affine_relu':
      self.assertGreater(float(jnp.mean(want == 0.0)), 0.1)  # ReLU bites.
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    _, to_inputs = jax.vjp(
        lambda x, w, o: _reference_post_ops(post, x, w, o, strides),
        x, stack[1], operands)
    want_x, want_w, want_operands = to_inputs(cotangent)
    target = {'affine_relu': 'AffineRelu', 'add_into': 'AddInto'}[post]
    fused = post == 'affine_relu' or route == 'onednn'
    for fn, call in ((plain, f'OnednnConvForward{target}'),
                     (stacked, f'OnednnConvForwardStacked{target}')):
      got = jax.jit(fn)(x, stack, operands)
      chex.assert_shape(got, want.shape)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
      hlo = jax.jit(fn).lower(x, stack, operands).compile().as_text()
      self.assertEqual(hlo.count(f'custom_call_target="{call}"'), fused)
      # What follows the convolution is in XLA's program only if apart.
      for op in {'affine_relu': (' multiply(', ' maximum('),
                 'add_into': (' add(',)}[post]:
        self.assertEqual(op in hlo, not fused, op)
      grads = jax.jit(jax.grad(lambda *a: jnp.vdot(fn(*a), cotangent),
                               argnums=(0, 1, 2)))(x, stack, operands)
      want_stack = jnp.zeros_like(stack).at[1].set(want_w)
      chex.assert_trees_all_close(grads, (want_x, want_stack, want_operands),
                                  rtol=1e-4, atol=1e-3)

  @parameterized.parameters('affine_relu', 'add_into')
  def test_separate_steps_without_onednn(self, post):
    x, w = _inputs((3, 3))
    operands = ((jnp.array([1.0, -2.0, 0.5, 3.0]),
                 jnp.array([0.1, 0.2, -0.3, 0.0])) if post == 'affine_relu'
                else (jnp.array([0.1, 0.2, -0.3, 0.0]),
                      jnp.ones((2, 7, 6, 4))))
    with onednn.disabled():
      fn = jax.jit(lambda x, w: _ours_post_ops(post, x, w, operands, (1, 1)))
      got = fn(x, w)
      hlo = fn.lower(x, w).as_text()
    np.testing.assert_allclose(
        got, _reference_post_ops(post, x, w, operands, (1, 1)), rtol=1e-5,
        atol=1e-5)
    self.assertNotIn('OnednnConv', hlo)

  def test_stack_outside_stacked_unit_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'stacked_unit'):
      conv.conv_affine_relu(jnp.ones((1, 4, 4, 2)), jnp.ones((2, 1, 1, 2, 3)),
                            (1, 1), 'SAME', jnp.ones(3), jnp.zeros(3))


class RowsMatmulTest(parameterized.TestCase):
  """`rows_matmul`: a sparse unit's row matmul, plain or from a stack."""

  @parameterized.product(rows=(1, 16, 256, 300, 4095, 4096),
                         stacked=(False, True),
                         with_onednn=(False, True))
  def test_matches_matmul(self, rows, stacked, with_onednn):
    k1, k2 = jax.random.split(jax.random.key(rows))
    x = jax.random.normal(k1, (rows, 24))
    w_stack = jax.random.normal(k2, (3, 24, 40))

    @jax.jit
    def run(x, w_stack, index):
      if not stacked:
        return conv.rows_matmul(x, w_stack[1])
      with conv.stacked_unit(index):
        return conv.rows_matmul(x, w_stack)

    if with_onednn:
      got = run(x, w_stack, 1)
    else:
      with onednn.disabled():
        got = run(x, w_stack, 1)
    expected = jnp.matmul(x, w_stack[1], precision=lax.Precision.HIGHEST)
    chex.assert_shape(got, (rows, 40))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(16, 300)
  def test_stack_outside_stacked_unit_is_an_error(self, rows):
    with self.assertRaisesRegex(ValueError, 'stacked_unit'):
      conv.rows_matmul(jnp.ones((rows, 4)), jnp.ones((2, 4, 5)))


class CompilerOptionsTest(absltest.TestCase):

  def test_cpu_only(self):
    self.assertIsNone(conv.compiler_options('gpu'))
    self.assertIsNone(conv.compiler_options('tpu'))
    options = conv.compiler_options('cpu')
    # jax>=0.10 (setup.cfg) knows the option; None would mean it does not.
    self.assertEqual(options, {'xla_cpu_experimental_ynn_fusion_type':
                               'LIBRARY_FUSION_TYPE_REDUCE'})

  def test_same_values_as_default_options(self):
    """The options pick kernels, not results: forward and both gradients
    agree with XLA's defaults to float rounding."""
    x, w = _inputs((3, 3), seed=7)

    def loss(x, w):
      y = conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                    dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y)), y

    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    want = jax.jit(fn)(x, w)
    got = jax.jit(fn, compiler_options=conv.compiler_options(
        'cpu'))(x, w)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)

  def test_jit_honours_jit_arguments(self):
    calls = []

    def fn(n, x):
      calls.append(n)  # Once per trace.
      return x * n

    jitted = conv.jit(fn, static_argnums=0)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(jitted(2, x), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(jitted(2, x + 1), [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(jitted(3, x), [0.0, 3.0, 6.0])
    self.assertEqual(calls, [2, 3])
    self.assertIs(jitted.__wrapped__, fn)


if __name__ == '__main__':
  absltest.main()
