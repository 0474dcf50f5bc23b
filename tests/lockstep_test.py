"""benchmarks/lockstep.py: servers that take turns, and the driver's ratios."""

import importlib.util
import os
import sys
import tempfile
import textwrap

from absl.testing import absltest

_BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir,
                           'benchmarks')


def _lockstep():
  """benchmarks/lockstep.py as a module (benchmarks are not installed)."""
  spec = importlib.util.spec_from_file_location(
      'lockstep', os.path.join(_BENCHMARKS, 'lockstep.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lockstep = _lockstep()


def _server(name: str, log: str, body: str = '') -> list[str]:
  """A server whose one workload appends `name` to `log` when it runs."""
  code = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.abspath(_BENCHMARKS)!r})
      import lockstep
      {body}
      def call():
        with open({log!r}, 'a') as f:
          f.write({name!r})
      lockstep.serve({{'work': call}}, {{'name': {name!r}}})
      """)
  return [sys.executable, '-c', code]


class LockstepTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.log = os.path.join(tmp.name, 'calls')

  def test_servers_take_turns_in_alternating_order(self):
    clients = [lockstep.Client(n, _server(n, self.log), dict(os.environ))
               for n in 'ab']
    try:
      self.assertEqual([c.ready() for c in clients],
                       [{'ready': True, 'name': 'a'},
                        {'ready': True, 'name': 'b'}])
      with open(self.log) as f:  # Warm-up: two calls each.
        self.assertEqual(sorted(f.read()), list('aabb'))
      os.remove(self.log)
      out = lockstep.rounds(clients, 4)
    finally:
      for c in clients:
        c.close()
    with open(self.log) as f:
      self.assertEqual(f.read(), 'abbaabba')
    self.assertLen(out, 4)
    for r in out:
      self.assertEqual(set(r), {'a', 'b'})
      self.assertEqual(set(r['a']), {'work'})
      self.assertGreater(r['a']['work'], 0.0)

  def test_a_server_that_fails_reports_its_last_error_line(self):
    client = lockstep.Client(
        'bad', _server('x', self.log, "raise ValueError('no such model')"),
        dict(os.environ))
    try:
      with self.assertRaisesRegex(lockstep.ServerError,
                                  "bad exited with 1: ValueError: no such"):
        client.ready()
    finally:
      client.close()

  def test_unknown_command_is_an_error(self):
    client = lockstep.Client('a', _server('a', self.log), dict(os.environ))
    try:
      client.ready()
      client._proc.stdin.write('walk\n')  # pylint: disable=protected-access
      client._proc.stdin.flush()  # pylint: disable=protected-access
      with self.assertRaisesRegex(lockstep.ServerError, "unknown command"):
        client._read()  # pylint: disable=protected-access
      self.assertIn('work', client.run())  # It still serves.
    finally:
      client.close()

  def test_median_ratio_is_taken_per_round(self):
    per_round = [{'tf': {'dense': 2.0}, 'jax': {'dense': 1.0}},
                 {'tf': {'dense': 6.0}, 'jax': {'dense': 2.0}},
                 {'tf': {'dense': 4.0}, 'jax': {'dense': 1.0}}]
    # Per round 2, 3, 4: median 3; the medians' ratio would be 4 / 1 = 4.
    self.assertEqual(
        lockstep.median_ratio(per_round, ('tf', 'dense'), ('jax', 'dense')),
        3.0)
    self.assertIsNone(
        lockstep.median_ratio(per_round, ('tf', 'sparse'), ('jax', 'dense')))


if __name__ == '__main__':
  absltest.main()
