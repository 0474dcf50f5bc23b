"""The benchmarks refuse bad flags at once, in one line, writing nothing.

A typo in a workload or shape list used to run (timing nothing, or the
wrong thing) and write over a committed results file, or to fail minutes
in with a traceback; a count of 0 wrote NaN, an unwritable output path
failed after the whole run. Every benchmark is run in its own process, as
by hand: their absl flags share names.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl import app
from absl.testing import absltest
from absl.testing import parameterized

import benchmarks

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))

# Each benchmark that writes JSON, with its output flag.
_OUT_FLAGS = {
    'conv_formulations': '--out', 'fused_stages': '--out',
    'gpu_kernels': '--out', 'gpu_overhead': '--out',
    'in_place_kernels': '--out', 'input_pipeline': '--out',
    'row_windows': '--out', 'small_dots': '--out', 'sparse_ab': '--output',
    'sparse_inference': '--out', 'train_step': '--out',
    'train_throughput': '--json_out', 'vs_original': '--output',
}


def _run(module: str, *args: str, cwd: str = _ROOT
         ) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', f'benchmarks.{module}', *args], cwd=cwd,
      capture_output=True, text=True, check=False, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT))


def _python(code: str) -> subprocess.CompletedProcess:
  """`code` in a process of its own (its absl flags apart), from _ROOT."""
  return subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code)], cwd=_ROOT,
      capture_output=True, text=True, check=False, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT))


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
      # Counts of 0: NaN in the JSON, or a traceback after compiling.
      ('conv_formulations', '--repeats=0', '--out'),
      ('train_step', '--repeats=0', '--out'),
      ('train_step', '--batch_size=0', '--out'),
      ('row_windows', '--reps=0', '--out'),
      ('in_place_kernels', '--reps=-3', '--out'),
      ('sparse_inference', '--reps=0', '--out'),
      ('sparse_inference', '--reps_large=0', '--out'),
      ('train_throughput', '--steps=0', '--json_out'),
      ('train_throughput', '--warmup_steps=-1', '--json_out'),
      ('vs_original', '--processes=0', '--output'),
      ('vs_original', '--reps=0', '--output'),
      # train_throughput: input_pipeline's flags it used to ignore.
      ('train_throughput', '--batch_size=2', '--json_out'),
      ('train_throughput', '--datasets=cifar10_mock', '--json_out'),
      ('train_throughput', '--workers=x', '--json_out'),
      # gpu_overhead checked none (GPU time is rationed).
      ('gpu_overhead', '--families=cifr', '--out'),
      ('gpu_overhead', '--forward_batches=0', '--out'),
      ('gpu_overhead', '--forward_variants=bogus', '--out'),
      ('gpu_overhead', '--train_batches=cifar', '--out'),
      ('gpu_overhead', '--train_variants=bogus', '--out'),
      ('gpu_overhead', '--model_types=vanila', '--out'),
      ('gpu_overhead', '--rounds=0', '--out'),
      # input_pipeline checked none.
      ('input_pipeline', '--datasets=bogus', '--out'),
      ('input_pipeline', '--batch_size=0', '--out'),
      ('input_pipeline', '--workers=x', '--out'),
      ('input_pipeline', '--batches=0', '--out'),
      # A block past the family's blocks failed after the timings.
      ('sparse_inference', '--unit_breakdown_block=7', '--out'),
      ('sparse_inference', '--unit_breakdown_block=-2', '--out'),
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

  def test_train_throughput_refuses_out_and_names_json_out(self):
    with tempfile.TemporaryDirectory() as tmp:
      out, json_out = (os.path.join(tmp, name) for name in ('o', 'j'))
      proc = _run('train_throughput', f'--out={out}',
                  f'--json_out={json_out}')
      self.assertNotEqual(proc.returncode, 0)
      self.assertEqual(os.listdir(tmp), [])
    self.assertNotIn('Traceback', proc.stderr)
    self.assertIn('--out', proc.stderr.splitlines()[-1])
    self.assertIn('--json_out', proc.stderr.splitlines()[-1])

  @parameterized.parameters(sorted(_OUT_FLAGS.items()))
  def test_unwritable_output_is_refused_before_any_work(self, module,
                                                        out_flag):
    # A regular file where the folder should be: root can write anywhere
    # else. It used to fail after the whole run (sparse_ab: 38 s of it).
    with tempfile.TemporaryDirectory() as tmp:
      open(os.path.join(tmp, 'afile'), 'w').close()
      out = os.path.join(tmp, 'afile', 'x.json')
      args = {'sparse_ab': ['--family=cifar'],
              'gpu_kernels': ['--programs=forward:cifar:1']}.get(module, [])
      proc = _run(module, *args, f'{out_flag}={out}')
    self.assertNotEqual(proc.returncode, 0)
    self.assertEqual(proc.stdout, '')
    self.assertNotIn('Traceback', proc.stderr)
    last = proc.stderr.splitlines()[-1]
    self.assertIn(out_flag, last)
    self.assertIn('cannot be written', last)


class GpuKernelsTest(absltest.TestCase):

  def test_without_the_cuda_plugin_one_line_no_output(self):
    # What JAX raises where jax[cuda] is not installed, made to happen
    # wherever the test runs.
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'out.json')
      proc = _python(f"""
          from absl import app
          from jax.experimental import topologies
          def no_plugin(**unused_kwargs):
            raise NotImplementedError('topology not implemented for cuda')
          topologies.get_topology_desc = no_plugin
          from benchmarks import gpu_kernels
          app.run(gpu_kernels.main, argv=[
              'gpu_kernels', '--programs=forward:cifar:1',
              '--model_types=vanilla', '--out={out}'])
          """)
      self.assertNotEqual(proc.returncode, 0)
      self.assertFalse(os.path.exists(out))
    self.assertNotIn('Traceback', proc.stderr)
    self.assertIn("needs JAX's CUDA plugin", proc.stderr.splitlines()[-1])


class HelpTest(parameterized.TestCase):

  @parameterized.parameters(
      # Defined in benchmarks/__init__.py: only under --helpfull before.
      ('train_step', ('--cache_dir', '--reuse_freed_memory', '--overwrite')),
      ('sparse_inference', ('--cache_dir', '--reuse_freed_memory')),
      # input_pipeline's flags that train_throughput uses.
      ('train_throughput', ('--workers', '--data_dir', '--warmup_batches',
                            '--batches', '--overwrite')),
  )
  def test_help_lists_the_flags_that_apply(self, module, names):
    proc = _run(module, '--help')
    for name in names:
      self.assertRegex(proc.stdout, rf'\n  --(\[no\])?{name[2:]}[:=]')

  @parameterized.parameters('train_step', 'conv_formulations', 'gpu_kernels',
                            'gpu_overhead', 'vs_original')
  def test_default_output_is_in_this_tree_wherever_run_from(self, module):
    # These resolved benchmarks/results/ against the working directory.
    with tempfile.TemporaryDirectory() as tmp:
      proc = _run(module, '--help', cwd=tmp)
    path = os.path.join(_ROOT, 'benchmarks', 'results', f'{module}.json')
    # Absl wraps the help: a long path may start a line of its own.
    self.assertIn(f"(default:{path!r})", ''.join(proc.stdout.split()))


class OutputTest(absltest.TestCase):

  def test_write_json_refuses_nan_and_keeps_the_file(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'r.json')
      benchmarks.write_json(path, {'step_s': 1.0})
      with self.assertRaises(ValueError):
        benchmarks.write_json(path, {'step_s': float('nan')})
      self.assertEqual(os.listdir(tmp), ['r.json'])  # No temporary left.
      with open(path) as f:
        self.assertEqual(json.load(f), {'step_s': 1.0})

  def test_check_output_makes_the_folder(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'a', 'b', 'r.json')
      self.assertEqual(benchmarks.check_output(path), path)
      self.assertTrue(os.path.isdir(os.path.dirname(path)))
      self.assertFalse(os.path.exists(path))

  def test_check_output_refuses_a_directory_or_nothing(self):
    with tempfile.TemporaryDirectory() as tmp:
      for path in (tmp, ''):
        with self.assertRaisesRegex(app.UsageError, '^--out'):
          benchmarks.check_output(path)

  @absltest.skipIf(shutil.which('git') is None, 'needs git')
  def test_a_file_git_tracks_needs_overwrite(self):
    # A default run used to replace the committed result it wrote to.
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run(['git', 'init', '-q', tmp], check=True)
      tracked, other = (os.path.join(tmp, n) for n in ('t.json', 'u.json'))
      for path in (tracked, other):
        with open(path, 'w') as f:
          f.write('{}')
      subprocess.run(['git', 'add', 't.json'], cwd=tmp, check=True)
      with self.assertRaisesRegex(app.UsageError, 'git tracks.*--overwrite'):
        benchmarks.check_output(tracked, 'output')
      self.assertEqual(benchmarks.check_output(tracked, overwrite=True),
                       tracked)
      self.assertEqual(benchmarks.check_output(other), other)


class FixesTest(absltest.TestCase):

  def test_train_throughput_times_steps_without_warm_up(self):
    # 0 warm-up steps ended in UnboundLocalError.
    proc = _python("""
        from absl import flags
        from benchmarks import train_throughput
        from sact_jax import parallel
        flags.FLAGS(['x', '--warmup_steps=0', '--steps=2'])
        parallel.shard_batch = lambda batch, mesh: batch
        class Trainer:
          mesh = None
          def train_step(self, state, batch):
            return state + batch, {'loss': state}
        seconds, state = train_throughput._time_steps(
            Trainer(), 0, iter([1, 1, 1]))
        print(state, seconds >= 0)
        """)
    self.assertEqual(proc.stdout.split(), ['2', 'True'], proc.stderr)

  def test_gpu_kernels_ratios_to_vanilla_whatever_the_order(self):
    # With vanilla listed last the others' ratios were null. The compile
    # for the CUDA target is replaced by stand-in counts.
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'out.json')
      proc = _python(f"""
          import jax
          from absl import app
          from jax.experimental import topologies
          from benchmarks import gpu_kernels
          from benchmarks import hlo_counts
          topologies.get_topology_desc = lambda **unused_kwargs: None
          topologies.make_mesh = lambda *unused_args: jax.make_mesh(
              (1,), ('x',))
          gpu_kernels.compile_program = lambda kind, family, model_type, *_: (
              model_type)
          hlo_counts.count_kernels = lambda hlo: dict(
              kernels={{'vanilla': 100, 'sact': 150}}[hlo], read_mb=1.0,
              written_mb=1.0 if hlo == 'vanilla' else 3.0, loop_bodies=[],
              sources=[])
          app.run(gpu_kernels.main, argv=[
              'gpu_kernels', '--programs=forward:cifar:1',
              '--model_types=sact,vanilla', '--out={out}'])
          """)
      self.assertEqual(proc.returncode, 0, proc.stderr)
      with open(out) as f:
        rows = {r['model_type']: r for r in json.load(f)['rows']}
    self.assertEqual(rows['sact']['vs_vanilla'], 1.5)
    self.assertEqual(rows['sact']['bytes_vs_vanilla'], 2.0)

  def test_gpu_overhead_profile_without_kernel_rows_says_so(self):
    # XLA:CPU's profile: it reported "0 kernels, 0.000 ms per call".
    with tempfile.TemporaryDirectory() as tmp:
      folder = os.path.join(tmp, 'plugins', 'profile', 'run')
      os.makedirs(folder)
      with gzip.open(os.path.join(folder, 'h.trace.json.gz'), 'wt') as f:
        json.dump({'traceEvents': [
            {'ph': 'M', 'name': 'process_name', 'pid': 1,
             'args': {'name': '/host:CPU'}},
            {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'fusion', 'dur': 5}]},
                  f)
      proc = _python(f"""
          import json
          from benchmarks import gpu_overhead
          print(json.dumps(gpu_overhead.kernel_summary({tmp!r}, 1)))
          """)
    self.assertEqual(json.loads(proc.stdout.splitlines()[-1]),
                     {'error': 'no per-kernel rows on this backend'},
                     proc.stderr)


if __name__ == '__main__':
  absltest.main()
