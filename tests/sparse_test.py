"""Sparse inference (`sact_jax.sparse`) gives the dense model's outputs.

Every test compares `sparse` with the dense model on the same weights, at
the suite's 'highest' matmul precision (tests/conftest.py):
logits within 1e-4 of their scale, identical `num_units` maps and FLOPs,
ponder costs within 1e-4. The SACT cases force each execution mode
('rows': gathered active/dilated rows; 'dense'; 'device': one while loop per
block) and check that the halting regimes the test means to cover really
occur (fractions of positions halting early, units skipped).
`DefaultPrecisionTest` instead runs at the backend's default matmul
precision (TF32 on GPUs), with bounds for its rounding.
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sact_jax import conv
from sact_jax import halting
from sact_jax import layers
from sact_jax import onednn
from sact_jax import reference
from sact_jax import sparse
from sact_jax import units as units_lib
from sact_jax.sparse import common
from sact_jax.sparse import options as options_lib
from sact_jax.sparse import planner as planner_lib
from sact_jax.sparse import rows as rows_lib
from sact_jax.sparse import sact_block
from sact_jax.sparse import stages
import testing_utils as tu

# LLVM -O0: compile time dominates these tests (see testing_utils).
_FAST = tuple(tu.FAST_COMPILE.items())


def _runner(model, **options) -> sparse.SparseRunner:
  return sparse.SparseRunner(model, compiler_options=_FAST, **options)


def _fixture(name: str):
  case = tu.manifest()['cases'][name]
  model = reference.load_reference_model(
      tu.load_npz(case['params_npz']), family=case['family'],
      units=case['units_per_block'], model_type=case['model_type'],
      num_classes=case['num_classes'], base_channels=case['base_channels'])
  return model, jnp.asarray(tu.load_npz(case['input_file'])['images'])


def _assert_same(test, dense, sparse_out):
  """Sparse outputs equal the dense model's (module docstring)."""
  (logits, aux), (s_logits, s_aux) = dense, sparse_out
  test.assertEqual(set(s_aux), set(aux) | {'flops_overhead'})
  scale = float(jnp.max(jnp.abs(logits)))
  test.assertLess(float(jnp.max(jnp.abs(s_logits - logits))) / scale, 1e-4)
  np.testing.assert_array_equal(np.asarray(s_aux['flops']),
                                np.asarray(aux['flops']))
  test.assertLen(s_aux['num_units'], len(aux['num_units']))
  for expected, got in zip(aux['num_units'], s_aux['num_units']):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  for expected, got in zip(aux['ponder_cost'], s_aux['ponder_cost']):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                               rtol=0, atol=1e-4)
  np.testing.assert_allclose(float(s_aux['ponder_loss']),
                             float(aux['ponder_loss']), rtol=0, atol=1e-4)
  overhead = float(s_aux['flops_overhead'])
  test.assertTrue(np.isfinite(overhead) and overhead >= 0, overhead)


def _partial_row_units(runner) -> list[dict]:
  """Units run at gathered rows with some, not all, positions active."""
  return [u for u in runner.last_units
          if 'active' in u and not u['dense'] and 0 < u['active'] < u['rows']]


def _early_fractions(aux, model) -> list[float]:
  """Per block with heads: fraction of positions halting before the end."""
  return [float(np.mean(np.asarray(n) < b.num_units))
          for n, b in zip(aux['num_units'], model.blocks)
          if b.num_units > 1]


@functools.cache
def _model(family: str):
  """A small random SACT model and one image (one per family: shared jits).

  Batch 1 and an odd, non-square size on purpose; larger batches come with
  the fixtures and `test_bounded_compilations_over_varied_inputs`.
  """
  if family == 'cifar':
    model = tu.build('cifar', (4, 4), 'sact', seed=1, base_channels=8)
    images = tu.images((1, 23, 29, 3), seed=3)
  else:
    model = tu.build('imagenet', (3, 4), 'sact', seed=2, base_channels=8)
    images = tu.images((1, 61, 53, 3), seed=4)
  _tame(model)
  return model, images


def _tame(model):
  """Eval mode, halting logits scaled down.

  Random features are large: tamed logits let a bias move the fraction of
  early halting positions across its whole range.
  """
  model.eval()
  for head in tu.heads(model):
    for conv in (head.local_conv, head.global_conv):
      conv.kernel[...] = conv.kernel[...] * 0.05


def _forward(model, images):
  return model(images)


