r"""Dense evaluation with the units' kernels read in place vs sliced.

Run by hand (not a test):

  python -m benchmarks.in_place_kernels

In evaluation a block's scan leaves the units' conv kernels stacked and
oneDNN's forward reads unit i's where it lies (`conv.pick`); sliced out
of the stack, as training does, XLA:CPU copies every kernel of every unit
before the custom call reads it. This times the dense model's forward both
ways in one process, interleaved call by call (the machine's drift hits
both alike), and prints the medians, the median of per-call ratios and
each variant's first call (compile included). Writes JSON (`--out`).
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
from sact_jax import blocks
from sact_jax import conv
from sact_jax import host_memory
from sact_jax import models

_CONFIGS = flags.DEFINE_list(
    'configs', ['imagenet:101:vanilla:1', 'imagenet:101:sact:1',
                'cifar:110:vanilla:1', 'cifar:110:sact:1',
                'imagenet:101:vanilla:32', 'cifar:110:vanilla:128'],
    'family:depth:model_type:batch.')
_REPS = flags.DEFINE_integer('reps', 20, 'Timed calls per variant.')
_OUT = flags.DEFINE_string('out',
                           benchmarks.default_out('in_place_kernels.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)


def _forward(model, in_place: bool):
  """The jitted eval forward with the blocks' kernels in place or sliced."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, blocks.Block):
      node.use_running_average = in_place
  graphdef, state = nnx.split(model)
  return conv.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def _time(config: str, reps: int) -> dict:
  family, depth, model_type, batch = config.split(':')
  size = 32 if family == 'cifar' else 224
  model = models.create_model(
      family, int(depth), model_type,
      num_classes=10 if family == 'cifar' else 1001, rngs=nnx.Rngs(0))
  model.eval()
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(int(batch), size, size, 3)), jnp.float32)
  calls = {name: _forward(model, name == 'in_place')
           for name in ('in_place', 'sliced')}
  # One-time costs (oneDNN's library, XLA's first compile) before either
  # variant's first call is timed.
  jax.block_until_ready(conv.jit(lambda x: conv.conv_general_dilated(
      x, jnp.ones((3, 3, 3, 3)), (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(images[:1, :8, :8]))
  compile_s = {}
  for name, (fn, state) in calls.items():  # Compile and warm up.
    start = time.perf_counter()
    jax.block_until_ready(fn(state, images))
    compile_s[name] = time.perf_counter() - start
    jax.block_until_ready(fn(state, images))
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, (fn, state) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(state, images))
      times[name].append(time.perf_counter() - start)
  return {'config': config,
          'in_place_s': statistics.median(times['in_place']),
          'sliced_s': statistics.median(times['sliced']),
          'ratio': statistics.median(
              a / b for a, b in zip(times['in_place'], times['sliced'])),
          'first_call_s': compile_s}


def _check_configs() -> None:
  """One-line UsageError for a bad --configs entry, before any timing."""
  presets = {'cifar': models.CIFAR_PRESETS,
             'imagenet': models.IMAGENET_PRESETS}
  for config in _CONFIGS.value:
    fields = config.split(':')
    if (len(fields) != 4 or fields[0] not in presets
        or not fields[1].isdigit() or int(fields[1]) not in presets[fields[0]]
        or fields[2] not in blocks.MODEL_TYPES or not fields[3].isdigit()
        or int(fields[3]) < 1):
      raise app.UsageError(
          f'--configs entry {config!r} is not FAMILY:DEPTH:TYPE:BATCH '
          f'(cifar depth {"/".join(map(str, models.CIFAR_PRESETS))}, '
          f'imagenet {"/".join(map(str, models.IMAGENET_PRESETS))}; TYPE '
          f'{"/".join(blocks.MODEL_TYPES)}; BATCH >= 1).')


def main(argv):
  del argv
  _check_configs()
  benchmarks.check_at_least(1, _REPS)
  out = benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)
  host_memory.reuse_freed_memory()
  results = []
  print(f'{"config":>26} {"in place ms":>12} {"sliced ms":>10} '
        f'{"ratio":>6} {"first calls s":>14}')
  for config in _CONFIGS.value:
    row = _time(config, _REPS.value)
    results.append(row)
    print(f'{config:>26} {row["in_place_s"] * 1e3:>12.1f} '
          f'{row["sliced_s"] * 1e3:>10.1f} {row["ratio"]:>6.3f} '
          f'{row["first_call_s"]["in_place"]:>6.1f} / '
          f'{row["first_call_s"]["sliced"]:<5.1f}', flush=True)
  benchmarks.write_json(out, {'device': str(jax.devices()[0]),
                              'reps': _REPS.value, 'results': results})
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
