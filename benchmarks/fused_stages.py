r"""A sparse bottleneck unit's fused stages alone, at ResNet-101's maps.

Run by hand (not a test):

  python -m benchmarks.fused_stages --batch=32 --fraction=0.5

Times, interleaved call by call so that the machine's drift hits all of
them alike (median of `--reps` calls), the two custom calls a fusable unit
runs at rows (`sparse.stages.fused_dilated` with the next head's taps,
`fused_active` with the block's update), at each block of ImageNet
ResNet-101 (56x56x256 .. 7x7x2048) with a random `--fraction` of the
positions in both index sets, and their rate in GFLOP/s of the stage's
matmuls. What the rate is measured against: one thread's oneDNN matmul by
a packed matrix (about 170 GFLOP/s on the Intel Xeon VM at 64 rows) and
oneDNN's dense convolutions over the map (BUILD.md, "Fewer passes around
the fused stages").

Each call gets fresh maps (the calls update them in place); the copies are
made before the clock starts. Writes JSON (`--out`).
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
from sact_jax import halting
from sact_jax import host_memory
from sact_jax import layers
from sact_jax import units
from sact_jax.sparse import rows
from sact_jax.sparse import stages

_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_FRACTION = flags.DEFINE_float('fraction', 0.5,
                               'Fraction of the positions in the sets.')
_REPS = flags.DEFINE_integer('reps', 20, 'Timed calls per case.')
_OUT = flags.DEFINE_string('out',
                           benchmarks.default_out('fused_stages.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

# (map side, channels, bottleneck) of ResNet-101's four blocks.
_BLOCKS = ((56, 256, 64), (28, 512, 128), (14, 1024, 256), (7, 2048, 512))


def _cases(batch: int, fraction: float, rng) -> list[dict]:
  factory = layers.LayerFactory(bn_momentum=0.997, bn_epsilon=1e-5)
  cases = []
  for side, channels, depth in _BLOCKS:
    unit = units.BottleneckUnit(channels, channels, depth, factory=factory,
                                rngs=nnx.Rngs(0))
    head = halting.SactHead(channels, factory=factory,
                            activation=layers.identity, rngs=nnx.Rngs(1))
    unit.eval()
    head.eval()
    num_rows = batch * side * side
    idx = jnp.asarray(np.flatnonzero(rng.random(num_rows) < fraction),
                      jnp.int32)
    count = int(idx.shape[0])
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    x, y = normal(num_rows, channels), normal(num_rows + 1, depth)
    taps, xsum = normal(num_rows + 1, 9), normal(batch, channels)
    cumulative = jnp.zeros((num_rows,), jnp.float32)
    dilated = jax.jit(
        lambda x, y, taps, u=unit, h=head, i=idx: stages.fused_dilated(
            u, x, y, i, h, taps), donate_argnums=(1, 2))
    active = jax.jit(
        lambda y, x, out, xsum, taps, u=unit, h=head, i=idx, s=side,
        c=cumulative: stages.fused_active(
            u, y, i, c, (x, out, xsum, taps), height=s, width=s,
            update_x=True, head=h), donate_argnums=(1, 2, 3, 4))
    name = f'{side}x{side}x{channels} batch {batch}, {count} rows'
    cases.append({
        'case': name, 'stage': 'dilated', 'fn': dilated,
        'fresh': lambda x=x, y=y, taps=taps: (x, y + 0, taps + 0),
        'gflop': 2 * count * channels * depth / 1e9})
    cases.append({
        'case': name, 'stage': 'active', 'fn': active,
        'fresh': lambda x=x, y=y, taps=taps, xsum=xsum: (
            y, x + 0, x * 0.5, xsum + 0, taps + 0),
        'gflop': 2 * count * (9 * depth * depth + depth * channels) / 1e9})
  return cases


def main(argv):
  del argv
  # At 0 the sets are empty: nothing to time, yet a results file.
  if not 0.0 < _FRACTION.value <= 1.0:
    raise app.UsageError(f'--fraction={_FRACTION.value} is not in (0, 1].')
  if _BATCH.value < 1 or _REPS.value < 1:
    raise app.UsageError('--batch and --reps must be >= 1.')
  out = benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)
  host_memory.reuse_freed_memory()
  if not rows.custom_calls():
    raise SystemExit('The fused stages need the row custom calls (oneDNN '
                     'built, float32 on the CPU).')
  cases = _cases(_BATCH.value, _FRACTION.value, np.random.default_rng(0))
  for case in cases:
    for _ in range(2):
      jax.block_until_ready(case['fn'](*case['fresh']()))
    case['times'] = []
  for _ in range(_REPS.value):
    for case in cases:
      args = jax.block_until_ready(case['fresh']())
      start = time.perf_counter()
      jax.block_until_ready(case['fn'](*args))
      case['times'].append(time.perf_counter() - start)
  results = []
  print(f'{"case":>34} {"stage":>8} {"median ms":>10} {"min ms":>8} '
        f'{"GFLOP/s":>8}')
  for case in cases:
    median, fastest = statistics.median(case['times']), min(case['times'])
    rate = case['gflop'] / median
    print(f'{case["case"]:>34} {case["stage"]:>8} {median * 1e3:>10.2f} '
          f'{fastest * 1e3:>8.2f} {rate:>8.0f}')
    results.append({'case': case['case'], 'stage': case['stage'],
                    'median_s': median, 'min_s': fastest,
                    'gflop': case['gflop'], 'gflop_per_s': rate})
  benchmarks.write_json(out, {
      'device': str(jax.devices()[0]), 'batch': _BATCH.value,
      'fraction': _FRACTION.value, 'results': results})
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
