"""Parity with the original TF implementation on the stored fixtures.

Each case of `testdata/parity_manifest.json` holds the reference's weights
(`params.npz`) and its outputs on a fixed batch (`outputs.npz`). Block
outputs are not exposed by the models, so they are not compared.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from sact_jax import flops as flops_lib
from sact_jax import reference
import testing_utils as tu

_CASES = ('cifar_vanilla', 'cifar_act', 'cifar_sact', 'imagenet_vanilla',
          'imagenet_sact')


def _case(name: str) -> dict:
  return tu.manifest()['cases'][name]


def _load(name: str, params=None):
  case = _case(name)
  return reference.load_reference_model(
      tu.load_npz(case['params_npz']) if params is None else params,
      family=case['family'], units=case['units_per_block'],
      model_type=case['model_type'], num_classes=case['num_classes'],
      base_channels=case['base_channels'])


@functools.cache
def _run(name: str):
  """The loaded model, its outputs on the stored batch, the reference's."""
  case = _case(name)
  model = _load(name)
  images = tu.load_npz(case['input_file'])['images']
  with jax.default_matmul_precision('highest'):
    logits, aux = tu.forward(model, images)
  return model, jax.device_get((logits, aux)), tu.load_npz(
      case['outputs_npz'])


class ParityTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_outputs_match_reference(self, name):
    case = _case(name)
    _, (logits, aux), expected = _run(name)
    scale = np.max(np.abs(expected['logits']))
    self.assertLess(np.max(np.abs(logits - expected['logits'])) / scale, 1e-4)
    # FLOPs per image are integers: compare exactly.
    flops = np.asarray(aux['flops'], np.float64)
    np.testing.assert_array_equal(flops, np.round(flops))
    np.testing.assert_array_equal(flops.astype(np.int64), expected['flops'])
    np.testing.assert_array_equal(expected['flops'], case['flops_per_image'])
    if case['model_type'] == 'vanilla':
      self.assertEqual(aux['num_units'], [])
      self.assertEqual(float(aux['ponder_loss']), 0.0)
      return
    blocks = case['block_scopes']
    self.assertLen(aux['num_units'], len(blocks))
    for block, num_units, ponder in zip(blocks, aux['num_units'],
                                        aux['ponder_cost']):
      np.testing.assert_array_equal(num_units,
                                    expected[f'{block}/num_units'])
      np.testing.assert_allclose(ponder, expected[f'{block}/ponder_cost'],
                                 rtol=0, atol=1e-4)
    np.testing.assert_allclose(aux['ponder_loss'],
                               expected['total_ponder_cost'], atol=1e-4)
    np.testing.assert_allclose(aux['ponder_loss'],
                               case['total_ponder_cost'], rtol=1e-5)

  @parameterized.parameters(*_CASES)
  def test_trainable_param_count(self, name):
    model = _run(name)[0]
    self.assertEqual(flops_lib.param_count(model),
                     _case(name)['num_trainable_params'])

  @parameterized.parameters('cifar_act', 'imagenet_sact')
  def test_missing_variable(self, name):
    params = dict(tu.load_npz(_case(name)['params_npz']))
    victim = [k for k in params if 'halting_proba/global_conv' in k][0]
    del params[victim]
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                'missing.*' + victim):
      _load(name, params)

  def test_a_path_or_tensor_names_for_the_weights(self):
    """A path would read as "every variable missing", by substrings."""
    path = _case('cifar_vanilla')['params_npz']
    with self.assertRaisesRegex(TypeError,
                                r'params must be a mapping .*got the path'):
      _load('cifar_vanilla', path)
    params = tu.load_npz(path)
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                r"names end in ':0': drop that suffix"):
      _load('cifar_vanilla', {f'{k}:0': v for k, v in params.items()})

  @parameterized.parameters('cifar_vanilla', 'imagenet_sact')
  def test_unexpected_variable(self, name):
    params = dict(tu.load_npz(_case(name)['params_npz']))
    prefix = _case(name)['scope_prefix']
    extra = f'{prefix}/extra_layer/weights'
    params[extra] = np.zeros((3, 3), np.float32)
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                'no place.*' + extra):
      _load(name, params)

  def test_vanilla_weights_do_not_fit_act(self):
    """A vanilla checkpoint lacks the halting variables of an ACT model."""
    params = tu.load_npz(_case('cifar_vanilla')['params_npz'])
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                'halting_proba'):
      _load('cifar_act', params)

  def test_transposed_1x1_kernel_of_equal_size(self):
    """A [1, 1, K, C] logits kernel must not be reshaped into [C, K]."""
    params = dict(tu.load_npz(_case('cifar_vanilla')['params_npz']))
    victim = 'resnet_residual/logits/weights'
    params[victim] = params[victim].transpose(0, 1, 3, 2)
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                victim + '.*shape'):
      _load('cifar_vanilla', params)

  @parameterized.parameters(
      ('cifar_sact', 'resnet_residual/block_2/unit_2/residual/conv1/weights'),
      ('imagenet_vanilla', 'resnet_v2/block1/unit_1/bottleneck_v2/conv1/'
       'weights'),
      ('cifar_act', 'resnet_residual/logits/biases'),
  )
  def test_misshaped_variable(self, name, victim):
    params = dict(tu.load_npz(_case(name)['params_npz']))
    shape = params[victim].shape
    params[victim] = np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32)
    with self.assertRaisesRegex(reference.ReferenceMismatchError,
                                victim + '.*shape'):
      _load(name, params)


if __name__ == '__main__':
  absltest.main()
