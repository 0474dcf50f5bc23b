"""FLOP counts and parameter counts against the reference's figures.

Big networks are only built and traced abstractly; the expected numbers are
the reference counter's (testdata/parity_manifest.json,
`reference_flops_params`) or are worked out here from its rules (parity
README section 3.7): a conv costs `2 kh kw C_in C_out` per counted output
position; biases, BN, activations and pooling are free.
"""

import functools
from typing import NamedTuple

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import flops as flops_lib
from sact_jax.models import create_model
import testing_utils as tu


def _reference_entry(name: str) -> dict:
  for entry in tu.manifest()['reference_flops_params']:
    if entry['name'] == name:
      return entry
  raise KeyError(name)


def _model_fn(entry: dict):
  depth = int(entry['name'].split('resnet')[1])  # A preset, e.g. 110.
  return lambda: create_model(
      entry['family'], depth, entry['model_type'],
      num_classes=entry['num_classes'],
      base_channels=entry['base_channels'], rngs=nnx.Rngs(0))


class _Block(NamedTuple):
  """By-hand costs of one block: FLOPs per position of units 2..L."""
  units: int
  width: int  # Channels of the block output (= halting head input).
  hw: int  # Output positions.
  first: int  # Whole first unit, dense.
  dilated: int  # Per position: the first conv of a unit (feeds a 3x3).
  active: int  # Per position: the other convs of a unit.


