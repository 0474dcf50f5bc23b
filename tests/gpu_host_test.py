"""benchmarks/gpu_host.sh: bad input ends in one line, status 2, nothing done.

The script runs from a copy in a temporary project root, so that what it
finds there (no wheels, or stand-in wheels) does not depend on this
checkout; PYTHON is this test's Python, whose version the wheels are made
to miss or fit.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       'benchmarks', 'gpu_host.sh')


class GpuHostTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    os.mkdir(os.path.join(self.root, 'benchmarks'))
    shutil.copy(_SCRIPT, os.path.join(self.root, 'benchmarks'))
    self.out = os.path.join(self.root, 'out')

  def _run(self, *args, wheels=()):
    if wheels:
      os.mkdir(os.path.join(self.root, '.whl'))
    for name in wheels:  # Names only: nothing gets as far as installing.
      open(os.path.join(self.root, '.whl', name), 'w').close()
    # No GPU, whatever the machine has: an nvidia-smi that lists none.
    bin_dir = os.path.join(self.root, 'bin')
    os.makedirs(bin_dir, exist_ok=True)
    with open(os.path.join(bin_dir, 'nvidia-smi'), 'w') as f:
      f.write('#!/bin/sh\nexit 9\n')
    os.chmod(os.path.join(bin_dir, 'nvidia-smi'), 0o755)
    env = dict(os.environ, PYTHON=sys.executable,
               PATH=bin_dir + os.pathsep + os.environ['PATH'])
    env.pop('GPU_HOST_ALLOW_CPU', None)
    return subprocess.run(
        ['bash', os.path.join(self.root, 'benchmarks', 'gpu_host.sh'),
         *args], capture_output=True, text=True, timeout=120, check=False,
        env=env)

  @parameterized.named_parameters(
      ('no_command', (), 'usage: '),
      ('unknown_command', ('fetch',), 'usage: '),
      ('unknown_phase', ('run', 'OUT', 'backward'),
       'error: PHASE must be train, forward or all, got backward'),
      ('no_wheels', ('run', 'OUT', 'train'), 'error: no wheels in .whl/'),
  )
  def test_bad_input_is_one_line_and_status_2(self, args, start):
    result = self._run(*[self.out if a == 'OUT' else a for a in args])
    self._assert_refused(result, start)

  def _assert_refused(self, result, start):
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stdout, '')
    lines = result.stderr.splitlines()
    self.assertLen(lines, 1)
    self.assertStartsWith(lines[0], start)
    self.assertFalse(os.path.exists(self.out))  # Nothing started.

  def test_wheels_for_another_python_are_refused(self):
    # They failed in pip, with OUT already made. cp30: no Python runs it.
    wheel = 'grain-0.2.18-cp30-cp30-manylinux2014_x86_64.whl'
    result = self._run('run', self.out, 'train',
                       wheels=('toml-0.10.2-py2.py3-none-any.whl', wheel))
    self._assert_refused(result, f'error: .whl/{wheel} does not suit ')
    version = '%d.%d' % sys.version_info[:2]
    self.assertIn(f'gpu_host.sh wheels {version}`', result.stderr)

  def test_no_gpu_is_refused(self):
    # gpu_overhead would have timed the CPU until the limit.
    result = self._run('run', self.out, 'train',
                       wheels=('toml-0.10.2-py2.py3-none-any.whl',))
    self._assert_refused(result, 'error: no GPU here')
    self.assertIn('GPU_HOST_ALLOW_CPU=1', result.stderr)

  def test_help_is_usage_and_status_0(self):
    result = self._run('--help')
    self.assertEqual(result.returncode, 0)
    self.assertStartsWith(result.stdout, 'usage: ')
    self.assertEqual(result.stderr, '')


if __name__ == '__main__':
  absltest.main()
