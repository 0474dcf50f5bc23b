"""A block's `nnx.scan` against its plain-loop twin (values, grads, stats).

The twin slices the stacked parameters of `block.steps` one unit at a time
(`nnx.split`, `a[i]`, `nnx.merge`) and runs Algorithm 1 with `act.step` in a
Python loop, so it shares no scan machinery with `blocks.Block`.
"""

import platform
import re

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import act
from sact_jax import conv
from sact_jax import flops as flops_lib
import testing_utils as tu

_UNITS = 4  # Units per block: 3 scanned steps.


def _loop_twin(block, x_BxHxWxC):
  """Block.__call__ with the scan written as a Python loop over units."""
  x = block.first(x_BxHxWxC)
  batch, height, width = x.shape[:3]
  graphdef, stacked = nnx.split(block.steps)
  new_states = []
  sact = block.model_type == 'sact'
  if block.model_type != 'vanilla':
    state = act.init_state(x, (batch, height, width) if sact else (batch,))
  for i in range(block.num_units - 1):
    step = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
    if block.model_type == 'vanilla':
      x = x + step.unit.residual(x)
    else:
      # Step i holds the head of unit i + 1 (1-based) and unit i + 2.
      state = act.step(state, step.head(x), x, block.eps)
      residual = step.unit.residual(x)
      if sact:
        x = act.masked_residual(x, residual, state.running)
      else:
        x = x + residual
    new_states.append(nnx.state(step))
  # Write the BatchNorm statistics the units updated back into the stack.
  nnx.update(block.steps,
             jax.tree.map(lambda *a: jnp.stack(a), *new_states))
  if block.model_type == 'vanilla':
    return x, {}
  state = act.finish(state, x, block.eps)
  return state.output, {'ponder_cost': state.ponder_cost,
                        'num_units': state.num_units}


def _scan(block, x):
  return block(x, flops_lib.FlopCounter())


