r"""Matmul rate by row count: what a sparse unit's few rows cost on XLA:CPU.

Run by hand (not a test):

  python -m benchmarks.small_dots

A sparse unit at batch 1 multiplies tens to a hundred gathered rows by a
full weight matrix; the dense unit multiplies all of a map's rows. This
times `x[M, K] @ w[K, N]` for the three matmuls of an ImageNet ResNet-101
unit of block 3 (conv1 1024 -> 256, conv2 as im2col 2304 -> 256, conv3
256 -> 1024) at row counts M from 1 to 196 (the 14x14 map at batch 1),
the shapes interleaved call by call so that the machine's drift hits all
of them alike, and prints the median time and GFLOP/s, as XLA's dot
(`x @ w`) and as the sparse path runs them (`conv.rows_matmul`: oneDNN
under 4096 rows where it reads the weights in place, else the same dot).
Each call reads another of `--weights` copies of the matrix, so that the
weights come from memory as they do in a network's pass. Writes JSON
(`--out`).
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import benchmarks
from sact_jax import conv
from sact_jax import host_memory

_ROWS = flags.DEFINE_list(
    'rows', ['1', '8', '16', '32', '64', '96', '128', '196'], 'Row counts M.')
_REPS = flags.DEFINE_integer('reps', 100, 'Timed calls per shape.')
_WEIGHTS = flags.DEFINE_integer(
    'weights', 16, 'Copies of each weight matrix, used in turn (cold '
    'weights; 1: the same matrix every call, from cache).')
_OUT = flags.DEFINE_string('out', benchmarks.default_out('small_dots.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

# (name, K, N) of the matmuls of one bottleneck unit of block 3.
_SHAPES = (('conv1 1024->256', 1024, 256), ('conv2 2304->256', 2304, 256),
           ('conv3 256->1024', 256, 1024))


def main(argv):
  del argv
  benchmarks.check_positive_ints(_ROWS)
  if _REPS.value < 1 or _WEIGHTS.value < 1:
    raise app.UsageError('--reps and --weights must be >= 1.')
  out = benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)
  host_memory.reuse_freed_memory()
  rng = np.random.default_rng(0)
  impls = {'dot': conv.jit(lambda x, w: x @ w),
           'rows_matmul': conv.jit(conv.rows_matmul)}
  cases = []
  for name, k, n in _SHAPES:
    ws = [jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
          for _ in range(_WEIGHTS.value)]
    for m in (int(r) for r in _ROWS.value):
      x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
      for impl, fn in impls.items():
        for _ in range(5):
          jax.block_until_ready(fn(x, ws[0]))
        cases.append({'matmul': name, 'impl': impl, 'm': m, 'k': k, 'n': n,
                      'fn': fn, 'x': x, 'ws': ws, 'times': []})
  for rep in range(_REPS.value):
    for case in cases:
      w = case['ws'][rep % len(case['ws'])]
      start = time.perf_counter()
      jax.block_until_ready(case['fn'](case['x'], w))
      case['times'].append(time.perf_counter() - start)
  results = []
  print(f'{"matmul":>16} {"rows":>5} {"impl":>12} {"us":>8} {"GFLOP/s":>8}')
  for case in cases:
    median = statistics.median(case['times'])
    rate = 2 * case['m'] * case['k'] * case['n'] / median / 1e9
    print(f'{case["matmul"]:>16} {case["m"]:>5} {case["impl"]:>12} '
          f'{median * 1e6:>8.1f} {rate:>8.1f}')
    results.append({k: case[k] for k in ('matmul', 'impl', 'm', 'k', 'n')}
                   | {'median_s': median, 'gflops': rate})
  benchmarks.write_json(out, {'device': str(jax.devices()[0]),
                              'weights': _WEIGHTS.value, 'results': results})
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
