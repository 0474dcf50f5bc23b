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


def _server(name: str, log: str, body: str = '',
            workloads: str = 'work', sleep: float = 0.0) -> list[str]:
  """A server whose workloads append `name` (then the workload's name, if
  there are several) to `log` when they run, after `sleep` seconds."""
  code = textwrap.dedent(f"""
      import os, sys, time
      sys.path.insert(0, {os.path.abspath(_BENCHMARKS)!r})
      import lockstep
      {body}
      def call(workload):
        time.sleep({sleep})
        with open({log!r}, 'a') as f:
          f.write({name!r} + (workload if {',' in workloads} else ''))
      names = {workloads.split(',')!r}
      lockstep.serve({{w: lambda w=w: call(w) for w in names}},
                     {{'name': {name!r},
                       'cpus': sorted(os.sched_getaffinity(0))}})
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
      cpus = sorted(os.sched_getaffinity(0))
      self.assertEqual(
          [c.ready() for c in clients],
          [{'ready': True, 'workloads': ['work'], 'name': n, 'cpus': cpus}
           for n in 'ab'])
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

  def test_a_server_runs_in_its_working_directory(self):
    workdir = os.path.dirname(self.log)
    client = lockstep.Client('a', _server('a', 'relative_log'),
                             dict(os.environ), cwd=workdir)
    try:
      client.ready()
    finally:
      client.close()
    # The warm-up's two calls, logged to a path relative to its directory.
    with open(os.path.join(workdir, 'relative_log')) as f:
      self.assertEqual(f.read(), 'aa')

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

  def test_run_with_a_name_times_that_workload_alone(self):
    client = lockstep.Client(
        'a', _server('a', self.log, workloads='x,y'), dict(os.environ))
    try:
      self.assertEqual(client.ready()['workloads'], ['x', 'y'])
      os.remove(self.log)
      client.send('y')
      self.assertEqual(set(client.receive()), {'y'})
      self.assertEqual(set(client.run()), {'x', 'y'})
      client.send('z')
      with self.assertRaisesRegex(lockstep.ServerError,
                                  "unknown command 'run z'"):
        client.receive()
    finally:
      client.close()
    with open(self.log) as f:
      self.assertEqual(f.read(), 'ayaxay')

  def test_shards_run_each_workload_together_on_their_cpus(self):
    cpu = min(os.sched_getaffinity(0))  # Any machine has one to pin to.
    sharded = lockstep.ShardedClient(
        'jax', [_server(str(k), self.log, workloads='x,y', sleep=0.1 * k)
                for k in range(2)], dict(os.environ), [{cpu}, {cpu}])
    try:
      info = sharded.ready()
      self.assertEqual(info['workloads'], ['x', 'y'])
      self.assertEqual([s['name'] for s in info['shards']], ['0', '1'])
      self.assertEqual([s['cpus'] for s in info['shards']], [[cpu], [cpu]])
      os.remove(self.log)
      out = lockstep.rounds([sharded], 2)
    finally:
      sharded.close()
    with open(self.log) as f:
      calls = f.read()
    # Both shards' x before either's y, in both rounds.
    self.assertEqual([sorted(calls[i:i + 4]) for i in range(0, 16, 4)],
                     [['0', '1', 'x', 'x'], ['0', '1', 'y', 'y']] * 2)
    for r in out:  # The slowest shard's time (shard 1 sleeps 0.1 s).
      self.assertEqual(set(r['jax']), {'x', 'y'})
      self.assertGreaterEqual(min(r['jax'].values()), 0.1)

  def test_cpu_shards_deal_this_process_cpus(self):
    cpus = os.sched_getaffinity(0)
    shards = lockstep.cpu_shards(len(cpus))
    self.assertEqual([len(s) for s in shards], [1] * len(cpus))
    self.assertEqual(set().union(*shards), cpus)
    self.assertEqual(lockstep.cpu_shards(1), [cpus])
    with self.assertRaisesRegex(ValueError, 'so 1 to'):
      lockstep.cpu_shards(len(cpus) + 1)

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