def _scan_body(jaxpr):
  """The body of the first `scan` in a jaxpr, searched depth-first."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'scan':
      return eqn.params['jaxpr'].jaxpr
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(inner, 'jaxpr', inner)
        if hasattr(inner, 'eqns') and (body := _scan_body(inner)):
          return body
  return None


def _remats(jaxpr) -> int:
  return sum(e.primitive.name in ('checkpoint', 'remat', 'remat2')
             for e in jaxpr.eqns)


def _train_step_fn(forward):
  """Output, aux and parameter gradients of a loss using every output."""

  def train_step(block, x, w):
    def loss_fn(block):
      y, aux = forward(block, x)
      loss = jnp.sum(y * w)
      if aux:
        loss = loss + jnp.mean(aux['ponder_cost'])
      return loss, (y, aux)

    (_, (y, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(block)
    return y, aux, grads

  return tu.jit(train_step)


_twin_step = _train_step_fn(_loop_twin)
_scan_step = _train_step_fn(_scan)


def _make_block(family, model_type, **kwargs):
  """Block 1 of a one-block model, halting mid-block, and its input."""
  if family == 'cifar':
    model = tu.build('cifar', (_UNITS,), model_type, base_channels=6,
                     seed=7, **kwargs)
    x = tu.images((3, 8, 8, 6), seed=1)
  else:  # Block input: the 64-channel stem; output depth 4 x 2.
    model = tu.build('imagenet', (_UNITS,), model_type, base_channels=2,
                     seed=7, **kwargs)
    x = tu.images((3, 8, 8, 64), seed=1)
  if model_type != 'vanilla':
    tu.set_halting_bias(model, 0.0)  # Halting spreads over the units.
  return model.blocks[0], x


def _batch_stats(block):
  return nnx.state(block, nnx.BatchStat)


class BlockScanTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('cifar_vanilla', 'cifar', 'vanilla', ('remat',)),
      ('cifar_act', 'cifar', 'act', ('remat', 'unroll')),
      ('cifar_sact', 'cifar', 'sact', ('remat', 'unroll')),
      ('imagenet_sact', 'imagenet', 'sact', ()),
  )
  def test_scan_equals_loop_twin(self, family, model_type, variants):
    """Train mode: outputs, halting, parameter grads and BN statistics."""
    block, x = _make_block(family, model_type)
    block.train()
    w = tu.images(x.shape[:3] + (6 if family == 'cifar' else 8,), seed=2)
    before = _batch_stats(block)

    twin = nnx.clone(block)
    y_ref, aux_ref, grads_ref = _twin_step(twin, x, w)
    stats_ref = _batch_stats(twin)

    if model_type != 'vanilla':
      # Not vacuous: halting happens at different units.
      self.assertGreater(len(np.unique(aux_ref['num_units'])), 1)
      tu.assert_halting_margin(_scan, block, x)  # Counts compared exactly.
    # BN statistics of every unit (stacked ones: each slice) and head moved.
    for path, moved in nnx.to_flat_state(
        jax.tree.map(lambda a, b: jnp.any(a != b, axis=-1),
                     stats_ref, before)):
      self.assertTrue(bool(jnp.all(moved[...])), path)

    for variant in ('scan',) + tuple(variants):
      with self.subTest(variant):
        kwargs = {variant: True} if variant != 'scan' else {}
        block, _ = _make_block(family, model_type, **kwargs)
        block.train()
        y, aux, grads = _scan_step(block, x, w)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        if aux_ref:
          np.testing.assert_array_equal(aux['num_units'],
                                        aux_ref['num_units'])
          np.testing.assert_allclose(aux['ponder_cost'],
                                     aux_ref['ponder_cost'], rtol=1e-6)
        chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(_batch_stats(block), stats_ref,
                                    rtol=1e-5, atol=1e-6)
        # Halting parameters receive gradient (through output and ponder).
        if model_type != 'vanilla':
          head_grads = jax.tree.leaves(grads['steps']['head'])
          self.assertTrue(all(bool(jnp.all(jnp.isfinite(g)))
                              for g in head_grads))
          self.assertGreater(
              max(float(jnp.max(jnp.abs(g))) for g in head_grads), 1e-3)

  @parameterized.product(family=('cifar', 'imagenet'),
                         model_type=('vanilla', 'sact'))
  def test_remat_keeping_convs_equals_keeping_everything(self, family,
                                                         model_type):
    """`remat='convs'` (XLA's convolutions, as on accelerators): the
    values, grads and BN statistics of the unrematerialised scan, and the
    rematerialised step keeps the convolutions' outputs."""
    results = []
    for remat in (False, 'convs'):
      block, x = _make_block(family, model_type, remat=remat,
                             fast_conv_backward=False)
      block.train()
      w = tu.images(x.shape[:3] + (6 if family == 'cifar' else 8,), seed=2)
      results.append((*_scan_step(block, x, w), _batch_stats(block)))
    (y_ref, _, grads_ref, stats_ref), (y, _, grads, stats) = results
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)
    graphdef, state = nnx.split(block)
    closed = jax.make_jaxpr(
        lambda state, x: _scan(nnx.merge(graphdef, state), x)[0])(state, x)
    body = _scan_body(closed.jaxpr)
    self.assertEqual(_remats(body), 1)
    self.assertIn('_keeps_convs', str(body.eqns[0].params['policy']))

  def test_unknown_remat_is_refused(self):
    with self.assertRaisesRegex(ValueError, 'remat must be one of'):
      _make_block('cifar', 'sact', remat='all')

  @parameterized.product(family=('cifar', 'imagenet'),
                         remat=(False, True, 'convs'))
  def test_accelerator_heads_equal_the_cpu_heads(self, family, remat):
    """Train mode: the SACT heads as an accelerator runs them (window
    sums; ImageNet's folding its batch statistics, CIFAR's as
    `conv.affine_window_sum`), inside rematerialised units too, against
    the CPU's (BatchNorm, then the conv) without remat: outputs, grads and
    BN statistics."""
    w = None
    results = []
    for fast in (True, False):
      block, x = _make_block(family, 'sact',
                             remat=remat if not fast else False,
                             fast_conv_backward=fast)
      block.train()
      self.assertEqual(block.steps.head.sums_windows, not fast)
      if w is None:
        w = tu.images(x.shape[:3] + (6 if family == 'cifar' else 8,),
                      seed=2)
      results.append((*_scan_step(block, x, w), _batch_stats(block)))
    (y_ref, aux_ref, grads_ref, stats_ref), (y, aux, grads, stats) = results
    self.assertGreater(len(np.unique(aux_ref['num_units'])), 1)
    tu.assert_halting_margin(_scan, block, x)  # Counts compared exactly.
    # Two conv formulations: on this CPU they differ by a third of 1e-4.
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=3e-5)
    np.testing.assert_array_equal(aux['num_units'], aux_ref['num_units'])
    chex.assert_trees_all_close(grads, grads_ref, rtol=3e-4, atol=3e-5)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(
      ('cifar_vanilla', 'cifar', 'vanilla'),
      ('cifar_sact', 'cifar', 'sact'),
      ('imagenet_act', 'imagenet', 'act'),
  )
  def test_evaluation_reads_the_kernels_in_place(self, family, model_type):
    """Eval mode: where oneDNN runs the units' convs, their kernels are read
    from the stack in place (no per-unit copy): the twin's outputs and
    parameter grads (the stack's gradient put together unit by unit)."""
    block, x = _make_block(family, model_type)
    # 768 output rows: oneDNN runs the 3x3 forwards on any CPU, also where
    # its forward copies the weights first (`conv.formulation`).
    x = tu.images((3, 16, 16, x.shape[-1]), seed=1)
    block.eval()
    self.assertTrue(block.use_running_average)
    w = tu.images(x.shape[:3] + (6 if family == 'cifar' else 8,), seed=2)
    y_ref, aux_ref, grads_ref = _twin_step(nnx.clone(block), x, w)
    y, aux, grads = _scan_step(block, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if aux_ref:
      np.testing.assert_array_equal(aux['num_units'], aux_ref['num_units'])
      tu.assert_halting_margin(_scan, block, x)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
    graphdef, state = nnx.split(block)
    hlo = jax.jit(lambda state, x: _scan(nnx.merge(graphdef, state), x)[0]
                  ).lower(state, x).as_text()
    in_place = conv.kernels_read_in_place(block.steps.unit)
    self.assertEqual('OnednnConvForwardStacked' in hlo, bool(in_place))
    if platform.system() == 'Linux' and platform.machine() == 'x86_64':
      # setup.cfg installs oneDNN there: every conv of the unit.
      self.assertLen(in_place, 3 if family == 'imagenet' else 2)
    block.train()  # Training slices the kernels.
    graphdef, state = nnx.split(block)
    hlo = jax.jit(lambda state, x: _scan(nnx.merge(graphdef, state), x)[0]
                  ).lower(state, x).as_text()
    self.assertFalse('OnednnConvForwardStacked' in hlo)

  @parameterized.named_parameters(
      ('scan', dict(remat=False), False, 1),
      ('default', {}, jax.default_backend() == 'cpu', 1),
      ('remat', dict(remat=True), True, 1),
      ('remat_convs', dict(remat='convs'), True, 1),
      ('unroll', dict(unroll=True, remat=False), False, _UNITS - 1),
      ('fast_conv_backward', dict(fast_conv_backward=True, remat=False),
       False, 1),
      ('native_conv_backward', dict(fast_conv_backward=False, remat=False),
       False, 1),
  )
  def test_flags_reach_the_scan(self, kwargs, remat, unroll):
    """The variants above really differ: remat and unroll show in the jaxpr."""
    block, x = _make_block('cifar', 'sact', **kwargs)
    graphdef, state = nnx.split(block)
    closed = jax.make_jaxpr(
        lambda state, x: _scan(nnx.merge(graphdef, state), x)[0])(state, x)
    jaxpr = str(closed)
    self.assertEqual(len(re.findall(r'= scan\[', jaxpr)), 1)
    self.assertIn(f'unroll={unroll}', jaxpr)
    body = _scan_body(closed.jaxpr)
    if remat:  # The whole step, rematerialised.
      self.assertLen(body.eqns, 1)
      self.assertEqual(_remats(body), 1)
    else:  # The step's ops, none rematerialised.
      self.assertGreater(len(body.eqns), 10)
      self.assertEqual(_remats(body), 0)
    # Stride-1 convs of the scanned units take the fast-backward path
    # (`conv.conv2d`) when asked to; by default only on the CPU, whose scan
    # backward it fixes (GPUs and TPUs keep their native kernels, and run
    # the SACT head's conv to one channel as `conv.window_sum`).
    fast = kwargs.get('fast_conv_backward', jax.default_backend() == 'cpu')
    self.assertEqual('name=conv2d' in jaxpr, fast)
    self.assertEqual('name=window_sum' in jaxpr, not fast)

  @parameterized.parameters(
      ('cifar', False, True, 'affine_window_sum'),
      ('imagenet', False, True, None),  # Folds its batch statistics.
      ('cifar', False, False, None),
      ('cifar', True, True, None))
  def test_sact_head_formulation(self, family, fast_conv_backward, train,
                                 name):
    """Which custom-gradient local term a SACT head traces: in training
    with window sums a head that keeps only its input for the backward
    pass (`conv.affine_window_sum`) unless it folds its batch statistics
    (the identity activation); plain window sums in evaluation; the CPU's
    conv otherwise."""
    block, x = _make_block(family, 'sact', remat=False,
                           fast_conv_backward=fast_conv_backward)
    if not train:
      block.eval()
    self.assertEqual(block.steps.head.folds_batch_statistics,
                     family == 'imagenet' and train
                     and not fast_conv_backward)
    graphdef, state = nnx.split(block)
    jaxpr = str(jax.make_jaxpr(
        lambda state, x: _scan(nnx.merge(graphdef, state), x)[0])(state, x))
    self.assertEqual('name=affine_window_sum' in jaxpr,
                     name == 'affine_window_sum')
    self.assertEqual('name=window_sum' in jaxpr, not fast_conv_backward)


if __name__ == '__main__':
  absltest.main()
