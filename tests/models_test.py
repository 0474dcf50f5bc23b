"""Whole-model properties: ACT/SACT generalise ResNet, SACT reduces to ACT."""

import functools
import re

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import layers
from sact_jax import onednn
from sact_jax import units
from sact_jax.models import create_model
from sact_jax.models import depth_or_units
from sact_jax.models import resolve_units
import testing_utils as tu

_CIFAR = dict(family='cifar', units=(2, 3, 2), base_channels=4)
_CIFAR_IMAGES = (2, 16, 16, 3)
_IMAGENET = dict(family='imagenet', units=(1, 2, 2, 1), base_channels=2)
_IMAGENET_IMAGES = (2, 32, 32, 3)


@functools.cache
def _model(config: str, model_type: str) -> nnx.Module:
  """Eval-mode models sharing a seed: equal paths get equal weights."""
  spec = _CIFAR if config == 'cifar' else _IMAGENET
  model = tu.build(spec['family'], spec['units'], model_type,
                   base_channels=spec['base_channels'], seed=3)
  model.eval()
  return model


def _images(config: str) -> jax.Array:
  return tu.images(_CIFAR_IMAGES if config == 'cifar' else _IMAGENET_IMAGES)


def _constant_halting_pair():
  """A SACT model whose halting map is constant over space, and its ACT twin.

  The SACT local conv kernel is zeroed, so the logit is local bias + global
  term; the ACT head gets the same global BN and kernel and that bias.
  """
  sact = nnx.clone(_model('cifar', 'sact'))
  act = nnx.clone(_model('cifar', 'act'))
  tu.set_halting_bias(sact, 0.0)
  for head in tu.heads(sact):
    head.local_conv.kernel[...] = jnp.zeros_like(head.local_conv.kernel[...])
  # Trunk, global BN and global kernel have the same paths in both.
  tu.copy_shared(sact, act)
  for act_head, sact_head in zip(tu.heads(act), tu.heads(sact)):
    act_head.global_conv.bias[...] = sact_head.local_conv.bias[...]
  return sact, act


class ModelTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('cifar_act', 'cifar', 'act'),
      ('cifar_sact', 'cifar', 'sact'),
      ('imagenet_sact', 'imagenet', 'sact'),
  )
  def test_never_halting_equals_vanilla(self, config, model_type):
    """With halting out of reach, ACT/SACT give the vanilla ResNet's logits."""
    vanilla = _model(config, 'vanilla')
    model = nnx.clone(_model(config, model_type))
    copied = tu.copy_shared(vanilla, model)
    self.assertEqual(copied, len(nnx.to_flat_state(nnx.state(vanilla))))
    tu.set_halting_bias(model, -1000.0)  # Beats any local/global term.
    images = _images(config)
    logits_ref, aux_ref = tu.forward(vanilla, images)
    logits, aux = tu.forward(model, images)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    self.assertEqual(aux_ref['ponder_cost'], [])
    units = _CIFAR['units'] if config == 'cifar' else _IMAGENET['units']
    self.assertLen(aux['num_units'], len(units))
    for n, num_units, ponder in zip(units, aux['num_units'],
                                    aux['ponder_cost']):
      np.testing.assert_array_equal(num_units, n)
      # rho = N + R with R = 1 - sum of (vanishing) scores.
      np.testing.assert_allclose(ponder, n + 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux['ponder_loss'],
                               sum(units) + len(units), rtol=1e-6)
    # The logits are not trivially equal (the model sees its input).
    self.assertGreater(float(jnp.std(logits)), 1e-3)

  def test_sact_with_constant_halting_map_is_act(self):
    sact, act = _constant_halting_pair()
    images = _images('cifar')
    logits_sact, aux_sact = tu.forward(sact, images)
    logits_act, aux_act = tu.forward(act, images)
    np.testing.assert_allclose(logits_sact, logits_act, rtol=1e-5,
                               atol=1e-5)
    halted_early = False
    expected_extra = np.zeros(images.shape[0])
    for i, (n_act, n_sact, p_act, p_sact) in enumerate(zip(
        aux_act['num_units'], aux_sact['num_units'], aux_act['ponder_cost'],
        aux_sact['ponder_cost'])):
      chex.assert_shape(n_act, (images.shape[0],))
      np.testing.assert_array_equal(
          n_sact, np.broadcast_to(n_act[:, None, None], n_sact.shape))
      np.testing.assert_allclose(
          p_sact, np.broadcast_to(p_act[:, None, None], p_sact.shape),
          rtol=1e-6)
      halted_early |= bool(np.any(n_act < _CIFAR['units'][i]))
      # SACT heads cost a 3x3 local conv on running positions (all or none
      # here) and always the global 2C; ACT heads 2C while running.
      block = sact.blocks[i]
      hw = int(np.prod(n_sact.shape[1:]))
      channels = block.first.cout
      for k in range(2, block.num_units + 1):
        ran = np.asarray(n_act) >= k - 1
        expected_extra += ran * 2 * 9 * channels * hw + 2 * channels * (~ran)
    self.assertTrue(halted_early)  # Not vacuous.
    np.testing.assert_array_equal(
        np.asarray(aux_sact['flops'], np.int64)
        - np.asarray(aux_act['flops'], np.int64),
        expected_extra.astype(np.int64))

  @parameterized.parameters(('act',), ('sact',))
  def test_ponder_gradient_reaches_halting_params(self, model_type):
    model = nnx.clone(_model('cifar', model_type))
    tu.set_halting_bias(model, 0.0)
    images = _images('cifar')

    @tu.jit
    def grads_fn(model, images):
      return nnx.grad(lambda m: m(images)[1]['ponder_loss'])(model)

    grads = grads_fn(model, images)
    chex.assert_tree_all_finite(grads)
    for i, block_grads in enumerate(grads['blocks'].values()):
      for path, g in nnx.to_flat_state(block_grads['steps']['head']):
        if path[-1] in ('kernel',) or path[-2:] == ('local_conv', 'bias') or (
            model_type == 'act' and path[-2:] == ('global_conv', 'bias')):
          self.assertGreater(float(jnp.max(jnp.abs(g[...]))), 0.0,
                             (i, path))
    # Halting depends on the trunk, never on the classifier.
    self.assertGreater(float(jnp.max(jnp.abs(
        grads['stem_conv']['kernel'][...]))), 0.0)
    np.testing.assert_array_equal(grads['logits']['kernel'][...], 0.0)

  @parameterized.parameters('act', 'sact')
  def test_accelerator_path_equals_the_cpu_path(self, model_type):
    """Train mode, the whole CIFAR model: XLA's convolutions and the heads
    as an accelerator runs them (window sums, the BatchNorms as affine maps
    with their own backward passes) against the CPU's formulations:
    logits, ponder cost, halting, gradients of the training loss and
    BatchNorm statistics. (The small ImageNet model's last blocks run at
    1x1 and 2x2: BatchNorms over 2-8 values there amplify the formulations'
    rounding to 1% of a gradient's scale; blocks_test compares its heads.)
    """
    config = 'cifar'
    spec = _CIFAR
    images = _images(config)
    labels = jnp.arange(images.shape[0]) % 10
    results = []
    for fast in (True, False):
      model = tu.build(spec['family'], spec['units'], model_type,
                       base_channels=spec['base_channels'], seed=3,
                       fast_conv_backward=fast, remat=False)
      # Some images or positions halt before their block's last unit.
      tu.set_halting_bias(model, 2.0)
      model.train()
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss_fn(params, rest):
        # Fresh BatchNorm statistics inside the trace.
        m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
        logits, aux = m(images)
        loss = jnp.mean(-jax.nn.log_softmax(logits)[
            jnp.arange(labels.size), labels]) + 0.01 * aux['ponder_loss']
        return loss, (logits, aux, nnx.state(m, nnx.BatchStat))

      (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params,
                                                                 rest)
      results.append((out, grads))
    ((logits_ref, aux_ref, stats_ref), grads_ref), (
        (logits, aux, stats), grads) = results
    self.assertTrue(any(np.min(n) < units for n, units in
                        zip(aux_ref['num_units'], spec['units'])))
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aux['ponder_loss'], aux_ref['ponder_loss'],
                               rtol=1e-5)
    for got, want in zip(aux['num_units'], aux_ref['num_units']):
      np.testing.assert_array_equal(got, want)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-4, atol=1e-5)
    # Two conv formulations through the whole network: single gradients
    # that nearly cancel differ by more than their own size allows, so
    # each parameter's gradient is compared at the scale of its largest.
    # (Measured on one CPU: within 1.3e-4 of that scale.)
    for (path, got), (_, want) in zip(nnx.to_flat_state(grads),
                                      nnx.to_flat_state(grads_ref)):
      got, want = np.asarray(got[...]), np.asarray(want[...])
      self.assertLessEqual(np.max(np.abs(got - want)),
                           1e-3 * np.max(np.abs(want)) + 1e-5, path)

  @parameterized.parameters('vanilla', 'act', 'sact')
  def test_evaluation_runs_what_follows_convs_inside_onednn(self,
                                                             model_type):
    """Evaluation on the CPU's routed convolutions: every bottleneck's conv1
    and conv2 ends in its BatchNorm and ReLU as oneDNN's post-ops, and conv3
    in the sum into the stream where nothing masks it, with the logits and
    ponder cost of XLA's convolutions and separate steps."""
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')
    # The route of a CPU whose oneDNN forward reads its weights in place
    # (AVX-512), taken on any: where it would copy them (AVX2), this small
    # model's convolutions are XLA's (`conv.formulation`).
    self.enter_context(absltest.mock.patch.object(
        onednn, 'forward_copies_weights', return_value=False))
    spec = _IMAGENET
    images = _images('imagenet')
    outputs, programs = [], []
    for fast in (True, False):
      model = tu.build(spec['family'], spec['units'], model_type,
                       base_channels=spec['base_channels'], seed=3,
                       fast_conv_backward=fast)
      model.eval()
      graphdef, state = nnx.split(model)
      forward = jax.jit(lambda state: nnx.merge(graphdef, state)(images))
      outputs.append(forward(state))
      programs.append(forward.lower(state).compile().as_text())
    (logits, aux), (logits_ref, aux_ref) = outputs
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(aux['ponder_cost'], aux_ref['ponder_cost'],
                                rtol=1e-5)
    def calls(post_ops, program):
      return len(re.findall(
          rf'custom_call_target="OnednnConvForward\w*{post_ops}"', program))
    # Per unit that runs outside a loop (each block's first) and per loop
    # body over the others: two convolutions with their BatchNorm and ReLU,
    # and, where nothing masks the update, conv3 added into the stream.
    self.assertGreaterEqual(calls('AffineRelu', programs[0]),
                            2 * len(spec['units']))
    self.assertGreaterEqual(calls('AddInto', programs[0]),
                            len(spec['units']))
    self.assertEqual(calls('AffineRelu', programs[1])
                     + calls('AddInto', programs[1]), 0)

  def test_a_unit_with_another_activation_keeps_its_steps_apart(self):
    """A `BottleneckUnit` subclass with its own activation is not fused in
    evaluation: its residual is its own steps', not the ReLU's."""
    if not onednn.enabled():
      self.skipTest('oneDNN is not built here.')

    class LeakyUnit(units.BottleneckUnit):

      def activation(self, x):
        return jax.nn.leaky_relu(x, 0.3)

    factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3)
    rng = np.random.default_rng(0)
    made = []
    for cls in (units.BottleneckUnit, LeakyUnit):
      unit = cls(16, 16, 8, factory=factory, rngs=nnx.Rngs(0))
      for bn in (unit.preact, unit.conv1_bn, unit.conv2_bn):
        tu.randomize_batch_norm(bn, np.random.default_rng(1))
      unit.eval()
      made.append(unit)
    relu_unit, leaky_unit = made
    self.assertTrue(relu_unit._fuses())
    self.assertFalse(leaky_unit._fuses())
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
    leaky = leaky_unit.activation
    want = leaky_unit.conv3(leaky(leaky_unit.conv2_bn(leaky_unit.conv2(leaky(
        leaky_unit.conv1_bn(leaky_unit.conv1(leaky_unit.preactivation(
            x))))))))
    np.testing.assert_allclose(leaky_unit.residual(x), want, rtol=1e-5,
                               atol=1e-5)
    self.assertGreater(float(jnp.max(jnp.abs(
        relu_unit.residual(x) - want))), 1e-2)

  def test_no_retracing(self):
    model = nnx.clone(_model('cifar', 'sact'))
    graphdef, state = nnx.split(model)

    @chex.assert_max_traces(n=1)
    def forward(state, images):
      return nnx.merge(graphdef, state)(images)

    forward = jax.jit(forward, compiler_options=tu.FAST_COMPILE)
    a = forward(state, _images('cifar'))
    b = forward(state, _images('cifar') + 1.0)
    state2 = jax.tree.map(lambda v: v * 1.01, state)
    c = forward(state2, _images('cifar'))
    self.assertFalse(np.allclose(a[0], b[0]))
    self.assertFalse(np.allclose(a[0], c[0]))

  @parameterized.named_parameters(
      ('rank3', (16, 16, 3)),
      ('one_channel', (2, 16, 16, 1)),
      ('channels_first', (2, 3, 16, 16)),
      ('empty_batch', (0, 16, 16, 3)),
      ('empty_image', (2, 0, 16, 3)),
  )
  def test_bad_images_raise(self, shape):
    message = (r'Expected images shaped \[batch, height, width, 3\].*'
               + re.escape(str(shape)))
    with self.assertRaisesRegex(ValueError, message):
      _model('cifar', 'vanilla')(jnp.zeros(shape))

  @parameterized.parameters(jnp.uint8, jnp.int32, jnp.bool_)
  def test_integer_images_raise(self, dtype):
    """Raw pixel values would run as [0, 255] floats, silently."""
    name = jnp.dtype(dtype).name
    with self.assertRaisesRegex(
        TypeError, rf'images have dtype {name}: .*data.preprocess_image'):
      _model('cifar', 'vanilla')(jnp.zeros((2, 16, 16, 3), dtype))

  def test_images_must_be_an_array(self):
    with self.assertRaisesRegex(TypeError,
                                'images must be a jax or numpy array, got '
                                'list'):
      _model('cifar', 'vanilla')([[[[0.0, 0.0, 0.0]]]])

  def test_one_unit_block(self):
    """A block of one unit: output x^1, N = 1, R = 1, rho = 2, in all types."""
    models = {t: tu.build('cifar', (1,), t, base_channels=4, seed=5)
              for t in ('vanilla', 'act', 'sact')}
    images = _images('cifar')
    outputs = {}
    for model_type, model in models.items():
      model.eval()
      outputs[model_type] = tu.forward(model, images)
    logits_ref, aux_ref = outputs['vanilla']
    for model_type in ('act', 'sact'):
      logits, aux = outputs[model_type]
      np.testing.assert_allclose(logits, logits_ref, rtol=1e-6)
      np.testing.assert_array_equal(aux['flops'], aux_ref['flops'])
      shape = (2,) if model_type == 'act' else (2, 16, 16)
      chex.assert_shape(aux['num_units'][0], shape)
      np.testing.assert_array_equal(aux['num_units'][0], 1)
      np.testing.assert_array_equal(aux['ponder_cost'][0], 2.0)
      self.assertEqual(float(aux['ponder_loss']), 2.0)


