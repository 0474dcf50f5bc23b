"""benchmarks/vs_original.py: the lockstep servers' commands, one per shard.

The servers themselves need the TF port and minutes; what is checked here
is what each shard is told to run: its part of the batch, its threads, and
(for the claim) the whole batch for tuning the halting.
"""

import os
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from benchmarks import vs_original  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flag(command: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in command
            if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, command)
  return values[0]


class ServerCommandsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not flags.FLAGS.is_parsed():  # The commands read flags' defaults.
      flags.FLAGS.mark_as_parsed()

  def test_claim_shard_serves_its_half_tuned_on_the_whole_batch(self):
    tf, jax_side = vs_original._server_commands(  # pylint: disable=protected-access
        'claim:32:0.5', '/tfref', 1, ({0}, {1}))
    self.assertEqual(_flag(tf, 'batch'), '16')
    self.assertEqual(_flag(tf, 'threads'), '1')
    self.assertEqual(_flag(jax_side, 'batch_sizes'), '32')
    self.assertEqual(_flag(jax_side, 'shard'), '1/2')
    self.assertIn('--serve', jax_side)

  def test_infer_shard_is_the_workload_at_its_part_of_the_batch(self):
    tf, jax_side = vs_original._server_commands(  # pylint: disable=protected-access
        'infer:imagenet:101:sact:32:never', '/tfref', 0, ({0, 2}, {1, 3}))
    self.assertEqual(_flag(tf, 'batch'), '16')
    self.assertEqual(_flag(tf, 'threads'), '2')
    self.assertEqual(_flag(jax_side, 'worker'),
                     'infer:imagenet:101:sact:16:never')

  @parameterized.parameters('claim:32:0.5', 'infer:cifar:110:act:1:first')
  def test_without_shards_one_server_per_side_with_two_threads(self, config):
    tf, jax_side = vs_original._server_commands(config, '/tfref')  # pylint: disable=protected-access
    batch = vs_original.parse(config)['batch']
    self.assertEqual(_flag(tf, 'batch'), str(batch))
    self.assertEqual(_flag(tf, 'threads'), '2')
    if config.startswith('claim'):
      self.assertEqual(_flag(jax_side, 'shard'), '0/1')
    else:
      self.assertEqual(_flag(jax_side, 'worker'), config)


if __name__ == '__main__':
  absltest.main()
