"""Tests of `sact_jax.onednn`: oneDNN's convolutions as XLA custom calls.

Their values and gradients against `lax`'s over the shapes, strides and
paddings the models use and some they do not; that `conv` routes float32
convolutions to them; the build's cache and its failures. setup.cfg
installs oneDNN on x86-64 Linux, so there the kernels must be available:
a broken build fails here instead of silently running XLA's.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np

from sact_jax import conv
from sact_jax import onednn
from sact_jax import parallel

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_ON_X86_LINUX = (platform.system() == 'Linux'
                 and platform.machine() == 'x86_64')


def _lax_conv(strides, padding):
  return lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC)


def _onednn_conv(strides, padding):
  return lambda x, w: conv.conv2d(x, w, strides, padding, None, 'onednn',
                                  'onednn')


def _assert_close(got, want):
  """Float rounding differs with the order of the sums (kernels, CPUs):
  tolerances relative to `want`'s largest magnitude."""
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(
      got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def _inputs(x_shape, w_shape, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=x_shape), jnp.float32),
          jnp.asarray(rng.normal(size=w_shape), jnp.float32))


class OnednnTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not _ON_X86_LINUX:
      self.skipTest('oneDNN is installed on x86-64 Linux only (setup.cfg)')

  def test_available(self):
    self.assertTrue(onednn.available())

  @parameterized.named_parameters(
      ('3x3_s1', (2, 8, 7, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
      ('3x3_s2_same_even', (2, 8, 8, 4), (3, 3, 4, 8), (2, 2),
       ((0, 1), (0, 1))),
      ('3x3_s2_odd', (1, 9, 7, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),
      ('1x1_s1', (3, 5, 5, 8), (1, 1, 8, 4), (1, 1), ((0, 0), (0, 0))),
      ('1x1_s2', (2, 7, 7, 8), (1, 1, 8, 16), (2, 2), ((0, 0), (0, 0))),
      ('7x7_s2_stem', (1, 16, 15, 3), (7, 7, 3, 8), (2, 2),
       ((3, 3), (3, 2))),
      ('strides_hw', (2, 9, 6, 3), (3, 2, 3, 5), (2, 1), ((2, 0), (1, 1))),
      ('valid', (2, 6, 6, 3), (3, 3, 3, 2), (1, 1), ((0, 0), (0, 0))),
      ('to_one_channel', (2, 6, 6, 16), (3, 3, 16, 1), (1, 1),
       ((1, 1), (1, 1))),
      # Wide enough for the kernels the models get (AVX-512's brgconv
      # reading HWIO weights) and for more than one OpenMP thread (38 and
      # 26 MFLOP; small passes run on one).
      ('3x3_cifar_width_threaded', (8, 16, 16, 32), (3, 3, 32, 32), (1, 1),
       ((1, 1), (1, 1))),
      ('1x1_imagenet_width_threaded', (2, 14, 14, 256), (1, 1, 256, 128),
       (1, 1), ((0, 0), (0, 0))),
  )
  def test_values_and_gradients_match_lax(self, x_shape, w_shape, strides,
                                          padding):
    x, w = _inputs(x_shape, w_shape)
    self.assertTrue(onednn.supported(x_shape, w_shape, strides, padding,
                                     jnp.float32))
    y, vjp = jax.vjp(_onednn_conv(strides, padding), x, w)
    y_ref, vjp_ref = jax.vjp(_lax_conv(strides, padding), x, w)
    _assert_close(y, y_ref)
    g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape),
                    jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g)):
      _assert_close(got, want)

  @parameterized.named_parameters(
      ('3x3', (2, 14, 14, 64), (3, 3, 64, 128), (1, 1), ((1, 1), (1, 1))),
      ('1x1_s2', (2, 14, 14, 128), (1, 1, 128, 256), (2, 2),
       ((0, 0), (0, 0))),
      ('stem', (1, 32, 32, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3))),
  )
  def test_forward_weights_hwio_or_blocked(self, x_shape, w_shape, strides,
                                           padding):
    """The forward reads HWIO weights or reorders them to oneDNN's blocked
    layout (large convolutions): both give the convolution."""
    x, w = _inputs(x_shape, w_shape)
    want = _lax_conv(strides, padding)(x, w)
    for blocked in (False, True):
      got = jax.jit(lambda x, w, b=blocked: onednn._forward(
          x, w, strides, padding, blocked_weights=b))(x, w)
      np.testing.assert_allclose(
          got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

  @parameterized.named_parameters(
      ('imagenet_stem_b32', (32, 224, 224, 3), (7, 7, 3, 64), (2, 2),
       ((3, 3), (3, 3))),
      ('cifar_stem_b128', (128, 32, 32, 3), (3, 3, 3, 16), (1, 1),
       ((1, 1), (1, 1))),
      ('3x3_b32', (32, 56, 56, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
  )
  def test_blocked_forward_keeps_brgemm_kernels(self, x_shape, w_shape,
                                                strides, padding):
    """Asked for blocked weights, the forward never trades a brgemm kernel
    that reads HWIO for an older one (the stem's, on AVX-512)."""
    hwio, blocked = (onednn.forward_kernel(x_shape, w_shape, strides,
                                           padding, b) for b in (False, True))
    self.assertTrue(hwio and blocked)
    if 'brg' in hwio:
      self.assertIn('brg', blocked)

  def test_forward_weights_blocked_from_the_flops_threshold(self):
    x, w = _inputs((1, 8, 8, 16), (3, 3, 16, 16))  # 295 kFLOP.
    pad = ((1, 1), (1, 1))

    def text():
      return jax.jit(lambda x, w: onednn.forward(x, w, (1, 1), pad)).lower(
          x, w).as_text()

    self.assertRegex(text(), r'blocked_weights = 0')
    with absltest.mock.patch.object(onednn, 'BLOCKED_WEIGHTS_MIN_FLOPS',
                                    2.9e5):
      self.assertRegex(text(), r'blocked_weights = 1')

  def test_routed_by_conv_and_disabled_inside_the_context(self):
    # 512 output rows: oneDNN's forward on any CPU (`conv.formulation`).
    x, w = _inputs((2, 16, 16, 4), (3, 3, 4, 4))

    def hlo(fn):
      return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2),
                              (0, 1))).lower(x, w).as_text()

    def ours(x, w):
      return conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                       dimension_numbers=_NHWC)

    text = hlo(ours)
    for target in ('OnednnConvForward', 'OnednnConvInputGrad',
                   'OnednnConvKernelGrad'):
      self.assertIn(target, text)
    with onednn.disabled():
      self.assertNotIn('Onednn', hlo(ours))
    # Half precision is XLA's: the kernels are float32 only.
    half = jax.jit(ours).lower(x.astype(jnp.bfloat16),
                               w.astype(jnp.bfloat16)).as_text()
    self.assertNotIn('Onednn', half)

  @parameterized.named_parameters(('1x1', (1, 1)), ('3x3', (3, 3)))
  def test_forward_is_xlas_where_onednn_would_copy_small_weights(self,
                                                                 kernel):
    """Few rows (or a 1x1 kernel) and a forward that copies its weights
    (CPUs without AVX-512): XLA's forward, oneDNN's backward."""
    x, w = _inputs((1, 6, 6, 8), (*kernel, 8, 8))
    pads = conv.explicit_padding('SAME', kernel)
    copies = onednn.forward_copies_weights(x.shape, w.shape, (1, 1), pads)

    def ours(x, w):
      return conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                       dimension_numbers=_NHWC)

    text = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2),
                            (0, 1))).lower(x, w).as_text()
    self.assertEqual('OnednnConvForward' in text, not copies)
    self.assertIn('OnednnConvKernelGrad', text)
    np.testing.assert_allclose(ours(x, w), _lax_conv((1, 1), pads)(x, w),
                               rtol=1e-5, atol=1e-5)

  def test_second_order_gradients(self):
    """Each pass's derivatives are the other passes: any order works."""
    x, w = _inputs((1, 5, 4, 3), (3, 3, 3, 2), seed=3)
    jtu.check_grads(jax.jit(_onednn_conv((2, 1), ((1, 1), (0, 2)))),
                    (x, w), order=2, modes=('rev',), atol=2e-2, rtol=2e-2)

  def test_under_vmap_scan_and_remat(self):
    """Batched by `vmap` (one call per element), differentiated inside a
    rematerialised `scan`: the values of `lax`'s convolution."""
    x, w = _inputs((3, 2, 6, 6, 4), (3, 3, 4, 4), seed=2)
    ws = jnp.stack([w, 0.5 * w])

    def loss(conv_fn, x, ws):
      @jax.checkpoint
      def body(x, w):
        return jnp.tanh(conv_fn(x, w)), None
      y, _ = lax.scan(body, x, ws)
      return jnp.sum(y ** 2)

    def batched(conv_fn):
      return jax.jit(jax.vmap(jax.grad(
          lambda x, ws: loss(conv_fn, x, ws), (0, 1)), in_axes=(0, None)))

    pads = ((1, 1), (1, 1))
    chex.assert_trees_all_close(
        batched(_onednn_conv((1, 1), pads))(x, ws),
        batched(_lax_conv((1, 1), pads))(x, ws), rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
      ('first', 0), ('middle', 1), ('last', 2),
      ('clamped_as_a_dynamic_slice', 5))
  def test_forward_stacked_reads_one_kernel_of_the_stack(self, index):
    """`forward_stacked` is `forward` with kernel `index` of the stack (an
    index past the end clamped, as `lax.dynamic_index_in_dim` clamps),
    values and both gradients."""
    x, w = _inputs((2, 6, 6, 8), (3, 3, 8, 8), seed=4)
    stack = jnp.stack([w, -0.5 * w, 2.0 * w])
    pads = ((1, 1), (1, 1))
    i = jnp.int32(index)

    def stacked(x, stack):
      return jnp.sum(jnp.tanh(onednn.forward_stacked(x, stack, i, (1, 1),
                                                     pads)) ** 2)

    def sliced(x, stack):
      kernel = lax.dynamic_index_in_dim(stack, i, keepdims=False)
      return jnp.sum(jnp.tanh(_lax_conv((1, 1), pads)(x, kernel)) ** 2)

    self.assertIn('OnednnConvForwardStacked',
                  jax.jit(stacked).lower(x, stack).as_text())
    chex.assert_trees_all_close(
        jax.jit(jax.value_and_grad(stacked, (0, 1)))(x, stack),
        jax.jit(jax.value_and_grad(sliced, (0, 1)))(x, stack),
        rtol=1e-5, atol=1e-4)

  @parameterized.product(
      shape=((40, 64, 32), (117, 256, 1024), (13, 2304, 256)),
      rows=(0, 1, 9, 'half', 'all_but_one', 'all', 'more'))
  def test_forward_stacked_computes_its_first_rows_only(self, shape, rows):
    """With a count of rows, `forward_stacked` over one row of positions
    is the stacked kernel's matmul at the first `rows` positions and zero
    at the others (a count past the row: every position), values and both
    gradients; the halves (`forward_splits`) at 117 and 13 rows too."""
    size, cin, cout = shape
    rows = {'half': size // 2, 'all_but_one': size - 1, 'all': size,
            'more': size + 5}.get(rows, rows)
    x, w = _inputs((1, 1, size, cin), (cin, cout), seed=5)
    stack = jnp.stack([-w, w]).reshape(2, 1, 1, cin, cout)
    kept_S = (jnp.arange(size) < rows)[:, None]
    g = jnp.asarray(np.random.default_rng(6).normal(size=(size, cout)),
                    jnp.float32)
    unpadded = ((0, 0), (0, 0))

    def stacked(x, stack):
      y = onednn.forward_stacked(x, stack, jnp.int32(1), (1, 1), unpadded,
                                 jnp.int32(rows))
      return y[0, 0], jnp.sum(y[0, 0] * g)

    def reference(x, stack):
      y = jnp.where(kept_S, jnp.matmul(x[0, 0], stack[1, 0, 0],
                                       precision='highest'), 0.0)
      return y, jnp.sum(y * g)

    got, want = jax.jit(stacked)(x, stack), jax.jit(reference)(x, stack)
    _assert_close(got[0], want[0])
    np.testing.assert_array_equal(got[0][rows:], 0.0)
    grads = [jax.jit(jax.grad(lambda *a, f=f: f(*a)[1], (0, 1)))(x, stack)
             for f in (stacked, reference)]
    for got_grad, want_grad in zip(*grads):
      _assert_close(got_grad, want_grad)

  @parameterized.named_parameters(
      ('a_map', (1, 4, 4, 8), (2, 1, 1, 8, 8), (1, 1), ((0, 0), (0, 0))),
      ('a_3x3_kernel', (1, 1, 8, 8), (2, 1, 3, 8, 8), (1, 1),
       ((0, 0), (1, 1))),
      ('strided', (1, 1, 8, 8), (2, 1, 1, 8, 8), (1, 2), ((0, 0), (0, 0))))
  def test_a_count_of_rows_needs_one_row_and_a_1x1_kernel(
      self, x_shape, w_shape, strides, padding):
    x, stack = _inputs(x_shape, w_shape)
    with self.assertRaisesRegex(ValueError, 'one row of positions'):
      onednn.forward_stacked(x, stack, jnp.int32(0), strides, padding,
                             jnp.int32(3))

  def test_valid_rows_reach_a_stacked_row_matmul_only(self):
    """`conv.valid_rows` counts the rows of `conv.rows_matmul` over a stack
    where oneDNN's forward runs it (AVX-512): zero after the count; a plain
    matrix, a stack outside the context and XLA's dot (where oneDNN would
    copy the weights: AVX2) compute every row."""
    x, w = _inputs((40, 64), (64, 32), seed=7)
    onednn_runs = conv.chosen_formulation(
        (1, 1, 40, 64), (1, 1, 64, 32), (1, 1), ((0, 0), (0, 0)),
        jnp.float32)[0] == 'onednn'
    stack = jnp.stack([w, 2.0 * w])
    full = jnp.matmul(x, 2.0 * w, precision='highest')
    # Contexts are read when a function is traced: a jit each.
    matmul = lambda: jax.jit(lambda x, w: conv.rows_matmul(x, w))
    with conv.stacked_unit(jnp.int32(1)):
      every_row = matmul()(x, stack)
      with conv.valid_rows(jnp.int32(25)):
        text = matmul().lower(x, stack).as_text()
        first_rows = matmul()(x, stack)
        plain = matmul()(x, 2.0 * w)
    self.assertEqual('OnednnConvForwardStacked' in text, onednn_runs)
    _assert_close(first_rows[:25], full[:25])
    if onednn_runs:
      np.testing.assert_array_equal(first_rows[25:], 0.0)
    else:
      _assert_close(first_rows, full)
    _assert_close(every_row, full)
    _assert_close(plain, full)

  @parameterized.named_parameters(
      ('rows', (1, 1, 26, 256), 1024, True, False),
      ('uneven_halves', (1, 1, 4096, 64), 40, True, False),
      ('stacked', (1, 1, 52, 1024), 256, True, True),
      ('too_few_flops', (1, 1, 8, 64), 64, False, False),
      ('too_many_rows', (1, 1, 4097, 64), 64, False, False),
      ('a_map', (1, 8, 8, 512), 512, False, False))
  def test_small_1x1_forward_runs_as_two_halves(self, x_shape, cout,
                                                splits, stacked):
    """A row matmul (one image row) with few rows and enough FLOPs for two
    threads: two matmuls over halves of the output channels (40 -> 32 +
    8), on the caller and XLA's pool."""
    x, w = _inputs(x_shape, (1, 1, x_shape[-1], cout), seed=5)
    pads = ((0, 0), (0, 0))
    two_cpus = (len(os.sched_getaffinity(0)) > 1
                and os.environ.get('OMP_NUM_THREADS') != '1')
    self.assertEqual(onednn.forward_splits(x.shape, w.shape),
                     splits and two_cpus)
    expected = _lax_conv((1, 1), pads)(x, w)
    if stacked:
      stack = jnp.stack([-w, w, 2.0 * w])
      got = jax.jit(lambda x, s: onednn.forward_stacked(
          x, s, jnp.int32(1), (1, 1), pads))(x, stack)
    else:
      got = jax.jit(_onednn_conv((1, 1), pads))(x, w)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-4)

  @parameterized.named_parameters(
      # name, x, w, strides, padding (each at least 12 MFLOP at batch 1).
      ('3x3_same', (1, 28, 28, 64), (3, 3, 64, 64), (1, 1),
       ((1, 1), (1, 1))),
      ('7x7_s2_stem', (1, 64, 62, 3), (7, 7, 3, 64), (2, 2),
       ((3, 3), (3, 2))),
      ('3x3_s2_odd_rows', (1, 30, 30, 64), (3, 3, 64, 64), (2, 2),
       ((1, 1), (1, 1))),
      ('3x3_valid_odd', (1, 31, 29, 64), (3, 3, 64, 64), (1, 1),
       ((0, 0), (0, 0))),
      ('3x3_uneven_pads', (1, 30, 30, 64), (3, 3, 64, 64), (1, 1),
       ((0, 2), (1, 0))),
      ('two_output_rows', (1, 4, 64, 128), (3, 3, 128, 128), (1, 1),
       ((0, 0), (1, 1))),
      ('1x1_map', (1, 40, 40, 64), (1, 1, 64, 128), (1, 1),
       ((0, 0), (0, 0))),
  )
  def test_batch_1_forward_runs_as_two_halves_of_its_rows(
      self, x_shape, w_shape, strides, padding):
    """One image's forward, with each post-op: two one-thread convolutions
    over the halves of its output rows (the padding split between them),
    giving lax's values."""
    two_cpus = (len(os.sched_getaffinity(0)) > 1
                and os.environ.get('OMP_NUM_THREADS') != '1')
    halves = onednn.forward_row_halves(x_shape, w_shape, strides, padding)
    if two_cpus and not onednn.forward_copies_weights(x_shape, w_shape,
                                                      strides, padding):
      # On AVX-512 oneDNN's direct kernels take every shape here.
      self.assertTrue(halves)
    elif not two_cpus:
      self.assertFalse(halves)
    x, w = _inputs(x_shape, w_shape, seed=7)
    rng = np.random.default_rng(8)
    scale, shift, bias = (jnp.asarray(rng.normal(size=w_shape[-1]),
                                      jnp.float32) for _ in range(3))
    y = _lax_conv(strides, padding)(x, w)
    into = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    _assert_close(jax.jit(_onednn_conv(strides, padding))(x, w), y)
    _assert_close(
        jax.jit(lambda *a: onednn.forward_affine_relu(*a, strides, padding))(
            x, w, scale, shift),
        jnp.maximum(y * scale + shift, 0.0))
    _assert_close(
        jax.jit(lambda *a: onednn.forward_add_into(*a, strides, padding))(
            x, w, bias, into),
        into + y + bias)

  def test_forward_of_several_images_or_one_row_is_not_halved(self):
    pads = ((1, 1), (1, 1))
    self.assertFalse(onednn.forward_row_halves(
        (2, 28, 28, 64), (3, 3, 64, 64), (1, 1), pads))
    self.assertFalse(onednn.forward_row_halves(
        (1, 1, 64, 128), (1, 3, 128, 128), (1, 1), ((0, 0), (1, 1))))
    self.assertFalse(onednn.forward_row_halves(  # 1.2 MFLOP.
        (1, 8, 8, 32), (3, 3, 32, 32), (1, 1), pads))

  def test_conv_reads_a_stack_only_under_stacked_unit(self):
    x, w = _inputs((2, 16, 16, 4), (3, 3, 4, 4))  # oneDNN's on any CPU.
    stack = jnp.stack([w, 3.0 * w])

    def ours(x, kernel):
      return conv.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                       dimension_numbers=_NHWC)

    with self.assertRaisesRegex(ValueError, 'outside `conv.stacked_unit`'):
      ours(x, stack)
    with conv.stacked_unit(jnp.int32(1)):
      text = jax.jit(ours).lower(x, stack).as_text()
      got = jax.jit(ours)(x, stack)
      with onednn.disabled():  # XLA's convolution of the sliced kernel.
        xla = jax.jit(lambda x, k: ours(x, k))
        self.assertNotIn('Onednn', xla.lower(x, stack).as_text())
        fallback = xla(x, stack)
    self.assertIn('OnednnConvForwardStacked', text)
    want = ours(x, 3.0 * w)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)
    chex.assert_trees_all_close(fallback, want, rtol=1e-5, atol=1e-4)

  @parameterized.named_parameters(
      ('float16', (1, 4, 4, 2), (3, 3, 2, 2), (1, 1), ((1, 1), (1, 1)),
       jnp.float16),
      ('negative_padding', (1, 6, 6, 2), (3, 3, 2, 2), (1, 1),
       ((-1, 1), (1, 1)), jnp.float32),
      ('crops_the_input', (1, 8, 8, 2), (1, 1, 2, 2), (2, 2),
       ((0, 0), (0, 0)), jnp.float32),  # Reads rows 0..6 of 8.
      ('empty_output', (1, 2, 2, 2), (3, 3, 2, 2), (1, 1),
       ((0, 0), (0, 0)), jnp.float32),
      ('padding_wider_than_the_kernel', (1, 7, 6, 2), (3, 3, 2, 2),
       (1, 1), ((3, 1), (1, 1)), jnp.float32),
  )
  def test_unsupported(self, x_shape, w_shape, strides, padding, dtype):
    self.assertFalse(onednn.supported(x_shape, w_shape, strides, padding,
                                      dtype))

  def test_cropping_conv_falls_back_to_lax(self):
    x, w = _inputs((1, 8, 8, 2), (3, 3, 2, 3))

    def ours(x, w):
      return conv.conv_general_dilated(x, w, (2, 2), 'VALID',
                                       dimension_numbers=_NHWC)

    self.assertNotIn('Onednn', jax.jit(ours).lower(x, w).as_text())
    np.testing.assert_allclose(ours(x, w), _lax_conv((2, 2), 'VALID')(x, w),
                               rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(('even', 8), ('odd', 7))
  def test_strided_1x1_conv_subsamples_first(self, size):
    """A strided 1x1 conv (over an even size it crops, which oneDNN does
    not take) runs as a strided slice and oneDNN's stride-1 1x1 conv,
    where that forward reads its weights in place; values and gradients
    are lax's either way."""
    x, w = _inputs((2, size, size, 16), (1, 1, 16, 8))

    def ours(x, w):
      return conv.conv_general_dilated(x, w, (2, 2), 'SAME',
                                       dimension_numbers=_NHWC)

    half = (-(-size // 2),) * 2
    in_place = not onednn.forward_copies_weights(
        (2, *half, 16), w.shape, (1, 1), ((0, 0), (0, 0)))
    text = jax.jit(ours).lower(x, w).as_text()
    self.assertEqual('OnednnConvForward' in text, in_place)
    if in_place:
      self.assertRegex(text, r'stride_h = 1 ')
    y, vjp = jax.vjp(ours, x, w)
    y_ref, vjp_ref = jax.vjp(_lax_conv((2, 2), 'SAME'), x, w)
    chex.assert_shape(y, (2, *half, 8))
    g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape),
                    jnp.float32)
    for got, want in zip((y, *vjp(g)), (y_ref, *vjp_ref(g))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(('in_place', False), ('copied', True))
  def test_strided_1x1_conv_with_few_positions_subsamples_first(
      self, copies_weights):
    """Where the subsampled conv has few output positions it runs as one
    row (`conv.formulation`'s 'rows'), not as XLA's strided conv; where
    oneDNN's forward would copy its weights (AVX2) nothing changes. Both
    branches on any CPU: the copy question's answer is set."""
    x, w = _inputs((1, 16, 16, 512), (1, 1, 512, 256))
    self.enter_context(absltest.mock.patch.object(
        onednn, 'forward_copies_weights', return_value=copies_weights))

    def ours(x, w):
      return conv.conv_general_dilated(x, w, (2, 2), 'SAME',
                                       dimension_numbers=_NHWC)

    forward = conv.chosen_formulation((1, 8, 8, 512), w.shape, (1, 1),
                                      ((0, 0), (0, 0)), jnp.float32)[0]
    self.assertEqual(forward, 'dot' if copies_weights else (
        'rows' if onednn.forward_splits((1, 1, 64, 512), (1, 1, 512, 256))
        else 'onednn'))
    text = jax.jit(ours).lower(x, w).as_text()
    self.assertEqual('stablehlo.convolution' in text, copies_weights)
    self.assertEqual('1x1x64x512xf32' in text, forward == 'rows')
    np.testing.assert_allclose(jax.jit(ours)(x, w),
                               _lax_conv((2, 2), 'SAME')(x, w),
                               rtol=1e-5, atol=1e-4)

  def test_avx2_kernels_match_lax(self):
    """The kernels a CPU without AVX-512 gets (blocked forward weights, as
    im2col + gemm would otherwise read HWIO), on any x86 CPU: oneDNN picks
    its kernels when the process starts, so in a subprocess that caps its
    instruction set (`ONEDNN_MAX_CPU_ISA`)."""
    code = textwrap.dedent('''
        import jax, numpy as np
        from jax import lax
        from sact_jax import conv, onednn
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 16, 16, 32)).astype(np.float32)
        w = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
        pad = ((1, 1), (1, 1))
        ours = lambda x, w: conv.conv2d(x, w, (1, 1), pad, None, 'onednn',
                                        'onednn')
        ref = lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        y, vjp = jax.vjp(ours, x, w)
        y_ref, vjp_ref = jax.vjp(ref, x, w)
        g = rng.normal(size=y.shape).astype(np.float32)
        pairs = [(y, y_ref), *zip(vjp(g), vjp_ref(g))]
        print(onednn.forward_copies_weights(x.shape, w.shape, (1, 1), pad))
        print(max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                  for a, b in pairs))
        ''')
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2', JAX_PLATFORMS='cpu')
    run = subprocess.run([sys.executable, '-c', code], env=env,
                         capture_output=True, text=True, check=False)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    copies, error = run.stdout.split()[-2:]
    self.assertEqual(copies, 'True')  # So `conv` keeps some forwards XLA's.
    self.assertLess(float(error), 1e-5)


def _cpu_flags() -> set[str]:
  """The CPU's feature flags as /proc/cpuinfo names them."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


# What GCC's `arch=x86-64-v3` / `-v4` targets (TapSums' 8- and 16-float
# bodies) may use, by /proc/cpuinfo's names (lzcnt is `abm` there); v4 is
# v3 and AVX-512's core.
_X86_64_V3 = {'avx', 'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'abm', 'movbe',
              'xsave'}
_WIDTH_FLAGS = {
    16: _X86_64_V3 | {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq',
                      'avx512vl'},
    8: _X86_64_V3,
    4: set(),  # x86-64's baseline (SSE2).
}


class BackendTest(absltest.TestCase):

  def test_only_a_cpu_default_backend_uses_onednn(self):
    """A GPU or TPU process neither builds the library nor routes to it."""
    with mock.patch.object(onednn, 'available',
                           side_effect=AssertionError('built')), \
        mock.patch.object(jax, 'default_backend', return_value='gpu'):
      self.assertFalse(onednn.enabled())

  def test_an_accelerator_mesh_needs_an_accelerator_default(self):
    def mesh_on(platform):
      device = types.SimpleNamespace(platform=platform)
      return types.SimpleNamespace(devices=np.array([device], object))
    with mock.patch.object(jax, 'default_backend', return_value='cpu'):
      with self.assertRaisesRegex(
          ValueError, r'mesh is on gpu but .* JAX_PLATFORMS=gpu,cpu'):
        parallel.check_platform(mesh_on('gpu'))
      parallel.check_platform(mesh_on('cpu'))
    with mock.patch.object(jax, 'default_backend', return_value='gpu'):
      parallel.check_platform(mesh_on('gpu'))
      parallel.check_platform(mesh_on('cpu'))  # Slower, but it works.


class TapSumsTest(parameterized.TestCase):
  """Each vector body of row_gather.cc's tap sums against float64 sums: a
  CPU runs only the widest it has, so the suite checks the others here."""

  @parameterized.named_parameters(('avx512', 16), ('avx2', 8), ('sse', 4))
  def test_body_matches_float64_sums(self, width):
    if not _ON_X86_LINUX:
      self.skipTest('oneDNN is installed on x86-64 Linux only (setup.cfg)')
    missing = _WIDTH_FLAGS[width] - _cpu_flags()
    if missing:
      self.skipTest(f'This CPU lacks {sorted(missing)} for {width} lanes.')
    rng = np.random.default_rng(width)
    for channels, c0, c1 in ((1, 0, 1), (3, 0, 3), (4, 0, 4), (15, 0, 15),
                             (16, 0, 16), (17, 0, 17), (33, 5, 30),
                             (256, 0, 256), (256, 7, 200), (1000, 0, 1000),
                             (1024, 16, 1024), (1024, 3, 3)):
      x = rng.normal(size=channels).astype(np.float32)
      kernel = rng.normal(size=(9, channels)).astype(np.float32)
      got = onednn.tap_sums(x, kernel, c0, c1, width)
      terms = (kernel[:, c0:c1].astype(np.float64)
               * x[c0:c1].astype(np.float64))
      want = terms.sum(axis=1)
      # float32 accumulation in any order: within a few ulps of the sum of
      # the terms' magnitudes.
      bound = 4 * np.finfo(np.float32).eps * (np.abs(terms).sum(axis=1) + 1)
      np.testing.assert_array_less(np.abs(got - want), bound,
                                   err_msg=f'{channels} [{c0}, {c1})')
      if c0 == c1:  # The empty range sums to zero.
        np.testing.assert_array_equal(got, np.zeros(9, np.float32))

  def test_bad_width_or_shapes(self):
    if not _ON_X86_LINUX:
      self.skipTest('oneDNN is installed on x86-64 Linux only (setup.cfg)')
    x, kernel = np.ones(8, np.float32), np.ones((9, 8), np.float32)
    with self.assertRaisesRegex(ValueError, 'width must be 16, 8 or 4'):
      onednn.tap_sums(x, kernel, 0, 8, 32)
    with self.assertRaisesRegex(ValueError, 'kernel \\[9, C\\]'):
      onednn.tap_sums(x, kernel[:, :4], 0, 8, 4)
    with self.assertRaisesRegex(ValueError, 'c0 <= c1'):
      onednn.tap_sums(x, kernel, 5, 2, 4)


class BuildTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not _ON_X86_LINUX:
      self.skipTest('oneDNN is installed on x86-64 Linux only (setup.cfg)')
    self.header = onednn._package_file('onednn-devel-cpu-gomp',
                                       'oneapi/dnnl/dnnl.hpp')
    self.library = onednn._package_file('onednn-cpu-gomp', 'libdnnl.so')
    self.cache = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.cache)
    self.enter_context(absltest.mock.patch.dict(
        os.environ, {'XDG_CACHE_HOME': self.cache}))

  def test_built_once_then_cached(self):
    built = onednn._build(self.header, self.library)
    self.assertTrue(built.startswith(self.cache))
    mtime = os.path.getmtime(built)
    self.assertEqual(onednn._build(self.header, self.library), built)
    self.assertEqual(os.path.getmtime(built), mtime)
    # Nothing but the library in its folder (no temporary leftovers).
    self.assertEqual(os.listdir(os.path.dirname(built)), ['libsact_onednn.so'])

  def test_failed_build_says_why_and_leaves_nothing(self):
    for compiler in ('false', '/nonexistent/g++'):
      with absltest.mock.patch.dict(os.environ, {'CXX': compiler}):
        with self.assertRaisesRegex(onednn.Unavailable, 'failed'):
          onednn._build(self.header, self.library)
    for _, _, files in os.walk(self.cache):
      self.assertEqual(files, [])

  def test_disabled_by_the_environment(self):
    with absltest.mock.patch.dict(os.environ, {onednn.DISABLE_ENV: '0'}):
      with self.assertRaisesRegex(onednn.Unavailable, onednn.DISABLE_ENV):
        onednn._load()


if __name__ == '__main__':
  absltest.main()