def _cifar_by_hand(units, base, size, num_classes):
  """(stem + logits, blocks) of a CIFAR ResNet from the reference rules."""
  outside = 2 * 9 * 3 * base * size * size  # Stem 3x3 conv.
  blocks, cin = [], base
  for i, n in enumerate(units):
    width, hw = base * 2**i, (size // 2**i) ** 2
    conv3x3 = 2 * 9 * width * width
    blocks.append(_Block(n, width, hw, 2 * 9 * cin * width * hw
                         + conv3x3 * hw, conv3x3, conv3x3))
    cin = width
  return outside + 2 * cin * num_classes, blocks


def _imagenet_by_hand(units, base, size, num_classes):
  """(stem + logits, blocks) of an ImageNet ResNet-v2 (stride in unit 1)."""
  outside = 2 * 49 * 3 * 64 * (size // 2) ** 2  # Stem 7x7/2 conv.
  hw = (size // 4) ** 2  # After the 3x3/2 max pool.
  blocks, cin = [], 64
  for i, n in enumerate(units):
    depth, neck = 4 * base * 2**i, base * 2**i
    in_hw, hw = hw, hw if i == 0 else hw // 4
    first = (2 * cin * neck * in_hw  # conv1 1x1 at the input resolution.
             + 2 * 9 * neck * neck * hw + 2 * neck * depth * hw
             + (2 * cin * depth * hw if cin != depth else 0))  # Shortcut.
    blocks.append(_Block(n, depth, hw, first, 2 * depth * neck,
                         2 * 9 * neck * neck + 2 * neck * depth))
    cin = depth
  return outside + 2 * cin * num_classes, blocks


def _block_dense(b: _Block) -> int:
  return b.first + (b.units - 1) * (b.dilated + b.active) * b.hw


def _vanilla_by_hand(by_hand, *args) -> tuple[int, list[int]]:
  outside, blocks = by_hand(*args)
  per_block = [_block_dense(b) for b in blocks]
  return outside + sum(per_block), per_block


def _heads_by_hand(blocks, model_type) -> int:
  """Every head at every position: SACT 3x3 local conv + global 1x1."""
  if model_type == 'sact':
    return sum((b.units - 1) * (2 * 9 * b.width * b.hw + 2 * b.width)
               for b in blocks)
  return sum((b.units - 1) * 2 * b.width for b in blocks)


_SMALL = {
    # name: (family, units, base, image size, by-hand function)
    'cifar': ('cifar', (2, 3, 2), 4, 16, _cifar_by_hand),
    'imagenet': ('imagenet', (1, 3, 2, 1), 2, 32, _imagenet_by_hand),
}


@functools.cache
def _small_model(name: str, model_type: str) -> nnx.Module:
  family, units, base, _, _ = _SMALL[name]
  model = tu.build(family, units, model_type, base_channels=base, seed=11)
  model.eval()
  return model


def _small_images(name: str, seed: int = 0) -> jax.Array:
  size = _SMALL[name][3]
  return tu.images((3, size, size, 3), seed=seed)


class ReferenceTableTest(parameterized.TestCase):

  @parameterized.parameters('cifar_resnet32', 'cifar_resnet56',
                            'cifar_resnet110', 'imagenet_resnet50',
                            'imagenet_resnet101')
  def test_vanilla_flops_and_params(self, name):
    entry = _reference_entry(name)
    image_shape = (*entry['image_size'], 3)
    self.assertEqual(flops_lib.vanilla_flops(_model_fn(entry), image_shape),
                     entry['flops'])
    outside, per_block = tu.abstract_block_flops(_model_fn(entry),
                                                 image_shape)
    self.assertEqual(outside, entry['flops_outside_blocks'])
    self.assertEqual(per_block, list(entry['flops_per_block'].values()))
    abstract = nnx.eval_shape(_model_fn(entry))
    self.assertEqual(flops_lib.param_count(abstract),
                     entry['trainable_params'])
    stats = jax.tree.leaves(nnx.state(abstract, nnx.BatchStat))
    self.assertEqual(
        flops_lib.param_count(abstract) + sum(a.size for a in stats),
        entry['params_including_bn_moving_stats'])

  def test_cifar_table_by_hand(self):
    """The by-hand rules reproduce the reference table (CIFAR ResNet-110)."""
    total, per_block = _vanilla_by_hand(_cifar_by_hand, (18, 18, 18), 16,
                                        32, 10)
    entry = _reference_entry('cifar_resnet110')
    self.assertEqual(total, entry['flops'])
    self.assertEqual(per_block, list(entry['flops_per_block'].values()))

  def test_imagenet_table_by_hand(self):
    total, per_block = _vanilla_by_hand(_imagenet_by_hand, (3, 4, 23, 3),
                                        64, 224, 1001)
    entry = _reference_entry('imagenet_resnet101')
    self.assertEqual(total, entry['flops'])
    self.assertEqual(per_block, list(entry['flops_per_block'].values()))

  def test_vanilla_flops_rejects_adaptive_model(self):
    with self.assertRaisesRegex(ValueError, 'needs a vanilla model'):
      flops_lib.vanilla_flops(lambda: create_model(
          'cifar', (2, 2, 2), 'sact', num_classes=10, rngs=nnx.Rngs(0)),
                              (32, 32, 3))


class ForwardFlopsTest(parameterized.TestCase):

  @parameterized.parameters('cifar', 'imagenet')
  def test_vanilla_forward_equals_vanilla_flops(self, name):
    family, units, base, size, by_hand = _SMALL[name]
    expected = _vanilla_by_hand(by_hand, units, base, size, 10)[0]
    self.assertEqual(flops_lib.vanilla_flops(
        lambda: create_model(family, units, 'vanilla', num_classes=10,
                             base_channels=base, rngs=nnx.Rngs(0)),
        (size, size, 3)), expected)
    _, aux = tu.forward(_small_model(name, 'vanilla'), _small_images(name))
    self.assertEqual(aux['flops'].dtype, jnp.float32)
    np.testing.assert_array_equal(aux['flops'], float(expected))

  @parameterized.product(name=('cifar', 'imagenet'),
                         model_type=('act', 'sact'))
  def test_all_running_adds_halting_branch_costs(self, name, model_type):
    """Every position runs every unit: vanilla + every head's cost."""
    family, units, base, size, by_hand = _SMALL[name]
    total = _vanilla_by_hand(by_hand, units, base, size, 10)[0]
    heads = _heads_by_hand(by_hand(units, base, size, 10)[1], model_type)
    self.assertGreater(heads, 0)
    model = nnx.clone(_small_model(name, model_type))
    tu.set_halting_bias(model, -1000.0)
    _, aux = tu.forward(model, _small_images(name))
    for n, num_units in zip(units, aux['num_units']):
      np.testing.assert_array_equal(num_units, n)
    np.testing.assert_array_equal(aux['flops'], float(total + heads))

  @parameterized.product(name=('cifar', 'imagenet'),
                         model_type=('act', 'sact'),
                         middle_halts_at_once=(False, True))
  def test_flops_follow_num_units(self, name, model_type,
                                  middle_halts_at_once):
    """FLOPs recomputed from the halting maps with the reference's masks.

    Unit k >= 2 runs where N >= k: its first conv on the 3x3-dilated set
    (SACT), the rest on the set itself; the head of unit k - 1 runs (ACT) or
    runs its local conv (SACT) where N >= k - 1, the SACT global conv always.
    With `middle_halts_at_once`, block 2 (3 units) halts after unit 1
    everywhere, so the head of unit 2 must not count.
    """
    family, units, base, size, by_hand = _SMALL[name]
    outside, blocks = by_hand(units, base, size, 10)
    model = nnx.clone(_small_model(name, model_type))
    # Biases picked (for these seeds) so that halting spreads over the units
    # and over images or positions; asserted below.
    tu.set_halting_bias(model, 1.0 if family == 'cifar' else 0.0)
    if middle_halts_at_once:
      bias = tu.halting_bias(model.blocks[1].steps.head)
      bias[...] = jnp.full(bias.shape, 1000.0)
    images = _small_images(name)
    _, aux = tu.forward(model, images)
    self.assertEqual(blocks[1].units, 3)
    if middle_halts_at_once:
      np.testing.assert_array_equal(aux['num_units'][1], 1)
    expected = np.full(images.shape[0], outside, np.int64)
    halted_early, varies = False, False
    for b, n_map in zip(blocks, aux['num_units']):
      n_map = np.asarray(n_map, np.int64)
      halted_early |= bool(np.any(n_map < b.units))
      varies |= len(np.unique(n_map)) > 1
      expected += b.first
      for k in range(2, b.units + 1):
        if model_type == 'sact':
          dilated = tu.np_dilate(n_map >= k)
          expected += (np.sum(dilated, axis=(1, 2)) * b.dilated
                       + np.sum(n_map >= k, axis=(1, 2)) * b.active
                       + np.sum(n_map >= k - 1, axis=(1, 2))
                       * 2 * 9 * b.width
                       + 2 * b.width)
        else:
          expected += ((n_map >= k) * (b.dilated + b.active) * b.hw
                       + (n_map >= k - 1) * 2 * b.width)
    self.assertTrue(halted_early)  # Not vacuous.
    self.assertTrue(varies or middle_halts_at_once)
    np.testing.assert_array_equal(np.asarray(aux['flops'], np.int64),
                                  expected)


if __name__ == '__main__':
  absltest.main()
