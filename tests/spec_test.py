"""Tests of `models.ModelSpec`: the architecture as data."""

import json

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from sact_jax import models

SACT = models.ModelSpec('cifar', (2, 2), 'sact', num_classes=5,
                        base_channels=4)
VANILLA = models.ModelSpec('cifar', (2, 2), 'vanilla', num_classes=5,
                           base_channels=4)


class ModelSpecTest(parameterized.TestCase):

  def test_dict_and_json_round_trip(self):
    """to_dict/from_dict (through JSON) gives back an equal spec."""
    for spec in (SACT, VANILLA, models.ModelSpec(
        'imagenet', 101, 'act', num_classes=1001, eps=0.05)):
      again = models.ModelSpec.from_dict(
          json.loads(json.dumps(spec.to_dict())))
      self.assertEqual(again, spec)
      self.assertIsInstance(again.units, tuple)

  def test_preset_depth_is_resolved(self):
    spec = models.ModelSpec('cifar', 110, 'sact', num_classes=10)
    self.assertEqual(spec.units, (18, 18, 18))
    self.assertEqual(spec.to_dict()['units'], [18, 18, 18])

  @parameterized.parameters(
      dict(kwargs=dict(family='mnist'), message='family'),
      dict(kwargs=dict(model_type='pact'), message='model_type'),
      dict(kwargs=dict(num_classes=0), message='num_classes'),
      dict(kwargs=dict(units=(2, 0)), message='units'),
      dict(kwargs=dict(units=7), message='units=7 is not a known cifar depth'),
      dict(kwargs=dict(eps=1.0), message='eps'),
      dict(kwargs=dict(base_channels=0), message='base_channels'),
      dict(kwargs=dict(num_classes=2.7),
           message=r'num_classes must be an integer >= 1, got 2\.7'),
      dict(kwargs=dict(units=(2.5, 2)),
           message=r'units per block must be integers >= 1'),
  )
  def test_invalid_fields(self, kwargs, message):
    fields = dict(family='cifar', units=(2, 2), model_type='sact',
                  num_classes=5)
    fields.update(kwargs)
    with self.assertRaisesRegex(ValueError, message):
      models.ModelSpec(**fields)

  @parameterized.named_parameters(
      ('depth', (110,), (18, 18, 18)),
      ('per_block', (2, 1, 3), (2, 1, 3)),
  )
  def test_from_config(self, units, expected):
    config = dict(family='cifar', units=units, model_type='sact',
                  num_classes=10, eps=0.01)
    self.assertEqual(models.ModelSpec.from_config(config).units, expected)

  def test_from_config_names_missing_keys(self):
    """Not a bare KeyError: the docstring promises a ValueError."""
    config = dict(family='cifar', units=(2, 2), num_classes=10)
    with self.assertRaisesRegex(
        ValueError, r"^config lacks 'model_type', 'eps' \(ModelSpec."
        r'from_config needs family, units, model_type, num_classes, eps\)\.$'):
      models.ModelSpec.from_config(config)

  def test_eps_as_a_string(self):
    """Refused as `create_model` refuses it, not converted."""
    with self.assertRaisesRegex(TypeError, "eps must be a number .*'0.1'"):
      models.ModelSpec('cifar', (2, 2), 'sact', num_classes=5, eps='0.1')

  def test_from_config_refuses_one_value_that_is_no_depth(self):
    """`--config.units=3` arrives as (3,): a depth, not one block of 3."""
    config = dict(family='cifar', units=(3,), model_type='sact',
                  num_classes=10, eps=0.01)
    with self.assertRaisesRegex(
        ValueError, r'^units=3 is not a known cifar depth \(20, 32, 56, '
        r'110\); give units per block, e\.g\. \(3, 3, 3\)\.$'):
      models.ModelSpec.from_config(config)
    # Outside configs a one-block model stays possible.
    self.assertEqual(models.ModelSpec('cifar', (3,), 'sact',
                                      num_classes=10).units, (3,))

  def test_unknown_field(self):
    with self.assertRaisesRegex(ValueError, 'Unknown ModelSpec field'):
      models.ModelSpec.from_dict(dict(SACT.to_dict(), depth=3))

  def test_create_builds_the_spec(self):
    model = SACT.abstract_model()
    self.assertEqual(model.units, (2, 2))
    self.assertEqual(model.model_type, 'sact')
    self.assertEqual(model.logits.kernel.shape, (8, 5))


class FromModelTest(parameterized.TestCase):

  def test_cifar_110_vanilla_flops_match_the_reference(self):
    """The vanilla twin of an SACT ResNet-110 costs 505,775,360 FLOPs."""
    abstract = nnx.eval_shape(lambda: models.create_model(
        'cifar', 110, 'sact', num_classes=10, rngs=nnx.Rngs(0)))
    spec = models.ModelSpec.from_model(abstract)
    # The `model` entry of eval.json.
    self.assertEqual(spec.to_dict(), {
        'family': 'cifar', 'units': [18, 18, 18], 'model_type': 'sact',
        'num_classes': 10, 'base_channels': 16, 'eps': 0.01})
    self.assertEqual(spec.vanilla_flops((32, 32, 3)), 505_775_360)
    with self.assertRaisesRegex(ValueError, r'image_shape must hold integers, '
                                r'got \(32.5, 32, 3\)'):
      spec.vanilla_flops((32.5, 32, 3))  # Not truncated to 32.

  def test_imagenet_round_trip(self):
    """from_model gives back the create_model arguments."""
    spec = models.ModelSpec('imagenet', (1, 2, 1, 1), 'act', num_classes=7,
                            base_channels=8, eps=0.05)
    self.assertEqual(models.ModelSpec.from_model(spec.abstract_model()),
                     spec)
    with self.assertRaisesRegex(TypeError, 'Expected a CifarResNet'):
      models.ModelSpec.from_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))

  @parameterized.parameters(('cifar', 16), ('imagenet', 64))
  def test_family_default_width_is_explicit(self, family, width):
    """A None base_channels is the width it stands for: equal specs."""
    spec = models.ModelSpec(family, (1, 1, 1), 'vanilla', num_classes=3)
    self.assertEqual(spec.base_channels, width)
    self.assertEqual(models.ModelSpec.from_model(spec.abstract_model()), spec)
    self.assertEqual(
        spec, models.ModelSpec(family, (1, 1, 1), 'vanilla', num_classes=3,
                               base_channels=width))


if __name__ == '__main__':
  absltest.main()
