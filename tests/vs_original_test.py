"""benchmarks/vs_original.py: the lockstep servers' commands, one per shard.

The TF servers need the TF port and minutes; what is checked here is what
each shard is told to run: its part of the batch, its threads, and (for the
claim) the whole batch for tuning the halting; that the JAX side serves
a training step; and that a run without the TF port says, and records,
that it ran no lockstep. The module runs in its own process: its absl flags share
names with other benchmarks' that tests import (`sparse_inference`).
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized

from benchmarks import lockstep

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _server_commands(config: str, *args) -> tuple[list[str], list[str]]:
  """`vs_original._server_commands(config, '/tfref', *args)`, run apart."""
  code = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {_ROOT!r})
      from absl import flags
      from benchmarks import vs_original
      flags.FLAGS.mark_as_parsed()  # The commands read flags' defaults.
      print(json.dumps(vs_original._server_commands(
          {config!r}, '/tfref', *{args!r})))
      """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True).stdout
  return tuple(json.loads(out.splitlines()[-1]))


def _flag(command: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in command
            if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, command)
  return values[0]


class ServerCommandsTest(parameterized.TestCase):

  def test_claim_shard_serves_its_half_tuned_on_the_whole_batch(self):
    tf, jax_side = _server_commands('claim:32:0.5', 1, ({0}, {1}))
    self.assertEqual(_flag(tf, 'batch'), '16')
    self.assertEqual(_flag(tf, 'threads'), '1')
    self.assertEqual(_flag(jax_side, 'batch_sizes'), '32')
    self.assertEqual(_flag(jax_side, 'shard'), '1/2')
    self.assertIn('--serve', jax_side)

  def test_infer_shard_is_the_workload_at_its_part_of_the_batch(self):
    tf, jax_side = _server_commands('infer:imagenet:101:sact:32:never', 0,
                                    ({0, 2}, {1, 3}))
    self.assertEqual(_flag(tf, 'batch'), '16')
    self.assertEqual(_flag(tf, 'threads'), '2')
    self.assertEqual(_flag(jax_side, 'worker'),
                     'infer:imagenet:101:sact:16:never')

  @parameterized.parameters(('claim:32:0.5', '32'),
                            ('infer:cifar:110:act:1:first', '1'))
  def test_without_shards_one_server_per_side_with_two_threads(
      self, config, batch):
    tf, jax_side = _server_commands(config)
    self.assertEqual(_flag(tf, 'batch'), batch)
    self.assertEqual(_flag(tf, 'threads'), '2')
    if config.startswith('claim'):
      self.assertEqual(_flag(jax_side, 'shard'), '0/1')
    else:
      self.assertEqual(_flag(jax_side, 'worker'), config)

  @parameterized.parameters((), (1, ({0}, {1})))
  def test_train_row_is_one_server_per_side_even_with_shards(self, *args):
    tf, jax_side = _server_commands('train:110:act:128:3', *args)
    self.assertIn('--train', tf)
    self.assertEqual(_flag(tf, 'family'), 'cifar')
    self.assertEqual(_flag(tf, 'depth'), '110')
    self.assertEqual(_flag(tf, 'model_type'), 'act')
    self.assertEqual(_flag(tf, 'batch'), '128')
    self.assertEqual(_flag(jax_side, 'worker'), 'train:110:act:128:3')
    self.assertIn('--serve', jax_side)


class WithoutTfTest(absltest.TestCase):

  def test_says_and_records_that_lockstep_was_not_applied(self):
    # Without the TF venv --lockstep was dropped with no word of it.
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'vs_original.json')
      proc = subprocess.run(
          [sys.executable, '-m', 'benchmarks.vs_original', '--lockstep',
           f'--tfref_dir={os.path.join(tmp, "none")}', '--reps=1',
           '--configs=infer:cifar:20:vanilla:1:never',
           '--compilation_cache=false', f'--output={out}'],
          cwd=_ROOT, capture_output=True, text=True, check=False,
          timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
      self.assertEqual(proc.returncode, 0, proc.stderr)
      with open(out) as f:
        settings = json.load(f)['settings']
    self.assertIn('without --lockstep', proc.stderr)
    self.assertEqual((settings['tf'], settings['lockstep'],
                      settings['reps'], settings['processes']),
                     (False, False, 1, 1))


class TrainServerTest(absltest.TestCase):

  def test_jax_side_serves_a_training_step(self):
    _, command = _server_commands('train:20:sact:2:1')
    command.append('--compilation_cache=false')  # Nothing written to HOME.
    client = lockstep.Client('jax', command, dict(
        os.environ, JAX_PLATFORMS='cpu'), cwd=_ROOT)
    try:
      self.assertEqual(client.ready()['workloads'], ['dense'])
      times = [client.run()['dense'] for _ in range(2)]
    finally:
      client.close()
    self.assertTrue(all(0.0 < t < 60.0 for t in times), times)


if __name__ == '__main__':
  absltest.main()