def _tune_biases(model, images, target: float) -> tuple[float, ...]:
  """Per-block halting biases with which `target` of positions halt early.

  Blocks are tuned in order (a block's input depends on the ones before),
  each by bisection on the dense model. Then all move together by
  thousandths until every halting decision on `images` lies
  `tu.HALTING_MARGIN` from the threshold (the tests compare the sparse
  and dense unit counts exactly), the fractions staying near `target`.
  """
  heads = tu.heads(model)
  biases = [-16.0] * len(heads)
  for i in range(len(heads)):
    lo, hi = -16.0, 16.0
    for _ in range(20):
      biases[i] = 0.5 * (lo + hi)
      _set_biases(model, biases)
      achieved = _early_fractions(tu.forward(model, images)[1], model)[i]
      if abs(achieved - target) < 0.03:
        break
      if achieved < target:
        lo = biases[i]  # A higher bias halts earlier.
      else:
        hi = biases[i]
  for k in range(40):  # Offsets 0, +0.001, -0.001, +0.002, ...
    moved = [b + 1e-3 * ((k + 1) // 2) * (1 if k % 2 else -1)
             for b in biases]
    _set_biases(model, moved)
    fractions = _early_fractions(tu.forward(model, images)[1], model)
    if (all(abs(f - target) < 0.05 for f in fractions)
        and tu.halting_margin(_forward, model, images)[0]
        >= tu.HALTING_MARGIN):
      return tuple(moved)
  raise AssertionError(f'No halting bias near {biases} keeps the margin.')


@functools.cache
def _regime_biases(family: str, target: float) -> tuple[float, ...]:
  """`_tune_biases` for the family's shared model."""
  return _tune_biases(*_model(family), target)


def _set_biases(model, biases):
  for head, bias in zip(tu.heads(model), biases):
    param = tu.halting_bias(head)
    param[...] = jnp.full(param.shape, bias, jnp.float32)


def _random_sact(family: str, target: float):
  """The family's model set to a halting regime; its batch; fractions."""
  model, images = _model(family)
  _set_biases(model, _regime_biases(family, target))
  return model, images, _early_fractions(tu.forward(model, images)[1], model)


def _runner_for(model, **options) -> sparse.SparseRunner:
  """Runners shared across tests (jit caches live in the runner).

  Two tail buckets keep the number of compiled shapes (and the test time)
  small; `test_bounded_compilations_over_varied_inputs` uses more. The
  host loop unless a test asks for the device's (`DeviceRowsTest`).
  """
  options = {'compiler_options': _FAST, 'buckets': 2, 'rows_loop': 'host',
             **options}
  return sparse.runner_for(model, **options)


class FixtureTest(parameterized.TestCase):
  """Equivalence on the reference's parity fixtures (its weights, inputs)."""

  @parameterized.named_parameters(
      ('cifar_vanilla', 'cifar_vanilla', {}),
      ('imagenet_vanilla', 'imagenet_vanilla', {}),
      ('cifar_act', 'cifar_act', {}),
      ('cifar_act_host_loop', 'cifar_act', {'act_loop': 'host'}),
      ('cifar_sact_rows', 'cifar_sact', {'sact_mode': 'rows'}),
      ('imagenet_sact_rows', 'imagenet_sact', {'sact_mode': 'rows'}),
      ('imagenet_sact_dense', 'imagenet_sact', {'sact_mode': 'dense'}),
  )
  def test_matches_dense_model(self, name, options):
    model, images = _fixture(name)
    runner = _runner(model, **options)
    _assert_same(self, tu.forward(model, images), runner(images))
    if options.get('sact_mode') == 'rows':
      self.assertNotEmpty(_partial_row_units(runner))
    if model.model_type == 'vanilla':
      self.assertEqual(float(runner(images)[1]['flops_overhead']), 0.0)


class RandomModelTest(parameterized.TestCase):
  """Random models whose halting bias sets how many positions halt early."""

  @parameterized.product(family=('cifar', 'imagenet'),
                         target=(0.1, 0.5, 0.9))
  def test_halting_regimes(self, family, target):
    model, images, achieved = _random_sact(family, target)
    # The regime is really covered: about `target` of the positions of
    # every block halt before its last unit.
    for fraction in achieved:
      self.assertBetween(fraction, target - 0.1, target + 0.1)
    dense = tu.forward(model, images)
    runner = _runner_for(model, sact_mode='rows')
    _assert_same(self, dense, runner(images))
    self.assertNotEmpty(_partial_row_units(runner))
    # Pipelined plans (the default) bound the exact sets, from the unit
    # before when the host did not wait.
    units = [u for u in runner.last_units if 'active' in u]
    self.assertTrue(all(u['planned_active'] >= u['active'] and
                        u['planned_dilated'] >= u['dilated'] for u in units))
    if target == 0.5:
      device = _runner_for(model, sact_mode='device')
      timings = {}
      _assert_same(self, dense, device(images, timings=timings))
      # Every block a device loop: the whole model is one program.
      self.assertEqual(set(timings), {'whole_model'})
      self.assertLen(device.last_units, len(model.blocks))

  @parameterized.parameters(0.0, math.inf)
  def test_head_on_the_map_or_at_rows(self, dense_head):
    """A sparse unit's head on the whole map or at rows: same outputs."""
    model, images, _ = _random_sact('imagenet', 0.5)
    runner = _runner_for(model, sact_mode='rows', dense_head=dense_head)
    _assert_same(self, tu.forward(model, images), runner(images))
    partial = _partial_row_units(runner)
    self.assertNotEmpty(partial)
    # With 0 every unit followed by a head runs it on the map (the blocks'
    # last units have none); with inf none does.
    self.assertEqual(any(u['dense_head'] for u in partial), dense_head == 0)

  def test_dense_units_inside_a_sparse_block(self):
    """'auto' with free gathers still runs full units densely."""
    model, images, _ = _random_sact('cifar', 0.1)
    runner = _runner_for(model, sact_mode='auto', device_flops=0,
                         gather_cost=0.0, slice_cost=0.0, unit_cost=0.0,
                         pipeline=False)
    _assert_same(self, tu.forward(model, images), runner(images))
    modes = {u['dense'] for u in runner.last_units if 'dense' in u}
    self.assertEqual(modes, {True, False})
    # Dense units with a head ran in the device loop, which handed over to
    # the host's rows when those paid again.
    self.assertIn('dense_loop', runner.trace_counts)

  def test_nothing_halts_runs_units_in_one_device_loop(self):
    """No early halting: units 2..L-1 of each block in one dense loop, the
    last one by itself, as the dense model's block (no round trip per
    unit)."""
    model, images = _model('cifar')
    _set_biases(model, [-16.0, -16.0])
    dense = tu.forward(model, images)
    timings = {}
    runner = _runner_for(model, sact_mode='auto', device_flops=0)
    _assert_same(self, dense, runner(images, timings=timings))
    units = [u for u in runner.last_units if 'dense' in u]
    self.assertTrue(units and all(u['dense'] for u in units))
    self.assertEqual(runner.trace_counts['dense_loop'], 2)  # One per block.
    self.assertNotIn('stage_dilated', timings)
    json.dumps(runner.last_units)  # Plain Python numbers, for benchmarks.

  def test_host_and_device_block_waste_add_up_beyond_int32(self):
    """A host block's waste (Python int, past int32 at ImageNet batch 32)
    plus a later device loop's (an array) in one call."""
    model, images = _model('cifar')
    # Block 1 halts half its positions (rows), block 2 none: with `adapt`
    # the second call runs block 2 as a device loop after block 1's host.
    _set_biases(model, [_regime_biases('cifar', 0.5)[0], -16.0])
    runner = _runner_for(model, sact_mode='auto', device_flops=0,
                         gather_cost=0.0, slice_cost=0.0, unit_cost=0.0,
                         pipeline=False, buckets=4)
    runner(images)
    with mock.patch('sact_jax.sparse.options.CostModel.waste',
                    return_value=2**40):
      timings = {}
      _, aux = runner(images, timings=timings)
    self.assertIn('block_device_loop', timings)
    self.assertIn('stage_dilated', timings)
    self.assertGreaterEqual(float(aux['flops_overhead']), 2**40)
    # Each block's whole time too, which holds its phases (and its host
    # work between them).
    blocks = {k: v for k, v in timings.items()
              if k.startswith(sparse.BLOCK_TIMINGS)}
    self.assertEqual(set(blocks), {f'{sparse.BLOCK_TIMINGS}{k}'
                                   for k in range(len(model.blocks))})
    phases = sum(v for k, v in timings.items()
                 if k not in blocks and k not in ('stem', 'head'))
    self.assertGreaterEqual(sum(blocks.values()), phases)

  def test_adapt_moves_all_dense_blocks_to_the_device_and_back(self):
    """`adapt`: a call whose units all ran densely makes the next one a
    device loop per block (here the whole model, one program), one where
    no position halted the dense model itself; FLOPs beyond the count
    there, or device loops whose units would pay at rows, send the next
    call back. Outputs stay the dense model's throughout."""
    model, images = _model('cifar')
    # Rows cost no more than their FLOPs (as in
    # test_dense_units_inside_a_sparse_block), so that the halting regime
    # below runs units at rows; buckets=3 keeps this runner to this test.
    runner = _runner_for(model, sact_mode='auto', device_flops=0,
                         gather_cost=0.0, slice_cost=0.0, unit_cost=0.0,
                         pipeline=False, buckets=3)
    fixed = _runner_for(model, sact_mode='auto', device_flops=0,
                        gather_cost=0.0, slice_cost=0.0, unit_cost=0.0,
                        pipeline=False, buckets=3, adapt=False)

    def phases(runner):
      timings = {}
      _assert_same(self, tu.forward(model, images),
                   runner(images, timings=timings))
      return set(timings)

    _set_biases(model, [-16.0, -16.0])  # Nothing halts: every unit dense.
    self.assertIn('block_start', phases(runner))
    self.assertEqual(phases(runner), {'whole_model'})
    # No position halted there: the dense model itself, nothing beyond
    # the count.
    self.assertEqual(phases(runner), {'dense_model'})
    self.assertEqual(float(runner(images)[1]['flops_overhead']), 0.0)
    self.assertIn('block_start', phases(fixed))
    self.assertIn('block_start', phases(fixed))
    _set_biases(model, _regime_biases('cifar', 0.5))
    self.assertEqual(phases(runner), {'dense_model'})  # Learns from it:
    self.assertEqual(phases(runner), {'whole_model'})  # FLOPs beyond,
    self.assertIn('stage_dilated', phases(runner))  # then rows that pay.
    self.assertIn('stage_dilated', phases(runner))

  def test_adapt_hands_loops_that_ran_every_unit_to_the_dense_model(self):
    """`adapt` where every block is a device loop whatever halts (cheap
    units): a call in which each loop ran every unit (some position ran to
    the end, the halted ones were masked) did the dense model's work, so
    the next call is the dense model itself, with the same FLOPs beyond
    the count; a dense call in which a block's positions all halted early
    sends the next one back to the loops, which skip those units."""
    model, images = _model('cifar')
    runner = _runner_for(model, sact_mode='auto', device_flops=1e18,
                         buckets=5)
    _set_biases(model, _regime_biases('cifar', 0.5))
    dense = tu.forward(model, images)
    for units, block in zip(dense[1]['num_units'], model.blocks):
      self.assertEqual(int(np.max(units)), block.num_units)  # The regime:
      self.assertLess(int(np.min(units)), block.num_units)  # some halted.

    def call():
      timings = {}
      out = runner(images, timings=timings)
      _assert_same(self, dense, out)
      return set(timings), float(out[1]['flops_overhead'])

    phases, overhead = call()
    self.assertEqual(phases, {'whole_model'})
    self.assertGreater(overhead, 0.0)  # The halted positions, masked.
    for _ in range(2):
      phases, dense_overhead = call()
      self.assertEqual(phases, {'dense_model'})
      np.testing.assert_allclose(dense_overhead, overhead, rtol=1e-4)
    _set_biases(model, [16.0, 16.0])  # Every position halts at once.
    dense = tu.forward(model, images)
    self.assertEqual(call()[0], {'dense_model'})  # Learns from it:
    self.assertEqual(call()[0], {'whole_model'})
    self.assertEqual(call()[0], {'whole_model'})  # Units skipped there.

  def test_device_loop_nothing_halts_computes_nothing_beyond_the_count(self):
    """The device loop runs every unit and head once, none dropped."""
    model, images = _model('cifar')
    _set_biases(model, [-16.0, -16.0])
    runner = _runner_for(model, sact_mode='device')
    _, aux = runner(images)
    self.assertEqual([int(u['steps']) for u in runner.last_units], [3, 3])
    self.assertEqual(float(aux['flops_overhead']), 0.0)

  @parameterized.parameters('rows', 'device')
  def test_all_halted_skips_units(self, mode):
    """Every position halts at the first head: units 2..L never run, yet
    the skipped heads' global convs count, as in the reference."""
    model, images = _model('cifar')
    _set_biases(model, [16.0, 16.0])
    dense = tu.forward(model, images)
    for units in dense[1]['num_units']:
      np.testing.assert_array_equal(np.asarray(units), 1)
    runner = _runner_for(model, sact_mode=mode)
    _assert_same(self, dense, runner(images))
    if mode == 'rows':
      self.assertEqual(runner.last_units, [{'units_skipped': 3}] * 2)
    else:
      self.assertEqual([int(u['steps']) for u in runner.last_units], [0, 0])

  def test_tiny_capacity_falls_back_to_chunk_loop(self):
    """Rows beyond a (tiny) chunk are looped over, never dropped."""
    model, images, _ = _random_sact('cifar', 0.5)
    runner = _runner_for(model, sact_mode='rows', chunk_rows=3, buckets=2,
                         pipeline=False)
    _assert_same(self, tu.forward(model, images), runner(images))
    units = [u for u in runner.last_units if 'active' in u]
    self.assertTrue(any(u['chunks_active'] > 10 for u in units))
    self.assertTrue(all(u['tail_active'] <= 3 and u['tail_dilated'] <= 3
                        for u in units))
    self.assertTrue(all(u['planned_active'] == u['active'] for u in units))

  def test_bounded_compilations_over_varied_inputs(self):
    """Six inputs with different masks: few traces, none when repeated."""
    model, _, _ = _random_sact('cifar', 0.5)
    runner = _runner_for(model, sact_mode='rows')
    buckets = runner.options.buckets
    # Seed 11's and 17's halting lands on the threshold (checked below).
    inputs = [tu.images((1, 23, 29, 3), seed=seed)
              for seed in (10, 12, 13, 14, 15, 16)]
    active = set()
    calls = 0
    for images in inputs:
      tu.assert_halting_margin(_forward, model, images)  # Exact counts.
      _assert_same(self, tu.forward(model, images), runner(images))
      units = [u for u in runner.last_units if 'active' in u]
      active.update(u['active'] for u in units)
      calls += 2 * len(units)
    traces = dict(runner.trace_counts)
    self.assertGreater(len(active), 8)  # The masks really differ.
    # Per block and stage: at most buckets + 1 tails, each with or without
    # the head's taps (dilated); with no head, the head at rows or on the
    # map (active).
    blocks = len(model.blocks)
    self.assertLessEqual(traces['stage_dilated'], blocks * 2 * (buckets + 1))
    self.assertLessEqual(traces['stage_active'], blocks * 3 * (buckets + 1))
    self.assertLess(traces['stage_dilated'] + traces['stage_active'],
                    calls)
    for key in ('stem', 'head'):
      self.assertEqual(traces[key], 1)
    self.assertEqual(traces['block_start'], blocks)
    for images in inputs:
      runner(images)
    self.assertEqual(dict(runner.trace_counts), traces)


def _assert_close(test, dense, sparse_out):
  """Sparse outputs near the dense model's when matmuls may round (TF32).

  At the default precision a GPU may run float32 matmuls and convs in TF32
  (10-bit mantissa): dense and sparse round differently (other gathers,
  other accumulation orders), so the outputs differ by about 1e-3 of their
  scale, and a position whose halting score lies within that of the
  threshold may halt one unit earlier or later. Perturbing the weights by
  1e-3 (relative) on the CPU, as a stand-in, moves logits by 2e-3 of their
  scale and flips 0.3-0.6% of the positions; the bounds below leave 3-10x
  room. Every flipped position changes one unit of one position, so FLOPs
  and the ponder loss move by about the flipped fraction.
  """
  (logits, aux), (s_logits, s_aux) = dense, sparse_out
  test.assertEqual(set(s_aux), set(aux) | {'flops_overhead'})
  scale = float(jnp.max(jnp.abs(logits)))
  test.assertLess(float(jnp.max(jnp.abs(s_logits - logits))) / scale, 2e-2)
  test.assertLen(s_aux['num_units'], len(aux['num_units']))
  flipped = total = 0
  for n, s_n, p, s_p in zip(aux['num_units'], s_aux['num_units'],
                            aux['ponder_cost'], s_aux['ponder_cost']):
    n, s_n, p, s_p = map(np.asarray, (n, s_n, p, s_p))
    same = n == s_n
    flipped += int(np.sum(~same))
    total += n.size
    # Where halting agrees, the remainders differ by rounding only.
    np.testing.assert_allclose(s_p[same], p[same], rtol=0, atol=1e-2)
  # At most 1% of all positions (of every block together) halt elsewhere.
  test.assertLessEqual(flipped, 0.01 * total)
  np.testing.assert_allclose(np.asarray(s_aux['flops']),
                             np.asarray(aux['flops']), rtol=1e-2)
  np.testing.assert_allclose(float(s_aux['ponder_loss']),
                             float(aux['ponder_loss']), rtol=1e-2)


class DefaultPrecisionTest(parameterized.TestCase):
  """Equivalence at the backend's default matmul precision: what users run.

  The rest of the suite runs at 'highest' (tests/conftest.py), where dense
  and sparse must agree exactly on halting.
  """

  @parameterized.parameters('rows', 'auto')
  def test_matches_dense_model(self, sact_mode):
    model, images, _ = _random_sact('cifar', 0.5)
    with jax.default_matmul_precision('default'):
      dense = tu.forward(model, images)
      # A fresh runner: everything it derives from the weights is computed
      # at this precision too.
      out = _runner(model, sact_mode=sact_mode, buckets=2)(images)
    _assert_close(self, dense, out)
    if jax.default_backend() == 'cpu':
      # XLA:CPU computes float32 matmuls in float32 at every precision.
      _assert_same(self, dense, out)


class ActTest(parameterized.TestCase):
  """ACT early stopping: units after every image has halted are skipped."""

  @parameterized.parameters('host', 'device')
  def test_skips_units_once_all_halted(self, act_loop):
    model = tu.build('cifar', (4, 4), 'act', seed=5, base_channels=8)
    model.eval()
    halt_now, never = 10.0, -10.0
    for head, bias in zip(tu.heads(model), (halt_now, never)):
      head.global_conv.bias[...] = jnp.full(head.global_conv.bias.shape,
                                            bias)
    images = tu.images((3, 16, 16, 3), seed=6)
    dense = tu.forward(model, images)
    np.testing.assert_array_equal(np.asarray(dense[1]['num_units'][0]), 1)
    np.testing.assert_array_equal(np.asarray(dense[1]['num_units'][1]), 4)
    runner = _runner(model, act_loop=act_loop)
    out = runner(images)
    _assert_same(self, dense, out)
    # All images run in lockstep here, so nothing is wasted.
    self.assertEqual(float(out[1]['flops_overhead']), 0.0)
    if act_loop == 'host':
      self.assertEqual(runner.last_units,
                       [{'units_skipped': 3}, {'unit': 2}, {'unit': 3},
                        {'unit': 4}])
    self.assertEqual(runner.trace_counts['act_unit'],
                     2 if act_loop == 'host' else 0)
    # The device loops run as one program for the whole model.
    self.assertEqual(runner.trace_counts['whole_model'],
                     0 if act_loop == 'host' else 1)
    timings = {}
    runner(images, timings=timings)
    self.assertEqual(set(timings) == {'whole_model'}, act_loop == 'device')


class ApiTest(absltest.TestCase):

  def test_apply_caches_runner_and_follows_weight_changes(self):
    model, images, _ = _random_sact('cifar', 0.5)
    opts = {'sact_mode': 'rows', 'compiler_options': _FAST, 'buckets': 2}
    self.assertIs(sparse.runner_for(model, **opts),
                  sparse.runner_for(model, **opts))
    _assert_same(self, tu.forward(model, images),
                 sparse.apply(model, images, **opts))
    kernel = model.blocks[1].steps.unit.conv2.kernel
    old = kernel.get_value()
    try:
      kernel.set_value(old * 1.25)  # x1.5 lands near the threshold.
      tu.assert_halting_margin(_forward, model, images)  # Exact counts.
      _assert_same(self, tu.forward(model, images),
                   sparse.apply(model, images, **opts))
    finally:
      kernel.set_value(old)

  def test_device_flops_default_follows_backend(self):
    """'auto' runs every block in one device loop off the CPU."""
    model, images, _ = _random_sact('cifar', 0.5)
    expected = 50e6 if jax.default_backend() == 'cpu' else float('inf')
    self.assertEqual(sparse.SparseRunner(model).device_flops, expected)
    with mock.patch.object(jax, 'default_backend', return_value='cpu'):
      self.assertEqual(sparse.SparseRunner(model).device_flops, 50e6)
    self.assertEqual(sparse.SparseRunner(model, device_flops=7.0)
                     .device_flops, 7.0)
    with mock.patch.object(jax, 'default_backend', return_value='gpu'):
      runner = sparse.SparseRunner(model, compiler_options=_FAST,
                                   buckets=2)
    self.assertEqual(runner.device_flops, float('inf'))
    _assert_same(self, tu.forward(model, images), runner(images))
    self.assertTrue(all('steps' in u for u in runner.last_units))

  def test_errors(self):
    model, images, _ = _random_sact('cifar', 0.5)
    with self.assertRaisesRegex(ValueError, 'NHWC'):
      sparse.apply(model, images[..., 0])
    with self.assertRaisesRegex(ValueError, 'no empty dimension'):
      sparse.apply(model, images[:0])
    with self.assertRaisesRegex(TypeError, 'images have dtype uint8'):
      sparse.apply(model, images.astype(jnp.uint8))
    with self.assertRaisesRegex(ValueError, 'sact_mode'):
      sparse.SparseOptions(sact_mode='tiles')
    with self.assertRaisesRegex(ValueError, 'dense_head'):
      sparse.SparseOptions(dense_head=-1.0)
    for bad in (dict(pipeline=-1), dict(pipeline=2.0),
                dict(device_flops=-1.0), dict(buckets=2.5),
                dict(chunk_bytes=0), dict(chunk_rows=True),
                dict(compiler_options=('xla_opt',))):
      with self.assertRaisesRegex(ValueError, list(bad)[0]):
        sparse.SparseOptions(**bad)
    with self.assertRaisesRegex(TypeError,
                                "adapt must be True or False, got 'no'"):
      sparse.SparseOptions(adapt='no')
    for bad in (dict(gather_cost='60'), dict(pipeline='0.1'),
                dict(dense_head=None), dict(device_rows_floats='1')):
      with self.assertRaisesRegex(TypeError,
                                  f'{list(bad)[0]} must be a number, got '):
        sparse.SparseOptions(**bad)
    options = sparse.SparseOptions(sact_mode='dense')
    self.assertIs(sparse.runner_for(model, options=options).options, options)
    with self.assertRaisesRegex(ValueError, 'either options or keyword'):
      sparse.apply(model, images, options=options, buckets=2)
    with self.assertRaisesRegex(TypeError, 'options must be a SparseOptions'):
      sparse.apply(model, images, options={'sact_mode': 'dense'})
    self.assertEqual(  # Lists and dicts become hashable pairs.
        sparse.SparseOptions(compiler_options=[['a', 1]]).compiler_options,
        sparse.SparseOptions(compiler_options={'a': 1}).compiler_options)
    train_model = tu.build('cifar', (2,), 'sact', seed=0, base_channels=8)
    train_model.train()
    with self.assertRaisesRegex(ValueError, 'eval mode'):
      sparse.apply(train_model, images)
    # A runner that already ran the model in eval mode checks again:
    # `train()` changes no weights, so its cached weights still look current.
    sparse.apply(model, images)
    model.train()
    with self.assertRaisesRegex(ValueError, 'eval mode'):
      sparse.apply(model, images)
    model.eval()
    _assert_same(self, sparse.apply(model, images),  # The same runner.
                 sparse.apply(model, images, options=sparse.SparseOptions()))


class RowsTest(parameterized.TestCase):
  """The row primitives against dense references."""

  @parameterized.product(kernel=(1, 3), pre=(False, True))
  def test_patches_conv_matches_dense_conv(self, kernel, pre):
    """Gathered patches and `layers.patch_conv` give the dense conv."""
    rng = np.random.default_rng(0)
    batch, height, width, cin, cout = 2, 5, 7, 3, 4
    num_rows = batch * height * width
    x = jnp.asarray(rng.normal(size=(batch, height, width, cin)),
                    jnp.float32)
    conv = nnx.Conv(cin, cout, (kernel, kernel), padding='SAME',
                    rngs=nnx.Rngs(0))
    fn = (lambda v: jnp.maximum(2.0 * v + 1.0, 0.0)) if pre else (
        lambda v: v)
    dense = conv(fn(x)).reshape(num_rows, cout)
    src = x.reshape(num_rows, cin)
    if not pre:  # The padding value lives in an extra zero row.
      src = jnp.concatenate([src, jnp.zeros((1, cin))])
    idx = jnp.asarray([0, 6, 7, 34, 35, 69, num_rows + 1], jnp.int32)
    patches, valid = rows_lib.patches(src, idx, kernel, height=height,
                                      width=width, num_rows=num_rows)
    if pre:  # Padding applies after the pre-activation.
      patches = jnp.where(valid[..., None], fn(patches), 0.0)
    got = layers.patch_conv(conv, patches)
    np.testing.assert_allclose(got[:-1], dense[idx[:-1]], atol=1e-5)

  @parameterized.parameters((False, 1, 3, 1), (True, 1, 3, 1),
                            (True, 3, 3, 1), (False, 2, 3, 1),
                            (True, 2, 600, 16))
  def test_window_copies_match_xla_gather(self, zero_row, batch, channels,
                                          repeats):
    """`onednn.row_patches`, where `patches` uses it, copies what XLA's
    gather reads: corners, edges, padding indices, with and without the
    map's zero row (clipped reads), over several images; the last case
    copies 2.8 MB, which row_gather.cc splits in two parts (one on XLA's
    thread pool) where there are two CPUs."""
    if not rows_lib._copies_rows(jnp.zeros((1, 1), jnp.float32)):
      self.skipTest('no custom calls here (not built or not the CPU)')
    height, width = 4, 5
    num_rows = batch * height * width
    rng = np.random.default_rng(batch)
    src = jnp.asarray(rng.normal(size=(num_rows + zero_row, channels)),
                      jnp.float32)
    idx = jnp.tile(jnp.asarray([0, 4, 6, 15, 19, num_rows - 1, num_rows,
                                num_rows + 1], jnp.int32), repeats)
    def patches(src, idx):  # A new function per trace: jit caches traces.
      return rows_lib.patches(src, idx, 3, height=height, width=width,
                              num_rows=num_rows)
    got, got_valid = jax.jit(patches)(src, idx)
    self.assertIn('SactRowPatches3x3',
                  jax.jit(patches).lower(src, idx).as_text())
    with onednn.disabled():
      xla_patches = lambda *args: patches(*args)
      want, want_valid = jax.jit(xla_patches)(src, idx)
      self.assertNotIn('SactRowPatches3x3',
                       jax.jit(xla_patches).lower(src, idx).as_text())
    chex.assert_shape(got, (idx.shape[0], 9, channels))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_valid, want_valid)

  @parameterized.product(head=(None, 'affine', 'leaky'),
                         update_x=(True, False), size=('small', 'threads'))
  def test_update_rows_matches_scatters(self, head, update_x, size):
    """`update_rows` (row_gather.cc where built) gives what XLA's scatters
    give: the maps exactly, the head's taps up to rounding (a different
    summation order), padding indices changing nothing; at 'threads' size
    the rows carry 2.4 MB, split by channels in two parts (one on XLA's
    thread pool) where there are two CPUs."""
    if not rows_lib.custom_calls():
      self.skipTest('no custom calls here (not built or not the CPU)')
    batch, hw, channels, count = ((2, 12, 5, 7) if size == 'small'
                                  else (4, 300, 600, 1000))
    num_rows = batch * hw
    rng = np.random.default_rng(count)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    maps = (normal(num_rows, channels), normal(num_rows, channels),
            normal(batch, channels), normal(num_rows + 1, 9))
    # The first and last rows, others at random, two padding indices.
    inner = rng.choice(np.arange(1, num_rows - 1), count - 4, replace=False)
    idx = jnp.asarray(np.concatenate([
        np.sort(np.concatenate([[0, num_rows - 1], inner])),
        [num_rows + 1] * 2]), jnp.int32)
    residual, weight = normal(count, channels), normal(count)
    if head is not None:
      activation = layers.identity if head == 'affine' else layers.leaky_relu
      head = tu.sact_head(channels, activation, fast_conv=True)
      head.eval()
      self.assertEqual(head.taps_affine() is not None, activation
                       is layers.identity)
    def update(*args):
      return rows_lib.update_rows(*args, hw=hw, update_x=update_x, head=head)
    args = (*maps, idx, residual, weight)
    got = jax.jit(update)(*args)
    self.assertIn('SactUpdateRows', jax.jit(update).lower(*args).as_text())
    with onednn.disabled():
      xla_update = lambda *args: update(*args)
      want = jax.jit(xla_update)(*args)
      self.assertNotIn('SactUpdateRows',
                       jax.jit(xla_update).lower(*args).as_text())
    for name, g, w in zip(('x', 'out', 'xsum'), got[:3], want[:3]):
      np.testing.assert_array_equal(g, w, err_msg=name)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-5, atol=1e-4)
    if not update_x or head is None:
      np.testing.assert_array_equal(got[3], maps[3])
    if not update_x:
      np.testing.assert_array_equal(got[0], maps[0])
      np.testing.assert_array_equal(got[2], maps[2])
    else:  # Every row of the index set changed (the check is not vacuous).
      changed = np.any(np.asarray(got[0] != maps[0]), axis=1)
      np.testing.assert_array_equal(np.flatnonzero(changed),
                                    np.unique(idx[idx < num_rows]))

  @parameterized.product(update=('maps', 'maps+bias', 'out_is_x',
                                 'out_is_x+bias', 'plain+bias', 'none'),
                         size=('small', 'threads'))
  def test_update_dense_matches_xla(self, update, size):
    """`update_dense` gives the dense path's masked residual and output sum
    exactly, the per-image sums of the new map and the head's taps at every
    position up to rounding; halted positions (weight 0) keep `x` and
    `out`. With `out` None (`out_is_x`) the output sum starts from `x`
    itself; with no weight (`plain`) every position adds the residual and
    there is no `out`; with no residual (`none`) only the sums and taps of
    `x`. With a bias, the residual is `residual + bias`, the sum XLA makes.
    At 'threads' size the maps carry over 2 MB, split by images in two
    parts (one on XLA's thread pool) where there are two CPUs; batch 1
    splits one image's rows."""
    if not rows_lib.custom_calls():
      self.skipTest('no custom calls here (not built or not the CPU)')
    update, bias = update.split('+')[0], update.endswith('+bias')
    shape = (3, 4, 5, 7) if size == 'small' else (1, 48, 40, 320)
    channels = shape[-1]
    rng = np.random.default_rng(channels)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    x, out, residual = normal(*shape), normal(*shape), normal(*shape)
    bias_C = normal(channels) if bias else None
    running = rng.random(shape[:3]) < 0.7
    if update == 'plain':
      running = np.ones(shape[:3], bool)
    weight = jnp.asarray(np.where(running, rng.uniform(0.1, 1.0, shape[:3]),
                                  0.0), jnp.float32)
    head = tu.sact_head(channels, layers.identity, fast_conv=True)
    head.eval()
    self.assertTrue(rows_lib.fuses_dense(head, jnp.float32))
    def fn(x, out, residual, weight):
      if update == 'none':
        return rows_lib.update_dense(x, None, None, None, head=head)
      if update == 'plain':
        return rows_lib.update_dense(x, None, residual, None, head=head,
                                     bias_C=bias_C)
      if update == 'out_is_x':
        return rows_lib.update_dense(x, None, residual, weight, head=head,
                                     bias_C=bias_C)
      return rows_lib.update_dense(x, out, residual, weight, head=head,
                                   bias_C=bias_C)
    args = (x, out, residual, weight)
    self.assertIn('SactUpdateDense', jax.jit(fn).lower(*args).as_text())
    new_x, new_out, xsum, taps = jax.jit(fn)(*args)
    if bias:
      residual = residual + bias_C
    mask = jnp.asarray(running, jnp.float32)[..., None]
    want_x = x if update == 'none' else x + mask * residual
    np.testing.assert_array_equal(new_x, want_x)
    if update in ('none', 'plain'):
      self.assertIsNone(new_out)
    else:
      old_out = x if update == 'out_is_x' else out
      chex.assert_shape(new_out, shape)
      np.testing.assert_allclose(new_out,
                                 old_out + weight[..., None] * residual,
                                 rtol=1e-6, atol=1e-6)
      halted = ~running
      np.testing.assert_array_equal(np.asarray(new_out)[halted],
                                    np.asarray(old_out)[halted])
    if update != 'none':
      self.assertTrue(np.all(np.any(np.asarray(new_x != x), -1)[running]))
    chex.assert_shape((xsum, taps), ((shape[0], channels), (*shape[:3], 9)))
    np.testing.assert_allclose(xsum, jnp.sum(want_x, axis=(1, 2)),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(
        taps, head.local_taps(want_x.reshape(-1, channels)).reshape(taps.shape),
        rtol=1e-5, atol=1e-4)

  def test_residual_and_bias_add_up_to_the_residual(self):
    """A bottleneck unit's residual less conv3's bias, plus that bias, is
    its residual exactly (the same conv, the same addition); a unit whose
    last conv has no bias gives its residual whole."""
    unit = _bottleneck(16, 8)
    x = tu.images((2, 5, 6, 16), seed=3)
    residual, bias = unit.residual_and_bias(x)
    chex.assert_shape((residual, bias), ((2, 5, 6, 16), (16,)))
    np.testing.assert_array_equal(bias, unit.conv3.bias[...])
    np.testing.assert_array_equal(residual + bias, unit.residual(x))
    self.assertFalse(np.allclose(residual, unit.residual(x)))
    self.assertTrue(unit.conv3.use_bias)  # The unit is left as it was.
    cifar = units_lib.CifarUnit(
        16, 16, factory=layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3),
        rngs=nnx.Rngs(0))
    cifar.eval()
    whole, none = cifar.residual_and_bias(x)
    self.assertIsNone(none)
    np.testing.assert_array_equal(whole, cifar.residual(x))

  @parameterized.parameters((16, 1), (32, 1), (32, 2), (16, 2))
  def test_split_output_adds_up_to_the_unit(self, depth, stride):
    """A bottleneck unit's output is its shortcut plus its residual plus
    the last convs' biases, up to rounding: with a projection shortcut
    (depth 32), strided or not, and an identity one (depth 16); the
    biases are the shortcut's and conv3's. A CIFAR unit does not split."""
    factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3,
                                  fast_conv_backward=True)
    unit = units_lib.BottleneckUnit(16, depth, 8, stride=stride,
                                    factory=factory, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(depth + stride)
    for bn in (unit.preact, unit.conv1_bn, unit.conv2_bn):
      tu.randomize_batch_norm(bn, rng)
    convs = [unit.conv3] + ([unit.shortcut] if unit.shortcut else [])
    for conv in convs:
      conv.bias[...] = jnp.asarray(rng.normal(size=depth), jnp.float32)
    unit.eval()
    x = tu.images((2, 6, 8, 16), seed=4)
    shortcut, residual, bias = unit.split_output(x)
    want = unit(x)
    chex.assert_equal_shape((shortcut, residual, want))
    np.testing.assert_allclose(bias, sum(c.bias[...] for c in convs),
                               rtol=1e-6)
    np.testing.assert_allclose(shortcut + residual + bias, want, rtol=1e-5,
                               atol=1e-5)
    if unit.shortcut is None:
      np.testing.assert_array_equal(shortcut, x[:, ::stride, ::stride])
    cifar = units_lib.CifarUnit(
        16, 16, factory=layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3),
        rngs=nnx.Rngs(0))
    cifar.eval()
    whole, none, no_bias = cifar.split_output(x)
    self.assertIsNone(none)
    self.assertIsNone(no_bias)
    np.testing.assert_array_equal(whole, cifar(x))

  @parameterized.parameters((5, 7), (600, 1000))
  def test_row_taps_match_xla(self, channels, count):
    """`row_taps` where the head's taps are affine: the rows of the index
    set get `local_taps` of `x`'s rows, up to rounding; other rows and
    padding indices keep what they held."""
    if not rows_lib.custom_calls():
      self.skipTest('no custom calls here (not built or not the CPU)')
    num_rows = 2 * count
    rng = np.random.default_rng(channels)
    x = jnp.asarray(rng.normal(size=(num_rows, channels)), jnp.float32)
    taps = jnp.asarray(rng.normal(size=(num_rows + 1, 9)), jnp.float32)
    idx = jnp.asarray(np.concatenate([
        np.sort(rng.choice(num_rows, count - 1, replace=False)),
        [num_rows + 1]]), jnp.int32)
    head = tu.sact_head(channels, layers.identity, fast_conv=True)
    head.eval()
    fn = lambda *args: rows_lib.row_taps(*args, head)
    got = jax.jit(fn)(taps, x, idx)
    self.assertIn('SactRowTaps', jax.jit(fn).lower(taps, x, idx).as_text())
    with onednn.disabled():
      want = jax.jit(lambda *args: fn(*args))(taps, x, idx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    inside = np.asarray(idx[idx < num_rows])
    np.testing.assert_allclose(got[inside], head.local_taps(x[inside]),
                               rtol=1e-5, atol=1e-4)
    kept = np.setdiff1d(np.arange(num_rows + 1), inside)
    np.testing.assert_array_equal(got[kept], taps[kept])

  @parameterized.parameters(True, False)
  def test_indices_match_nonzero(self, custom_calls):
    """Both formulations: the CPU's custom call (where built) and XLA's."""
    if custom_calls and not rows_lib.custom_calls():
      self.skipTest('no custom calls here (not built or not the CPU)')
    rng = np.random.default_rng(1)
    with contextlib.ExitStack() as stack:
      if not custom_calls:
        stack.enter_context(onednn.disabled())
      for num_rows in (1, 5, 128, 300):
        mask = jnp.asarray(rng.random(num_rows) < 0.4, jnp.float32)
        mask = mask.at[0].set(-1.0)  # Only positive entries count.
        expected = jnp.nonzero(mask > 0, size=num_rows + 7,
                               fill_value=num_rows + 1)[0]
        fn = lambda m: rows_lib.indices(m, num_rows + 7, block=16)
        got = jax.jit(fn)(mask)
        self.assertEqual('SactNonzeroRows' in jax.jit(fn).lower(mask).as_text(),
                         custom_calls)
        np.testing.assert_array_equal(got, expected)

  def test_plans_cover_every_count_without_clamping(self):
    for num_rows in (1, 7, 50):
      for chunk in (1, 3, 16):
        for buckets in (1, 4):
          granule = rows_lib.granule_for(num_rows, chunk, buckets)
          tails = set()
          for count in range(num_rows + 1):
            plan = rows_lib.plan_rows(count, chunk, granule)
            covered = plan.n_full * chunk + plan.tail
            self.assertGreaterEqual(covered, count)
            self.assertLess(plan.padding, granule)
            self.assertLessEqual(plan.tail, chunk)
            self.assertLessEqual(covered,
                                 rows_lib.padded_length(num_rows, chunk))
            tails.add(plan.tail)
          self.assertLessEqual(len(tails), buckets + 1)

  def test_head_at_rows_matches_module(self):
    model, _, _ = _random_sact('imagenet', 0.5)
    graphdef, state = nnx.split(model.blocks[0].steps.head)
    head = nnx.merge(graphdef, jax.tree.map(lambda a: a[0],
                                            nnx.to_pure_dict(state)))
    x = tu.images((2, 6, 5, head.local_bn.num_features), seed=9)
    num_rows = 2 * 6 * 5
    taps = jnp.concatenate([head.local_taps(x.reshape(num_rows, -1)),
                            jnp.zeros((1, 9), x.dtype)])
    # Rows at corners, edges and the inside of both images.
    idx = jnp.array([0, 4, 7, 29, 30, 33, 59], jnp.int32)
    local = stages.head_local(head, taps, idx, height=6, width=5)
    np.testing.assert_allclose(
        local, head.local_logits(x).reshape(-1)[idx], rtol=1e-5, atol=1e-5)

  @parameterized.parameters('cifar', 'imagenet')
  def test_dilated_stage_matches_unit(self, family):
    """`dilated_stage` on `dilated_source` (pre-activated once for a 3x3
    conv1) gives conv2's input of the dense unit, at border, inside and
    padding rows."""
    model, _, _ = _random_sact(family, 0.5)
    graphdef, state = nnx.split(model.blocks[0].steps.unit)
    unit = nnx.merge(graphdef, jax.tree.map(lambda a: a[1],
                                            nnx.to_pure_dict(state)))
    self.assertEqual(unit.dilated_kernel_size, 3 if family == 'cifar' else 1)
    batch, height, width = 2, 6, 5
    num_rows = batch * height * width
    x = tu.images((batch, height, width, unit.cin), seed=4)
    expected = unit.post_conv1(unit.conv1(unit.preactivation(x)))
    idx = jnp.array([0, 4, 7, 29, 30, 33, 59, num_rows + 1], jnp.int32)
    got = stages.dilated_stage(
        unit, stages.dilated_source(unit, x.reshape(num_rows, -1)), idx,
        height=height, width=width, num_rows=num_rows)
    np.testing.assert_allclose(
        got[:-1], expected.reshape(num_rows, -1)[idx[:-1]], rtol=1e-5,
        atol=1e-5)


def _bottleneck(channels: int, bottleneck: int, seed: int = 0
                ) -> units_lib.BottleneckUnit:
  """An ImageNet unit in evaluation, with random BatchNorm statistics and
  a bias on conv3."""
  factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3,
                                fast_conv_backward=True)
  unit = units_lib.BottleneckUnit(channels, channels, bottleneck,
                                  factory=factory, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for bn in (unit.preact, unit.conv1_bn, unit.conv2_bn):
    tu.randomize_batch_norm(bn, rng)
  unit.conv3.bias[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
  unit.eval()
  return unit


def _rows(rng, num_rows: int, count: int, length: int) -> jax.Array:
  """`count` sorted rows (the first and last among them), padded with
  `num_rows + 1` to `length`, as `rows.indices` gives them."""
  inner = rng.choice(np.arange(1, num_rows - 1), count - 2, replace=False)
  rows = np.sort(np.concatenate([[0, num_rows - 1], inner]))
  return jnp.asarray(np.concatenate(
      [rows, [num_rows + 1] * (length - count)]), jnp.int32)


class RowStagesTest(parameterized.TestCase):
  """A bottleneck unit's stages as one custom call each (row_stages.cc)
  against the chunked XLA path they replace."""

  def setUp(self):
    super().setUp()
    if not rows_lib.custom_calls():
      self.skipTest('no custom calls here (not built or not the CPU)')
    # The test maps are small: fused at any size.
    self.enter_context(mock.patch.object(stages, 'FUSED_MIN_ROWS', 0))

  def test_fused_only_for_bottleneck_units_with_custom_calls(self):
    self.assertTrue(stages.fusable(_bottleneck(8, 4)))
    self.assertTrue(stages.runs_fused(jnp.float32, 6))
    with mock.patch.object(stages, 'FUSED_MIN_ROWS', 7):  # Too few rows.
      self.assertFalse(stages.runs_fused(jnp.float32, 6))
      self.assertTrue(stages.runs_fused(jnp.float32, 7))
    with onednn.disabled():
      self.assertFalse(stages.runs_fused(jnp.float32, 6))
    model, _, _ = _random_sact('cifar', 0.5)
    graphdef, state = nnx.split(model.blocks[0].steps.unit)
    cifar_unit = nnx.merge(graphdef, jax.tree.map(lambda a: a[1],
                                                  nnx.to_pure_dict(state)))
    self.assertFalse(stages.fusable(cifar_unit))

  def test_a_head_whose_taps_are_not_affine_is_refused(self):
    head = tu.sact_head(16, layers.leaky_relu, fast_conv=True)
    head.eval()
    self.assertIsNone(head.taps_affine())
    num_rows = 2 * 4 * 5
    maps = (jnp.zeros((num_rows, 16)), jnp.zeros((num_rows, 16)),
            jnp.zeros((2, 16)), jnp.zeros((num_rows + 1, 9)))
    with self.assertRaisesRegex(ValueError, 'taps are affine'):
      stages.fused_active(
          _bottleneck(16, 8), jnp.zeros((num_rows + 1, 8)),
          jnp.arange(4, dtype=jnp.int32), jnp.zeros(num_rows), maps,
          height=4, width=5, update_x=True, head=head)

  @parameterized.product(head=(None, 'affine'), update_x=(True, False),
                         size=('small', 'threads'))
  def test_stages_match_the_chunked_path(self, head, update_x, size):
    """Both stages at every row of an index set: `y` at the dilated rows,
    then `x`, `out`, the per-image sums and the head's taps at the active
    rows, as the XLA path computes them (up to rounding: BatchNorm folded,
    other summation orders), rows outside the sets and padding indices
    changing nothing. At 'threads' size the rows span several tiles and
    images, taken by two threads where there are two CPUs."""
    batch, height, width, channels, bottleneck, dilated, active = (
        (2, 5, 6, 16, 8, 40, 25) if size == 'small'
        else (3, 16, 15, 256, 128, 600, 420))
    num_rows, hw = batch * height * width, height * width
    unit = _bottleneck(channels, bottleneck, seed=size == 'threads')
    rng = np.random.default_rng(channels)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    x, out = normal(num_rows, channels), normal(num_rows, channels)
    xsum, taps = normal(batch, channels), normal(num_rows + 1, 9)
    y = jnp.concatenate([normal(num_rows, bottleneck),
                         jnp.zeros((1, bottleneck))])
    cumulative = jnp.asarray(rng.uniform(0.0, 0.9, num_rows), jnp.float32)
    idx_dilated = _rows(rng, num_rows, dilated, dilated + 5)
    idx_active = _rows(rng, num_rows, active, active + 3)
    if head is not None:
      head = tu.sact_head(channels, layers.identity, fast_conv=True)
      head.eval()
    maps = (x, out, xsum, taps)

    def fused(y, *maps):
      if head is None:
        y = stages.fused_dilated(unit, x, y, idx_dilated)
      else:  # With the head's taps at the dilated rows.
        y, taps = stages.fused_dilated(unit, x, y, idx_dilated, head,
                                       maps[3])
        maps = (*maps[:3], taps)
      return y, stages.fused_active(
          unit, y, idx_active, cumulative, maps, height=height, width=width,
          update_x=update_x, head=head)

    def chunked(y, *maps):
      y = rows_lib.scatter_set(y, idx_dilated, stages.dilated_stage(
          unit, x, idx_dilated, height=height, width=width,
          num_rows=num_rows))
      if head is not None:
        maps = (*maps[:3], rows_lib.row_taps(maps[3], x, idx_dilated, head))
      residual = stages.active_stage(unit, y, idx_active, height=height,
                                     width=width)
      weight = 1.0 - rows_lib.gather(cumulative, idx_active)
      return y, rows_lib.update_rows(*maps, idx_active, residual, weight,
                                     hw=hw, update_x=update_x, head=head)

    text = jax.jit(fused).lower(y, *maps).as_text()
    self.assertIn('SactDilatedRows', text)
    self.assertIn('SactActiveRows', text)
    got_y, got = jax.jit(fused)(y, *maps)
    with onednn.disabled():
      want_y, want = jax.jit(chunked)(y, *maps)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    dilated_rows = np.asarray(idx_dilated[:dilated])
    untouched = np.setdiff1d(np.arange(num_rows + 1), dilated_rows)
    np.testing.assert_array_equal(got_y[untouched], y[untouched])
    for name, g, w, before in zip(('x', 'out', 'xsum', 'taps'), got, want,
                                  maps):
      scale = float(jnp.max(jnp.abs(w)))
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale,
                                 err_msg=name)
      if name in ('x', 'out'):
        changed = np.flatnonzero(np.any(np.asarray(g != before), axis=1))
        if name == 'out' or update_x:
          np.testing.assert_array_equal(changed, idx_active[:active])
        else:
          self.assertEmpty(changed)
    if head is None:
      np.testing.assert_array_equal(got[3], taps)
    else:  # Taps change at the dilated rows (and with `update_x` the
      # active ones) only.
      written = (np.union1d(dilated_rows, idx_active[:active]) if update_x
                 else dilated_rows)
      kept = np.setdiff1d(np.arange(num_rows + 1), written)
      np.testing.assert_array_equal(got[3][kept], taps[kept])
      self.assertTrue(np.all(np.asarray(got[3] != taps)[written]))
    if not update_x:
      np.testing.assert_array_equal(got[2], xsum)

  @parameterized.parameters('host', 'device')
  def test_sparse_apply_with_fused_stages(self, rows_loop):
    """The whole model with fused stages gives the dense model's outputs,
    in the host's loop over units and in a device loop per block (stacked
    matrices read in place), and counts no padding rows as waste."""
    model, images, _ = _random_sact('imagenet', 0.5)
    with mock.patch.object(onednn, 'active_rows',
                           wraps=onednn.active_rows) as active:
      # A fresh runner: shared ones may hold programs traced unfused.
      runner = _runner(model, sact_mode='rows', rows_loop=rows_loop,
                       device_flops=0, adapt=False, buckets=2)
      _assert_same(self, tu.forward(model, images), runner(images))
    self.assertTrue(active.called)
    self.assertNotEmpty(_partial_row_units(runner))
    if rows_loop == 'device':
      for u in runner.last_units:
        if not u['dense']:
          self.assertEqual((u['rows_dilated'], u['rows_active']),
                           (u['dilated'], u['active']))

  def test_stacked_matrices_read_the_unit_given(self):
    """A stack of matrices with a unit index reads that unit's, as the
    unit's own matrices do (a device loop's stacks)."""
    unit = _bottleneck(16, 8)
    matrices = unit.row_matrices()
    rng = np.random.default_rng(1)
    stack = lambda w: jnp.stack(
        [jnp.asarray(rng.normal(size=w.shape), jnp.float32), w,
         jnp.asarray(rng.normal(size=w.shape), jnp.float32)])
    stacked = matrices._replace(w1=stack(matrices.w1), w2=stack(matrices.w2),
                                w3=stack(matrices.w3))
    num_rows = 2 * 4 * 5
    x = jnp.asarray(rng.normal(size=(num_rows, 16)), jnp.float32)
    y = jnp.zeros((num_rows + 1, 8))
    idx = _rows(rng, num_rows, 12, 14)
    maps = (x, jnp.zeros_like(x), jnp.zeros((2, 16)),
            jnp.zeros((num_rows + 1, 9)))
    cumulative = jnp.zeros((num_rows,))
    def run(m, unit_index):
      y_new = onednn.dilated_rows(x, y, idx, m, unit_index)
      return y_new, onednn.active_rows(
          y_new, idx, m, unit_index, cumulative, *maps, None, height=4,
          width=5, update_x=True)
    want = run(matrices, None)
    got = run(stacked, jnp.int32(1))
    chex.assert_trees_all_equal(got, want)
    self.assertGreater(float(jnp.max(jnp.abs(want[0]))), 0.0)

  def test_only_padding_changes_nothing(self):
    unit = _bottleneck(16, 8)
    matrices = unit.row_matrices()
    rng = np.random.default_rng(2)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    num_rows = 2 * 4 * 5
    x, y = normal(num_rows, 16), normal(num_rows + 1, 8)
    maps = (x, normal(num_rows, 16), normal(2, 16), normal(num_rows + 1, 9))
    idx = jnp.full((6,), num_rows + 1, jnp.int32)
    np.testing.assert_array_equal(
        onednn.dilated_rows(x, y, idx, matrices, None), y)
    got = onednn.active_rows(y, idx, matrices, None, jnp.zeros(num_rows),
                             *maps, None, height=4, width=5, update_x=True)
    chex.assert_trees_all_equal(got, maps)

  def test_matrices_that_disagree_fail_in_one_line(self):
    unit = _bottleneck(16, 8)
    matrices = unit.row_matrices()
    x, y = jnp.zeros((10, 16)), jnp.zeros((11, 8))
    idx = jnp.arange(4, dtype=jnp.int32)
    with self.assertRaisesRegex(Exception, 'dilated rows: shapes disagree'):
      jax.block_until_ready(onednn.dilated_rows(
          x, y, idx, matrices._replace(w1=jnp.zeros((16, 7))), None))
    with self.assertRaisesRegex(Exception, 'dilated rows: shapes disagree'):
      jax.block_until_ready(onednn.dilated_rows(  # A stack, no index.
          x, y, idx, matrices._replace(w1=jnp.zeros((2, 16, 8))), None))


class _TanhUnit(units_lib.CifarUnit):
  """The CIFAR unit with tanh for its leaky ReLUs."""

  def activation(self, x):
    return jnp.tanh(x)


class _VariantHead(halting.SactHead):
  """A head with other local features and another way to join the terms."""

  def local_features(self, x):
    return jax.nn.relu(self.local_bn(x)) - 0.5

  def probability(self, local, global_):
    return jax.nn.sigmoid(local - 0.5 * global_)


@functools.cache
def _variant_model():
  """A CIFAR SACT model of `_TanhUnit`s and `_VariantHead`s, half halting."""
  kwargs = dict(seed=1, base_channels=8)
  model = tu.build('cifar', (4, 4), 'sact', unit_cls=_TanhUnit,
                   head_cls=_VariantHead, **kwargs)
  reference_model = tu.build('cifar', (4, 4), 'sact', **kwargs)
  _tame(model)
  _tame(reference_model)
  images = tu.images((1, 23, 29, 3), seed=3)
  _set_biases(model, _tune_biases(model, images, 0.5))
  return model, reference_model, images


class VariantTest(parameterized.TestCase):
  """Units and heads that change a formula run sparsely unchanged."""

  @parameterized.parameters('rows', 'auto')
  def test_variant_unit_and_head_match_dense(self, sact_mode):
    model, reference_model, images = _variant_model()
    dense = tu.forward(model, images)
    # The variants are in effect: same weights, other outputs.
    logits = dense[0]
    other = tu.forward(reference_model, images)[0]
    self.assertGreater(float(jnp.max(jnp.abs(logits - other))),
                       1e-2 * float(jnp.max(jnp.abs(logits))))
    for fraction in _early_fractions(dense[1], model):
      self.assertBetween(fraction, 0.3, 0.7)
    opts = {'sact_mode': sact_mode, 'compiler_options': _FAST, 'buckets': 2}
    _assert_same(self, dense, sparse.apply(model, images, **opts))
    if sact_mode == 'rows':
      self.assertNotEmpty(_partial_row_units(sparse.runner_for(model,
                                                               **opts)))


class _SoftplusBottleneck(units_lib.BottleneckUnit):
  """The bottleneck with softplus for its ReLUs: not row_stages.cc's math."""

  def activation(self, x):
    return jax.nn.softplus(x) - 0.5


@functools.cache
def _variant_imagenet():
  """An ImageNet SACT model of `_SoftplusBottleneck`s, half halting, on a
  map of 33x33 = 1089 positions in block 1: enough to run fused stages."""
  model = tu.build('imagenet', (3, 4), 'sact', unit_cls=_SoftplusBottleneck,
                   seed=2, base_channels=8)
  _tame(model)
  images = tu.images((1, 130, 130, 3), seed=4)
  _set_biases(model, _tune_biases(model, images, 0.5))
  return model, images


class VariantBottleneckTest(absltest.TestCase):

  def test_variant_bottleneck_matches_dense(self):
    model, images = _variant_imagenet()
    reference = _model('imagenet')[0]
    self.assertTrue(stages.fusable(reference.blocks[0].first))
    self.assertFalse(stages.fusable(model.blocks[0].first))
    self.assertGreaterEqual(33 * 33, stages.FUSED_MIN_ROWS)
    dense = tu.forward(model, images)
    for fraction in _early_fractions(dense[1], model):
      self.assertBetween(fraction, 0.3, 0.7)
    opts = {'sact_mode': 'rows', 'compiler_options': _FAST, 'buckets': 2}
    _assert_same(self, dense, sparse.apply(model, images, **opts))


class DeviceRowsTest(parameterized.TestCase):
  """`rows_loop='device'`: each block one program, units at rows or dense."""

  @parameterized.product(family=('cifar', 'imagenet'),
                         target=(0.1, 0.5, 0.9), mode=('rows', 'auto'))
  def test_matches_dense_model(self, family, target, mode):
    model, images, _ = _random_sact(family, target)
    runner = _runner_for(model, sact_mode=mode, rows_loop='device',
                         device_flops=0, adapt=False, gather_cost=0.0,
                         slice_cost=0.0, unit_cost=0.0)
    timings = {}
    _assert_same(self, tu.forward(model, images),
                 runner(images, timings=timings))
    self.assertEqual(set(timings), {'whole_model'})  # One program.
    units = runner.last_units
    self.assertTrue(units and all(u['device_rows'] for u in units))
    # The rows computed cover each set; at rows, within a chunk of it.
    for u in units:
      self.assertGreaterEqual(u['rows_active'], u['active'])
      self.assertGreaterEqual(u['rows_dilated'], u['dilated'])
      if not u['dense']:
        self.assertLess(u['rows_active'], u['active'] + u['rows'])
    if mode == 'rows':
      self.assertFalse(any(u['dense'] for u in units))
    if target == 0.5:
      self.assertNotEmpty(_partial_row_units(runner))
    json.dumps(units)  # Plain Python numbers, for benchmarks.

  def test_waste_is_the_rows_beyond_the_sets(self):
    """`flops_overhead` is what the records say was computed beyond the
    sets: the rows' padding, the heads' taps at rows beyond the active
    ones, and the last unit's stand-in head, all of it."""
    model, images, _ = _random_sact('cifar', 0.5)
    runner = _runner_for(model, sact_mode='rows', rows_loop='device',
                         chunk_rows=5)
    _, aux = runner(images)
    expected, index = 0.0, -1
    for u in runner.last_units:
      index += u['unit'] == 0  # Records run block by block, unit by unit.
      costs = runner.sact_block(index).costs
      last = u['unit'] == model.blocks[index].num_units - 2
      counted = 0 if last else u['active']
      expected += ((u['rows_dilated'] - u['dilated']) * costs.dilated_cost
                   + (u['rows_active'] - u['active']) * costs.active_cost
                   + (u['rows_dilated'] + u['rows_active'] - counted)
                   * costs.local_cost)
    self.assertEqual(index, len(model.blocks) - 1)
    self.assertGreater(expected, 0)
    np.testing.assert_allclose(float(aux['flops_overhead']), expected,
                               rtol=1e-6)

  def test_all_halted_runs_no_unit(self):
    model, images = _model('cifar')
    _set_biases(model, [16.0, 16.0])
    runner = _runner_for(model, sact_mode='rows', rows_loop='device')
    _assert_same(self, tu.forward(model, images), runner(images))
    self.assertEqual(runner.last_units, [])

  def test_small_chunks_loop_over_full_chunks_and_tails(self):
    """Rows beyond a (tiny) chunk are looped over, never dropped."""
    model, images, _ = _random_sact('imagenet', 0.5)
    runner = _runner_for(model, sact_mode='rows', rows_loop='device',
                         chunk_rows=3, buckets=4)
    _assert_same(self, tu.forward(model, images), runner(images))
    self.assertTrue(any(u['rows_active'] > 10 for u in runner.last_units))

  def test_auto_loop_follows_the_map_size(self):
    """'auto': on the device where the maps are small, else the host's."""
    model, images, _ = _random_sact('cifar', 0.5)
    for floats, phase in ((1 << 20, 'whole_model'), (0, 'stage_dilated')):
      runner = _runner_for(model, sact_mode='rows', rows_loop='auto',
                           device_rows_floats=floats)
      timings = {}
      _assert_same(self, tu.forward(model, images),
                   runner(images, timings=timings))
      self.assertIn(phase, timings)

  @parameterized.parameters((60, 0, 0), (0, 0, 2_000_000_000), (30, 750, 0))
  def test_cost_model_on_traced_sizes(self, gather, slice_, unit):
    """On the device the cost model compares traced int32 sizes: integer
    options and maps of a large batch (costs past 2**31) give the host's
    decision."""
    steps = _model('imagenet')[0].blocks[0].steps
    options = sparse.SparseOptions(gather_cost=gather, slice_cost=slice_,
                                   unit_cost=unit)
    costs = options_lib.CostModel(options, steps.unit, steps.head)
    num_rows = 1 << 22
    on_device = jax.jit(lambda s: costs.runs_dense(s[0], s[1], num_rows))
    for sizes in ((num_rows, num_rows), (num_rows, 1), (num_rows // 2,
                                                        num_rows // 3)):
      self.assertEqual(
          bool(on_device(jnp.asarray(sizes, jnp.int32))),
          costs.runs_dense(*sizes, num_rows), sizes)

  def test_tail_plans_cover_every_count(self):
    for chunk, granule, num_rows in ((128, 8, 196), (256, 13, 196),
                                     (3, 1, 50), (16, 4, 1000)):
      plan = sact_block._TailPlan(chunk, granule, num_rows)
      self.assertLessEqual(len(plan.tails), 7)
      self.assertEqual(plan.tails[0], 0)
      self.assertEqual(plan.tails[-1], min(chunk, -(-min(chunk, num_rows)
                                                     // granule) * granule))
      counts = jnp.arange(num_rows + 1, dtype=jnp.int32)
      n_full, tail = jax.vmap(plan)(counts)
      rows = np.asarray(jax.vmap(plan.rows)(n_full, tail))
      counts = np.asarray(counts)
      self.assertTrue(np.all(rows >= counts))
      # Padding: less than a granule, plus at most half of the tail
      # beyond 4 granules.
      tails = rows - np.asarray(n_full) * chunk
      self.assertTrue(np.all(rows - counts < granule + tails // 2))
      self.assertTrue(np.all(rows[counts <= 4 * granule]
                             - counts[counts <= 4 * granule] < granule))


class CompilerOptionsTest(absltest.TestCase):
  """The sparse phases' default XLA options (`common.compiler_options`)."""

  def test_cpu_adds_region_analysis(self):
    self.assertIsNone(common.compiler_options('gpu'))
    self.assertEqual(common.compiler_options('cpu'), {
        **conv.compiler_options('cpu'),
        'xla_cpu_copy_insertion_use_region_analysis': True})

  def test_branches_update_maps_in_place(self):
    """A map updated by a loop inside a `lax.cond` branch, inside a loop
    over units (the device loops' shape): XLA's default copy insertion
    copies it (jaxlib 0.10), the sparse options do not."""
    def units(x_NxC, idx_S, counts_U):
      def rows(x, count):
        def chunk(i, x):
          idx = lax.dynamic_slice_in_dim(idx_S, i * 4, 4)
          return x.at[idx].add(1.0, mode='drop')
        return lax.fori_loop(0, count, chunk, x)
      def unit(i, x):
        count = counts_U[i]
        return lax.cond(count > 3, lambda x: 2.0 * x,
                        lambda x: rows(x, count), x)
      return lax.fori_loop(0, counts_U.shape[0], unit, x_NxC)

    # On the CPU whatever the default backend: these are XLA:CPU's options.
    args = jax.device_put(
        (np.zeros((64, 8), np.float32), np.arange(16, dtype=np.int32),
         np.arange(5, dtype=np.int32)), jax.local_devices(backend='cpu')[0])
    def map_copies(options):
      text = jax.jit(units, donate_argnums=0, compiler_options=options
                     ).lower(*args).compile().as_text()
      return sum(' copy(' in line and 'f32[64,8]' in line
                 for line in text.splitlines())
    # jaxlib 0.10's default copy insertion copies the map (what the option
    # is for); jaxlib 0.12's copies none here either.
    if jax.__version_info__ < (0, 12):
      self.assertGreater(map_copies(conv.compiler_options('cpu')), 0)
    self.assertEqual(map_copies(common.compiler_options('cpu')), 0)

  def test_default_options_match_dense_model(self):
    """Compiled with the defaults (not the suite's fast options), one
    program per block with units at rows and dense."""
    model, images, _ = _random_sact('cifar', 0.5)
    runner = sparse.SparseRunner(model, sact_mode='auto', rows_loop='device',
                                 buckets=2, device_flops=0, adapt=False,
                                 gather_cost=0.0, slice_cost=0.0,
                                 unit_cost=0.0)
    _assert_same(self, tu.forward(model, images), runner(images))
    self.assertTrue(all(u['device_rows'] for u in runner.last_units))
    self.assertNotEmpty(_partial_row_units(runner))


class PlannerTest(absltest.TestCase):
  """Which set sizes plan each unit, and when the host waits for them."""

  def _planner(self, first, pipeline, reads):
    def read(values):
      reads.append(tuple(int(v) for v in values))
      return reads[-1]
    return planner_lib.Planner(
        np.asarray(first), num_rows=100, chunk_dilated=16, chunk_active=8,
        buckets=4, pipeline=pipeline, read=read)

  def test_pipelined_plans_wait_only_when_sets_shrink_fast(self):
    reads = []
    planner = self._planner([90, 80], 0.05, reads)
    # Unit 0 waits: the bound (every position) is far from its sets.
    self.assertEqual(planner.sizes(0), ((90, 80), True))
    planner.plan((90, 80), dense=False, with_head=True)
    planner.add_sizes(np.asarray([88, 78]))
    # The active set fell by 20 of 100 positions at unit 0: wait again.
    self.assertEqual(planner.sizes(1), ((88, 78), True))
    planner.plan((88, 78), dense=False, with_head=True)
    planner.add_sizes(np.asarray([87, 77]))
    # It fell by 2 <= 5 at unit 1: plan unit 2 from unit 1's sizes, whose
    # step is done, without reading unit 2's.
    self.assertEqual(planner.sizes(2), ((88, 78), False))
    self.assertEqual(reads, [(90, 80), (88, 78)])
    planner.plan((88, 78), dense=False, with_head=True)
    planner.add_sizes(np.asarray([60, 50]))
    self.assertEqual(planner.sizes(3), ((87, 77), False))
    self.assertEqual(planner.exact_sizes(3), (60, 50))
    planner.plan((60, 50), dense=True, with_head=False)
    planned = list(planner.planned())
    self.assertEqual([sizes for sizes, _ in planned],
                     [(90, 80), (88, 78), (87, 77), (60, 50)])
    self.assertLen(reads, 4)  # Each device value is read once.
    for (n_dilated, n_active), plan in planned:
      self.assertGreaterEqual(plan.dilated.rows, n_dilated)
      self.assertGreaterEqual(plan.active.rows, n_active)
      self.assertLess(plan.active.padding, 8)
    self.assertEqual([p.dense for _, p in planned],
                     [False, False, False, True])
    self.assertEqual(planned[2][1].active.count, 78)  # Planned on the bound.

  def test_head_runs_dense_from_the_planned_rows(self):
    planner = planner_lib.Planner(
        np.asarray([90, 80]), num_rows=100, chunk_dilated=16, chunk_active=8,
        buckets=4, pipeline=0, read=lambda v: tuple(int(x) for x in v),
        head_runs_dense=lambda rows_d, rows_a: rows_d + rows_a >= 100)
    self.assertTrue(planner.plan((60, 40), dense=False,
                                 with_head=True).dense_head)
    self.assertFalse(planner.plan((50, 30), dense=False,
                                  with_head=True).dense_head)
    self.assertFalse(planner.plan((60, 40), dense=False,
                                  with_head=False).dense_head)
    self.assertTrue(planner.plan((5, 3), dense=True,
                                 with_head=True).dense_head)

  def test_no_pipeline_always_waits(self):
    reads = []
    planner = self._planner([90, 80], 0, reads)
    for i, sizes in enumerate([(90, 80), (89, 79), (88, 78)]):
      self.assertEqual(planner.sizes(i), (sizes, True))
      planner.plan(sizes, dense=False, with_head=True)
      planner.add_sizes(np.asarray([sizes[0] - 1, sizes[1] - 1]))
    self.assertLen(reads, 3)


@functools.cache
def _benchmark():
  """benchmarks/sparse_inference.py as a module (it is not installed)."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, 'benchmarks',
                      'sparse_inference.py')
  spec = importlib.util.spec_from_file_location('sparse_inference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class BenchmarkTest(absltest.TestCase):

  def test_unit_breakdown_runs_on_the_public_api(self):
    model, _, _ = _random_sact('cifar', 0.5)
    runner = _runner_for(model, sact_mode='rows')
    channels = model.blocks[0].steps.unit.cin
    x = tu.images((1, 12, 10, channels), seed=7)
    out = _benchmark().unit_breakdown(runner, 0, x, 0.5, reps=1)
    self.assertEqual(set(out), {
        'block', 'shape', 'active', 'dilated', 'unit_flop_fraction',
        'rows_dilated', 'rows_active', 'pieces_s', 'whole_s'})
    self.assertEqual(out['shape'], [1, 12, 10, channels])
    self.assertTrue(all(k.startswith(('dilated: ', 'active: ', 'halting '))
                        for k in out['pieces_s']))
    self.assertLen(out['pieces_s'], 10)
    self.assertTrue(all(v > 0 for v in out['pieces_s'].values()))
    self.assertEqual(set(out['whole_s']), {'vanilla unit (dense)'})

  def test_block_breakdown_splits_the_model_by_block(self):
    model, images, _ = _random_sact('cifar', 0.5)
    vanilla = tu.build('cifar', (4, 4), 'vanilla', seed=1, base_channels=8)
    vanilla.eval()
    timings = {}
    _runner_for(model, sact_mode='rows')(images, timings=timings)
    prefix = sparse.BLOCK_TIMINGS
    sparse_s = {int(k[len(prefix):]): v for k, v in timings.items()
                if k.startswith(prefix)}
    rows = _benchmark().block_breakdown(vanilla, model, images, sparse_s,
                                        reps=1)
    self.assertLen(rows, len(model.blocks))
    self.assertEqual([r['input_shape'] for r in rows],
                     [[1, 23, 29, 8], [1, 23, 29, 8]])
    # The blocks' FLOPs add up to the models' counts, less the stem and
    # head the two models share (float32 counts: within their rounding).
    sact_total = float(tu.forward(model, images)[1]['flops'][0])
    vanilla_total = float(tu.forward(vanilla, images)[1]['flops'][0])
    np.testing.assert_allclose(
        sact_total - sum(r['flops'] for r in rows),
        vanilla_total - sum(r['vanilla_flops'] for r in rows),
        rtol=0, atol=1e-5 * vanilla_total)
    for r in rows:
      self.assertEqual(r['sparse_s'], sparse_s[r['block']])
      self.assertAlmostEqual(r['flop_fraction'],
                             r['flops'] / r['vanilla_flops'])
      self.assertAlmostEqual(r['time_ratio'], r['sparse_s'] / r['vanilla_s'])
      self.assertAlmostEqual(
          r['efficiency'], r['flop_fraction'] / r['time_ratio'])
    # Halting saved FLOPs in some block (units 2..L ran at rows).
    self.assertLess(min(r['flop_fraction'] for r in rows), 0.99)


if __name__ == '__main__':
  absltest.main()
