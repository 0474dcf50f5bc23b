"""benchmarks/gpu_host.sh: bad input ends in one line, status 2, nothing done.

The script runs from a copy in a temporary project root, so that what it
finds there (no wheels) does not depend on this checkout.
"""

import os
import shutil
import subprocess
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

  def _run(self, *args):
    return subprocess.run(
        ['bash', os.path.join(self.root, 'benchmarks', 'gpu_host.sh'),
         *args], capture_output=True, text=True, timeout=60, check=False)

  @parameterized.named_parameters(
      ('no_command', (), 'usage: '),
      ('unknown_command', ('fetch',), 'usage: '),
      ('unknown_phase', ('run', 'OUT', 'backward'),
       'error: PHASE must be train, forward or all, got backward'),
      ('no_wheels', ('run', 'OUT', 'train'), 'error: no wheels in .whl/'),
  )
  def test_bad_input_is_one_line_and_status_2(self, args, start):
    result = self._run(*[self.out if a == 'OUT' else a for a in args])
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stdout, '')
    lines = result.stderr.splitlines()
    self.assertLen(lines, 1)
    self.assertStartsWith(lines[0], start)
    self.assertFalse(os.path.exists(self.out))  # Nothing started.


if __name__ == '__main__':
  absltest.main()
