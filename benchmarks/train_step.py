r"""Training-step time of ResNets, vanilla vs ACT vs SACT, and compile time.

Run by hand (not a test):

  python -m benchmarks.train_step --depths=32,110 --batch_size=128
  python -m benchmarks.train_step --compile_only --depths=20,110
  # ImageNet ResNet-101 at 224 (on a GPU: the SACT / vanilla overhead):
  python -m benchmarks.train_step --family=imagenet --depths=101 \
      --batch_size=64

  # What `layers.BatchNorm` saves over flax's own BatchNorm:
  python -m benchmarks.train_step --variants=nnx_bn,scan --repeats=10

Prints a table and writes JSON (`--out`). Every configuration runs in this
process; the variants of one model are timed in turn, one step of each per
round (every other round in reverse order), and `/first` is the median of
per-round ratios to the first variant
(absolute times on a shared machine are noisy). The model types are timed
one after another, each in its own loop: `med/vanilla` is a ratio of their
medians, so the machine's drift between the loops enters it. The step is
the trainer's own (`train.Trainer`, the family's config of the depth and
type): forward + backward + SGD momentum update, loss = cross-entropy + tau
ponder + L2 (as the reference's; CIFAR tau 0.01, ImageNet the config's
0.005), plus its metrics, on random images.
"""

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

import benchmarks
from benchmarks import steps
from sact_jax.configs import cifar10
from sact_jax.configs import imagenet

_FAMILY = flags.DEFINE_enum('family', 'cifar', ['cifar', 'imagenet'],
                            'Model family (CIFAR-10 or ImageNet ResNets).')
_DEPTHS = flags.DEFINE_list(
    'depths', None, 'ResNet depths (default: CIFAR 32,110; ImageNet 101; '
    f'the configs have CIFAR {sorted(cifar10.DEPTHS)}, ImageNet '
    f'{sorted(imagenet.DEPTHS)}).')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', 0, "Image side (0: the config's, 32 or 224).")
_TYPES = flags.DEFINE_list('model_types', ['vanilla', 'act', 'sact'],
                           'Model types.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed steps (median).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only measure jit compile time (SACT).')
_VARIANTS = flags.DEFINE_list(
    'variants', ['scan'], 'scan (the defaults: remat on the CPU), unrolled '
    '(config.unroll), scan_remat (remat on), scan_noremat (remat off), '
    "scan_convs (remat keeping the convolutions' outputs), "
    'scan_ynn (without the CPU training compiler options: '
    "jaxlib's default YNNPACK convolutions), xlaconv (XLA's convolutions "
    "instead of oneDNN's), nnx_bn (flax's nnx.BatchNorm instead of "
    'layers.BatchNorm).')
_CACHE, _REUSE = benchmarks.define_process_flags()
_OUT = flags.DEFINE_string('out', benchmarks.default_out('train_step.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
# `--help` lists the flags defined in benchmarks/__init__.py too.
flags.adopt_module_key_flags(benchmarks)

_DEFAULT_DEPTHS = {'cifar': ['32', '110'], 'imagenet': ['101']}


def time_configs(depth, model_type, variants, batch, repeats, compile_only,
                 family='cifar', image_size=0):
  """One result per variant of one model; the steps timed in turn, one of
  each per round (every other round in reverse order), so that each ratio
  to the first variant (`vs_first`, the median of per-round ratios) comes
  from the same stretch of time."""
  results, calls = [], []
  for variant in variants:
    step, compile_s = steps.make_step(depth, model_type, batch,
                                      variant=variant, family=family,
                                      image_size=image_size)
    results.append({'family': family, 'depth': depth,
                    'model_type': model_type, 'variant': variant,
                    'batch_size': batch, 'compile_s': compile_s})
    calls.append(step)
  if compile_only:
    return results
  for step in calls:  # Warm-up.
    jax.block_until_ready(step())
  times = np.zeros((repeats, len(calls)))
  order = list(range(len(calls)))
  for i in range(repeats):
    # Every other round in reverse: a step timed right after another
    # program can run a few percent faster (BUILD.md, "BatchNorm in
    # training as an affine map").
    for j in (order if i % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(calls[j]())
      times[i, j] = time.perf_counter() - t0
  for j, result in enumerate(results):
    result['step_s'] = float(np.median(times[:, j]))
    result['vs_first'] = float(np.median(times[:, j] / times[:, 0]))
  return results


def _check_flags() -> str:
  """One-line UsageError for a bad flag, before any model is built;
  returns the output path."""
  known = cifar10.DEPTHS if _FAMILY.value == 'cifar' else imagenet.DEPTHS
  benchmarks.check_choices(_DEPTHS, sorted(known), empty_ok=True,
                           note=f' ({_FAMILY.value})')
  benchmarks.check_choices(_TYPES, ('vanilla', 'act', 'sact'))
  benchmarks.check_choices(_VARIANTS, steps.VARIANT_CONFIG)
  benchmarks.check_at_least(1, _BATCH, _REPEATS)
  benchmarks.check_at_least(0, _IMAGE_SIZE)
  return benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)


def main(argv):
  del argv
  out = _check_flags()
  # Compile times are measured, not loaded from the cache.
  benchmarks.start_process(_REUSE.value,
                           '' if _COMPILE_ONLY.value else _CACHE.value)
  results = []
  types = ['sact'] if _COMPILE_ONLY.value else _TYPES.value
  depths = _DEPTHS.value or _DEFAULT_DEPTHS[_FAMILY.value]
  for depth in [int(d) for d in depths]:
    for model_type in types:
      for r in time_configs(depth, model_type, _VARIANTS.value, _BATCH.value,
                            _REPEATS.value, _COMPILE_ONLY.value,
                            _FAMILY.value, _IMAGE_SIZE.value):
        results.append(r)
        print(json.dumps(r), flush=True)
  # Table. `med/vanilla` divides medians of separate loops (one per model
  # type); `/first` is a median of per-round ratios within one loop.
  print(f'\n{"depth":>5} {"variant":>14} {"type":>8} {"compile s":>10} '
        f'{"step s":>8} {"med/vanilla":>11} {"/first":>7}')
  for r in results:
    base = [b for b in results if b['depth'] == r['depth']
            and b['variant'] == r['variant'] and b['model_type'] == 'vanilla']
    ratio = (r['step_s'] / base[0]['step_s']
             if base and 'step_s' in r else float('nan'))
    print(f'{r["depth"]:>5} {r["variant"]:>14} {r["model_type"]:>8} '
          f'{r["compile_s"]:>10.2f} {r.get("step_s", float("nan")):>8.3f} '
          f'{ratio:>11.2f} {r.get("vs_first", float("nan")):>7.3f}')
  if not _COMPILE_ONLY.value:
    print('med/vanilla: ratio of medians, each model type timed in its own '
          'loop; /first: median of per-round ratios to the first variant.')
  benchmarks.write_json(out, {'device': str(jax.devices()[0]),
                              'results': results})
  print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