class MaxPoolTest(parameterized.TestCase):
  """`layers.max_pool` (the ImageNet stem's) against `nnx.max_pool`."""

  @parameterized.parameters((3, 2, 12, 12), (3, 2, 7, 9), (3, 1, 5, 6),
                            (2, 2, 5, 5))
  def test_values_and_gradient_are_the_2d_pools(self, window, stride,
                                                height, width):
    rng = np.random.default_rng(window + height)
    # Half the entries zero, as after a ReLU: ties in most windows.
    x = jnp.asarray(np.maximum(rng.normal(size=(2, height, width, 3)), 0.0),
                    jnp.float32)
    def pool_2d(x):
      return nnx.max_pool(x, (window, window), strides=(stride, stride),
                          padding='SAME')
    pool = lambda x: layers.max_pool(x, window, stride)
    want = pool_2d(x)
    got = jax.jit(pool)(x)
    chex.assert_shape(got, want.shape)
    np.testing.assert_array_equal(got, want)
    weights = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * weights))(x)
    np.testing.assert_array_equal(jax.jit(lambda x: grad(pool))(x),
                                  grad(pool_2d))


class CreateModelTest(parameterized.TestCase):

  @parameterized.parameters(
      ('cifar', 20, (3, 3, 3)), ('cifar', 32, (5, 5, 5)),
      ('cifar', 56, (9, 9, 9)), ('cifar', 110, (18, 18, 18)),
      ('imagenet', 50, (3, 4, 6, 3)), ('imagenet', 101, (3, 4, 23, 3)),
      ('imagenet', 152, (3, 8, 36, 3)), ('imagenet', 200, (3, 24, 36, 3)),
  )
  def test_presets(self, family, depth, units):
    self.assertEqual(resolve_units(family, depth), units)
    model = nnx.eval_shape(lambda: create_model(
        family, depth, 'sact', num_classes=7, rngs=nnx.Rngs(0)))
    self.assertEqual(tuple(b.num_units for b in model.blocks), units)
    for block, n in zip(model.blocks, units):
      stacked = jax.tree.leaves(nnx.state(block.steps, nnx.Param))
      self.assertTrue(all(a.shape[0] == n - 1 for a in stacked))
    self.assertEqual(model.logits.out_features, 7)

  def test_explicit_units(self):
    self.assertEqual(resolve_units('cifar', [1, 2, 4]), (1, 2, 4))
    self.assertEqual(resolve_units('cifar', (4,)), (4,))  # One block.

  @parameterized.named_parameters(
      ('depth', 110, 110),
      ('one_value', (3,), 3),  # What `--config.units=3` gives.
      ('one_item_list', [101], 101),
      ('per_block', (2, 2, 2), (2, 2, 2)),
      ('numpy', np.array([1, 2]), (1, 2)),
  )
  def test_depth_or_units(self, units, expected):
    self.assertEqual(depth_or_units(units), expected)

  @parameterized.parameters(
      dict(units=3.5), dict(units=(3, 2.5)), dict(units='3'),
      dict(units=(True,)))
  def test_depth_or_units_needs_integers(self, units):
    with self.assertRaisesRegex(ValueError, 'units must be integers'):
      depth_or_units(units)

  def test_one_value_is_a_depth_not_a_block(self):
    """A config's (3,) is refused in one line instead of one block of 3."""
    with self.assertRaisesRegex(
        ValueError, r'^units=3 is not a known cifar depth \(20, 32, 56, '
        r'110\); give units per block, e\.g\. \(3, 3, 3\)\.$'):
      resolve_units('cifar', depth_or_units((3,)))
    self.assertEqual(resolve_units('cifar', depth_or_units((110,))),
                     (18, 18, 18))

  @parameterized.named_parameters(
      ('unknown_cifar_depth', dict(family='cifar', units=44),
       r'^units=44 is not a known cifar depth \(20, 32, 56, 110\); give '
       r'units per block, e\.g\. \(44, 44, 44\)\.$'),
      ('unknown_imagenet_depth', dict(family='imagenet', units=34),
       r'units=34 is not a known imagenet depth \(50, 101, 152, 200\); .*'
       r'\(34, 34, 34, 34\)'),
      ('bad_family', dict(family='mnist'), r"family must be one of .*'mnist'"),
      ('bad_model_type', dict(model_type='adaptive'),
       r"model_type must be one of .*'adaptive'"),
      ('zero_units', dict(units=(2, 0, 2)),
       r'units per block must be integers >= 1'),
      ('no_units', dict(units=()), r'units per block must be integers >= 1'),
      ('float_units', dict(units=(1.5, 1, 1)),
       r'^units per block must be integers >= 1, got \(1\.5, 1, 1\)\.$'),
      ('string_units', dict(units='110'),
       r"^units must be a cifar depth or a sequence of units per block, "
       r"got '110'\.$"),
      ('float_depth', dict(units=110.0), r'got 110\.0\.$'),
      ('zero_classes', dict(num_classes=0),
       r'^num_classes must be an integer >= 1, got 0\.$'),
      ('negative_classes', dict(num_classes=-1),
       r'num_classes must be an integer >= 1, got -1'),
      ('float_classes', dict(num_classes=2.7),
       r'num_classes must be an integer >= 1, got 2\.7'),
      ('zero_width', dict(base_channels=0),
       r'^base_channels must be an integer >= 1, got 0\.$'),
      ('bool_width', dict(base_channels=True),
       r'base_channels must be an integer >= 1, got True'),
      ('eps_zero', dict(eps=0.0), r'eps must lie in \(0, 1\), got 0.0'),
      ('eps_one', dict(eps=1.0), r'eps must lie in \(0, 1\), got 1.0'),
      ('eps_negative', dict(eps=-0.1), r'eps must lie in \(0, 1\)'),
  )
  def test_errors(self, overrides, message):
    kwargs = dict(family='cifar', units=(1, 1, 1), model_type='sact',
                  num_classes=10)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, message):
      nnx.eval_shape(lambda: create_model(rngs=nnx.Rngs(0), **kwargs))

  def test_rngs_must_be_rngs(self):
    for rngs in (0, jax.random.key(0)):
      with self.assertRaisesRegex(TypeError, r'rngs must be an nnx.Rngs'):
        create_model('cifar', (1, 1, 1), 'sact', num_classes=10, rngs=rngs)

  def test_eps_as_a_string(self):
    """A bare comparison error from inside the blocks, before."""
    with self.assertRaisesRegex(
        TypeError, r"^eps must be a number in \(0, 1\), got '0.01'\.$"):
      nnx.eval_shape(lambda: create_model(
          'cifar', (1, 1, 1), 'sact', num_classes=10, eps='0.01',
          rngs=nnx.Rngs(0)))


if __name__ == '__main__':
  absltest.main()
