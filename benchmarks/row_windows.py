r"""Gathers and pools of the sparse path and the stem, XLA's against ours.

Run by hand (not a test):

  python -m benchmarks.row_windows

Times, interleaved call by call so that the machine's drift hits all of
them alike (median of `--reps` calls):

* the 3x3 row windows of a sparse unit's active stage, reshaped into the
  matmul's rows as `layers.patch_conv` does: XLA's gather
  (`sparse.rows.patches` under `onednn.disabled()`) against the custom call
  that copies rows (`onednn.row_patches`, what `patches` runs on the CPU),
  at the maps and chunk sizes of ImageNet ResNet-101 (blocks 1-3);
* the ImageNet stem's 3x3 / 2 max pool at batch 1 and 32: flax's 2-D
  `max_pool` against `layers.max_pool` (two 1-D passes on the CPU).

Writes JSON (`--out`).
"""

import statistics
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import benchmarks
from sact_jax import conv
from sact_jax import host_memory
from sact_jax import layers
from sact_jax import onednn
from sact_jax.sparse import rows

_REPS = flags.DEFINE_integer('reps', 100, 'Timed calls per case.')
_OUT = flags.DEFINE_string('out', benchmarks.default_out('row_windows.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

# (map side, channels of the dilated map, batch, rows) of the gathers.
_WINDOWS = ((56, 64, 1, 128), (28, 128, 1, 128), (14, 256, 1, 16),
            (14, 256, 1, 128), (28, 128, 32, 512), (14, 256, 32, 512))


def _window_cases(rng) -> list[dict]:
  cases = []
  for side, channels, batch, count in _WINDOWS:
    num_rows = batch * side * side
    src = jnp.asarray(rng.normal(size=(num_rows + 1, channels)), jnp.float32)
    idx = jnp.asarray(np.sort(rng.choice(num_rows, count, replace=False)),
                      jnp.int32)
    def windows(src, idx, side=side, num_rows=num_rows):
      patches, _ = rows.patches(src, idx, 3, height=side, width=side,
                                num_rows=num_rows)
      return patches.reshape(patches.shape[0], -1)
    with onednn.disabled():  # Traced now: XLA's gather.
      xla = conv.jit(lambda *args, f=windows: f(*args))
      jax.block_until_ready(xla(src, idx))
    ours = conv.jit(windows)
    name = f'{side}x{side}x{channels} batch {batch}, {count} rows'
    cases.append({'case': name, 'impl': 'xla_gather', 'fn': xla,
                  'args': (src, idx)})
    cases.append({'case': name, 'impl': 'row_patches' if rows._copies_rows(
        src) else 'xla_gather (no custom call here)', 'fn': ours,
                  'args': (src, idx)})
  return cases


def _pool_cases(rng) -> list[dict]:
  cases = []
  for batch in (1, 32):
    x = jnp.asarray(rng.normal(size=(batch, 112, 112, 64)), jnp.float32)
    name = f'stem max pool 112x112x64 batch {batch}'
    cases.append({'case': name, 'impl': 'nnx.max_pool', 'args': (x,),
                  'fn': conv.jit(lambda x: nnx.max_pool(
                      x, (3, 3), strides=(2, 2), padding='SAME'))})
    cases.append({'case': name, 'impl': 'layers.max_pool', 'args': (x,),
                  'fn': conv.jit(lambda x: layers.max_pool(x, 3, 2))})
  return cases


def main(argv):
  del argv
  benchmarks.check_at_least(1, _REPS)
  out = benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)
  host_memory.reuse_freed_memory()
  rng = np.random.default_rng(0)
  cases = _window_cases(rng) + _pool_cases(rng)
  for case in cases:
    for _ in range(3):
      jax.block_until_ready(case['fn'](*case['args']))
    case['times'] = []
  for _ in range(_REPS.value):
    for case in cases:
      start = time.perf_counter()
      jax.block_until_ready(case['fn'](*case['args']))
      case['times'].append(time.perf_counter() - start)
  results = []
  print(f'{"case":>42} {"impl":>16} {"median us":>10} {"min us":>8}')
  for case in cases:
    median, fastest = statistics.median(case['times']), min(case['times'])
    print(f'{case["case"]:>42} {case["impl"]:>16} {median * 1e6:>10.1f} '
          f'{fastest * 1e6:>8.1f}')
    results.append({'case': case['case'], 'impl': case['impl'],
                    'median_s': median, 'min_s': fastest})
  benchmarks.write_json(out, {'device': str(jax.devices()[0]),
                              'results': results})
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
