r"""Matmul rate by row count: what a sparse unit's few rows cost on XLA:CPU.

Run by hand (not a test):

  python -m benchmarks.small_dots

A sparse unit at batch 1 multiplies tens to a hundred gathered rows by a
full weight matrix; the dense unit multiplies all of a map's rows. This
times `x[M, K] @ w[K, N]` for the three matmuls of an ImageNet ResNet-101
unit of block 3 (conv1 1024 -> 256, conv2 as im2col 2304 -> 256, conv3
256 -> 1024) at row counts M from 1 to 196 (the 14x14 map at batch 1),
the shapes interleaved call by call so that the machine's drift hits all
of them alike, and prints the median time and GFLOP/s. Writes JSON
(`--out`).
"""

import os
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
_OUT = flags.DEFINE_string(
    'out', os.path.join(os.path.dirname(__file__), 'results',
                        'small_dots.json'), 'JSON output path.')

# (name, K, N) of the matmuls of one bottleneck unit of block 3.
_SHAPES = (('conv1 1024->256', 1024, 256), ('conv2 2304->256', 2304, 256),
           ('conv3 256->1024', 256, 1024))


def main(argv):
  del argv
  host_memory.reuse_freed_memory()
  rng = np.random.default_rng(0)
  dot = conv.jit(lambda x, w: x @ w)
  cases = []
  for name, k, n in _SHAPES:
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    for m in (int(r) for r in _ROWS.value):
      x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
      for _ in range(5):
        jax.block_until_ready(dot(x, w))
      cases.append({'matmul': name, 'm': m, 'k': k, 'n': n, 'args': (x, w),
                    'times': []})
  for _ in range(_REPS.value):
    for case in cases:
      start = time.perf_counter()
      jax.block_until_ready(dot(*case['args']))
      case['times'].append(time.perf_counter() - start)
  results = []
  print(f'{"matmul":>16} {"rows":>5} {"us":>8} {"GFLOP/s":>8}')
  for case in cases:
    median = statistics.median(case['times'])
    rate = 2 * case['m'] * case['k'] * case['n'] / median / 1e9
    print(f'{case["matmul"]:>16} {case["m"]:>5} {median * 1e6:>8.1f} '
          f'{rate:>8.1f}')
    results.append({k: case[k] for k in ('matmul', 'm', 'k', 'n')}
                   | {'median_s': median, 'gflops': rate})
  benchmarks.write_json(_OUT.value, {'device': str(jax.devices()[0]),
                                     'results': results})
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
