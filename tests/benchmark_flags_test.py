"""The benchmarks refuse bad flags at once, in one line, writing nothing.

A typo in a workload or shape list used to run (timing nothing, or the
wrong thing) and write over a committed results file, or to fail minutes
in with a traceback. Every benchmark is run in its own process, as by hand:
their absl flags share names.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', f'benchmarks.{module}', *args], cwd=_ROOT,
      capture_output=True, text=True, check=False, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _parse(*configs: str) -> list:
  """`vs_original.parse` of each config: its dict or its error's text."""
  code = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {_ROOT!r})
      from absl import app
      from benchmarks import vs_original
      out = []
      for config in {configs!r}:
        try:
          out.append(vs_original.parse(config))
        except app.UsageError as e:
          out.append(str(e))
      print(json.dumps(out))
      """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True).stdout
  return json.loads(out.splitlines()[-1])


class VsOriginalParseTest(absltest.TestCase):

  def test_bad_entries_name_the_entry_and_what_is_allowed(self):
    errors = _parse('infer:cifr:110:act:1:never', 'bogus:1',
                    'infer:cifar:111:act:1:never', 'train:32:vanila:128:5',
                    'train:32:sact:x:3', 'train:32:sact:2:1:bad',
                    'infer:imagenet:101:act:1:sometimes', 'claim:1:0',
                    'claim:1', 'infer:cifar:110:act:0:never')
    for error, allowed in zip(errors, (
        'cifar, imagenet', 'claim:BATCH:FRACTION', '20, 32, 56, 110',
        'vanilla, act, sact', 'integer >= 1', 'scan, unrolled',
        'never, first', '(0, 1]', 'claim:BATCH:FRACTION', 'integer >= 1')):
      self.assertIsInstance(error, str)
      self.assertStartsWith(error, '--configs entry ')
      self.assertIn(allowed, error)
      self.assertNotIn('\n', error)

  def test_good_entries(self):
    train, infer, claim = _parse('train:20:vanilla:2:1',
                                 'infer:imagenet:50:sact:4:first:112',
                                 'claim:32:0.5')
    self.assertEqual(train['variant'], 'scan')
    self.assertEqual((infer['depth'], infer['size'], infer['halt']),
                     (50, 112, 'first'))
    self.assertEqual((claim['batch'], claim['fraction']), (32, 0.5))


class BadFlagsTest(parameterized.TestCase):

  @parameterized.parameters(
      ('vs_original', '--configs=infer:cifr:110:act:1:never', '--output'),
      ('vs_original', '--configs=bogus:1', '--output'),
      ('conv_formulations', '--shapes=cifr', '--out'),
      ('conv_formulations', '--formulations=bogus', '--out'),
      ('conv_formulations', '--options=trainig', '--out'),
      ('train_step', '--variants=bogus', '--out'),
      ('gpu_kernels', '--programs=forward:cifr:1', '--out'),
      ('sparse_inference', '--families=cifr', '--out'),
      ('in_place_kernels', '--configs=cifar:110:sact', '--out'),
      ('small_dots', '--rows=abc', '--out'),
      ('fused_stages', '--fraction=0', '--out'),
  )
  def test_one_line_no_output(self, module, bad, out_flag):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'out.json')
      proc = _run(module, bad, f'{out_flag}={out}')
      self.assertNotEqual(proc.returncode, 0)
      self.assertFalse(os.path.exists(out))
    self.assertEqual(proc.stdout, '')
    self.assertNotIn('Traceback', proc.stderr)
    # Absl prints the usage, then the error: one line naming the flag.
    self.assertIn(bad.split('=')[0][2:], proc.stderr.splitlines()[-1])


if __name__ == '__main__':
  absltest.main()
