r"""What ACT and SACT cost over vanilla on an accelerator: forward and training.

Run by hand on a GPU (it runs on the CPU too, slowly):

  python -m benchmarks.gpu_overhead --out=/tmp/gpu_overhead.json
  # and a profile of each program: its kernels per call, printed
  python -m benchmarks.gpu_overhead --profile_dir=/tmp/gpu_profile

The paper's overhead question on the GPU: the training step (the trainer's
own, `benchmarks.steps`) of CIFAR ResNet-110 at batch 128 and ImageNet
ResNet-101 at 224, batch 64, in vanilla, ACT and SACT, as the trainer
builds them and with `remat='convs'` (`--train_variants`); and the dense
forward in evaluation at batch 1 and 32, scanned and unrolled. The
programs of a phase are traced one after another and compiled at once (in
threads: XLA compiles without holding the GIL), then timed interleaved,
call by call, so that every ratio comes from one stretch of time. Ratios
to vanilla (and of a variant to the trainer's step) are medians of
per-round ratios. Prints tables and writes JSON (`--out`) after each
phase.
"""

import concurrent.futures
import functools
import glob
import gzip
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import benchmarks
from benchmarks import steps
from sact_jax import conv
from sact_jax.models import create_model

_FAMILIES = flags.DEFINE_list('families', ['imagenet', 'cifar'],
                              'Model families (forward and training).')
_TYPES = flags.DEFINE_list('model_types', ['vanilla', 'act', 'sact'],
                           'Model types.')
_FORWARD_BATCHES = flags.DEFINE_list('forward_batches', ['1', '32'],
                                     'Batch sizes of the forward (empty: '
                                     'no forward phase).')
_FORWARD_VARIANTS = flags.DEFINE_list(
    'forward_variants', ['scan', 'unrolled'],
    'scan: the models as built; unrolled: `unroll=True` (one program per '
    'unit, compiled longer).')
_UNROLLED_FAMILIES = flags.DEFINE_list(
    'unrolled_families', ['imagenet'],
    'Families of the forward variants after the first.')
_TRAIN_BATCHES = flags.DEFINE_list(
    'train_batches', ['cifar:128', 'imagenet:64'],
    'family:batch of the training steps (empty: no training phase).')
_TRAIN_VARIANTS = flags.DEFINE_list(
    'train_variants', ['scan', 'scan_convs'],
    'Variants of the training steps (`benchmarks.steps.VARIANT_CONFIG`): '
    "scan, the trainer's own; scan_convs, its units rematerialised keeping "
    "the convolutions' outputs (`remat='convs'`).")
_ROUNDS = flags.DEFINE_integer('rounds', 30, 'Timed forward rounds.')
_TRAIN_ROUNDS = flags.DEFINE_integer('train_rounds', 10,
                                     'Timed training rounds.')
_THREADS = flags.DEFINE_integer('compile_threads', 8,
                                'Programs compiled at once.')
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', '', 'If set, a profile of each program (a few calls) '
    'under it, summarised per kernel kind.')
_PROFILE_CALLS = flags.DEFINE_integer('profile_calls', 5,
                                      'Calls per profile.')
_OUT = flags.DEFINE_string('out',
                           benchmarks.default_out('gpu_overhead.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

_MODELS = benchmarks.MODELS
_FORWARD_VARIANT_NAMES = ('scan', 'unrolled')
_MODEL_TYPES = ('vanilla', 'act', 'sact')


def lower_forward(family: str, model_type: str, variant: str,
                  batches) -> dict:
  """`{batch: (lowered, args)}`: the dense model in evaluation, jitted as
  the library jits its own inference (`conv.compiler_options`).

  The weights are initialised inside one jit (as the trainer's are): built
  eagerly, every initialiser would compile on its own.
  """
  model = _MODELS[family]

  def build():
    return create_model(family, model['depth'], model_type,
                        num_classes=model['num_classes'], rngs=nnx.Rngs(0),
                        unroll=variant == 'unrolled')
  abstract = nnx.eval_shape(build)
  abstract.eval()
  graphdef = nnx.graphdef(abstract)
  state = jax.jit(lambda: nnx.state(build()))()
  options = conv.compiler_options(jax.default_backend()) or None
  fn = jax.jit(lambda s, images: nnx.merge(graphdef, s)(images),
               compiler_options=options)
  out = {}
  for batch in batches:
    size = model['size']
    images = jax.random.normal(jax.random.key(batch),
                               (batch, size, size, 3), jnp.float32)
    out[batch] = (fn.lower(state, images), (state, images))
  return out


def compile_all(lowered: dict) -> dict:
  """`{key: (compiled, seconds)}` of `{key: lowered}`, several at a time."""
  def one(item):
    t0 = time.perf_counter()
    return item[0], (item[1].compile(), time.perf_counter() - t0)
  with concurrent.futures.ThreadPoolExecutor(_THREADS.value) as pool:
    return dict(pool.map(one, lowered.items()))


def interleaved(fns: dict, rounds: int) -> dict:
  """Seconds per call of each `fn()`, one call of each per round."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  samples = {k: [] for k in fns}
  for _ in range(rounds):
    for key, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      samples[key].append(time.perf_counter() - t0)
  return samples


def _category(name: str) -> str:
  """A kernel's kind: its HLO op name without numbering."""
  name = re.sub(r'[._]\d+$', '', name)
  name = re.sub(r'\.\d+', '', name)
  return name


def kernel_summary(trace_dir: str, calls: int) -> dict:
  """Kernels per call and time per kind, read from a profile's trace.

  Reads the device's stream rows of the trace (`*.trace.json.gz`); the
  profiler's derived rows (modules, ops, steps) are left out so that no
  kernel counts twice.
  """
  files = glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*',
                                 '*.trace.json.gz'))
  if not files:
    return {'error': 'no trace written'}
  with gzip.open(files[0]) as f:
    events = json.load(f)['traceEvents']
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    if e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  device = {p for p, n in processes.items()
            if 'GPU' in n or 'TPU' in n or '/device:' in n}
  rows = {k for k, n in threads.items()
          if k[0] in device and 'stream' in n.lower()}
  kernels = [e for e in events if e.get('ph') == 'X' and e['pid'] in device
             and (not rows or (e['pid'], e['tid']) in rows)]
  if not kernels:  # XLA:CPU's profile, for one: not "0 kernels".
    return {'error': 'no per-kernel rows on this backend'}
  kinds = {}
  for e in kernels:
    args = e.get('args', {})
    name = _category(args.get('hlo_op') or args.get('name') or e['name'])
    n, us = kinds.get(name, (0, 0.0))
    kinds[name] = (n + 1, us + float(e.get('dur', 0.0)))
  top = sorted(kinds.items(), key=lambda kv: -kv[1][1])
  return {
      'processes': sorted(set(processes.values())),
      'rows': sorted({threads[k] for k in rows}),
      'kernels_per_call': len(kernels) / calls,
      'kernel_ms_per_call': sum(float(e.get('dur', 0.0)) for e in kernels)
                            / calls / 1e3,
      'kinds': [{'kind': k, 'per_call': n / calls,
                 'ms_per_call': us / calls / 1e3} for k, (n, us) in top[:25]],
  }


def profile(fns: dict, tag: str) -> dict:
  """A profile of a few calls of each program, summarised."""
  out = {}
  for key, fn in fns.items():
    path = os.path.join(_PROFILE_DIR.value, f'{tag}-{key}')
    jax.block_until_ready(fn())
    jax.profiler.start_trace(path)
    for _ in range(_PROFILE_CALLS.value):
      jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    try:
      out[key] = kernel_summary(path, _PROFILE_CALLS.value)
    except Exception as e:  # pylint: disable=broad-except
      out[key] = {'error': repr(e)}
    s = out[key]
    if 'error' in s:
      print(f'[profile {tag}-{key}] {s["error"]}', flush=True)
      continue
    print(f'[profile {tag}-{key}] {s["kernels_per_call"]:.0f} '
          f'kernels, {s["kernel_ms_per_call"]:.3f} ms per call',
          flush=True)
    for kind in s.get('kinds', [])[:12]:
      print(f'    {kind["kind"][:50]:50} {kind["per_call"]:7.1f} '
            f'{kind["ms_per_call"]:8.3f} ms', flush=True)
  return out


def summarise(samples: dict) -> list[dict]:
  """Median seconds per program and the median per-round ratios to the
  vanilla program of its group (keys are `<group>-<model type>`) and, for a
  training variant, to the same program as the trainer builds it (`scan`).
  """
  def ratio(values, base):
    return float(np.median(np.array(values) / np.array(samples[base])))

  rows = []
  for key, values in samples.items():
    base = key.rsplit('-', 1)[0] + '-vanilla'
    row = {'key': key, 'median_s': float(np.median(values)),
           'min_s': float(np.min(values))}
    if base in samples:
      row['vs_vanilla'] = ratio(values, base)
    for variant in _TRAIN_VARIANTS.value:
      scan = key.replace(f'-{variant}-', '-scan-')
      if f'-{variant}-' in key and scan != key and scan in samples:
        row['vs_scan'] = ratio(values, scan)
    rows.append(row)
  return rows


def measure(title: str, lowered: dict, trace_s: float, make_fn,
            rounds: int) -> tuple[list[dict], dict]:
  """Compiles `{key: lowered}` at once, times the programs
  `make_fn(key, compiled)` interleaved and prints the table; returns its
  rows and the programs (`{key: fn}`, to profile)."""
  t0 = time.perf_counter()
  compiled = compile_all(lowered)
  print(f'[{title}] traced in {trace_s:.0f} s, compiled in '
        f'{time.perf_counter() - t0:.0f} s', flush=True)
  fns = {k: make_fn(k, c) for k, (c, _) in compiled.items()}
  rows = summarise(interleaved(fns, rounds))
  print(f'\n{title}\n{"program":<38} {"median ms":>10} {"min ms":>9} '
        f'{"/vanilla":>9} {"/scan":>7}')
  ratio = lambda r, key, width: (f'{r[key]:>{width}.2f}' if key in r
                                 else ' ' * width)  # Blank: no base.
  for r in rows:
    r['compile_s'] = compiled[r['key']][1]
    print(f'{r["key"]:<38} {r["median_s"] * 1e3:>10.2f} '
          f'{r["min_s"] * 1e3:>9.2f} {ratio(r, "vs_vanilla", 9)} '
          f'{ratio(r, "vs_scan", 7)}')
  return rows, fns


def forward_phase(result: dict, write, variant: str, families):
  """The dense forward of every family, type and batch in one variant."""
  batches = [int(b) for b in _FORWARD_BATCHES.value]
  lowered, args = {}, {}
  t0 = time.perf_counter()
  for family in families:
    for model_type in _TYPES.value:
      for batch, (low, a) in lower_forward(family, model_type, variant,
                                           batches).items():
        key = f'{family}-b{batch}-{variant}-{model_type}'
        lowered[key], args[key] = low, a
  result['forward'][variant], fns = measure(
      f'forward {variant}', lowered, time.perf_counter() - t0,
      lambda k, c: functools.partial(c, *args[k]), _ROUNDS.value)
  write()
  if _PROFILE_DIR.value:
    result['profiles'][f'forward-{variant}'] = profile(fns, 'forward')
    write()


def train_phase(result: dict, write):
  """The training step of every family and type at its batch size."""
  lowered, args = {}, {}
  t0 = time.perf_counter()
  for family, batch in _train_batches():
    if family not in _FAMILIES.value:
      continue
    for variant in _TRAIN_VARIANTS.value:
      for model_type in _TYPES.value:
        low, state, batch_arrays, _ = steps.lower_step(
            _MODELS[family]['depth'], model_type, batch, family=family,
            variant=variant)
        key = f'{family}-b{batch}-{variant}-{model_type}'
        lowered[key], args[key] = low, (state, batch_arrays)
  result['train'], fns = measure(
      'training step', lowered, time.perf_counter() - t0,
      lambda k, c: steps.stepper(c, *args[k]), _TRAIN_ROUNDS.value)
  write()
  if _PROFILE_DIR.value:
    result['profiles']['train'] = profile(fns, 'train')
    write()


def _train_batches() -> list[tuple[str, int]]:
  """`--train_batches` as (family, batch) pairs, or a one-line UsageError."""
  pairs = []
  for item in _TRAIN_BATCHES.value:
    family, _, batch = item.partition(':')
    if family not in _MODELS or not batch.isdigit() or int(batch) < 1:
      raise app.UsageError(
          f'--train_batches entry {item!r} is not FAMILY:BATCH (FAMILY '
          f'{" or ".join(_MODELS)}, BATCH >= 1).')
    pairs.append((family, int(batch)))
  return pairs


def _check_flags() -> str:
  """One-line UsageError for a bad flag, before anything compiles (the
  forward phase compiles for minutes on a GPU, and GPU time is rationed);
  returns the output path."""
  benchmarks.check_choices(_FAMILIES, _MODELS)
  benchmarks.check_choices(_TYPES, _MODEL_TYPES)
  benchmarks.check_positive_ints(_FORWARD_BATCHES, empty_ok=True)
  if _FORWARD_BATCHES.value:
    benchmarks.check_choices(_FORWARD_VARIANTS, _FORWARD_VARIANT_NAMES)
    if _FORWARD_VARIANTS.value[1:]:
      benchmarks.check_choices(_UNROLLED_FAMILIES, _MODELS, empty_ok=True)
  if _train_batches():
    benchmarks.check_choices(_TRAIN_VARIANTS, steps.VARIANT_CONFIG)
  benchmarks.check_at_least(1, _ROUNDS, _TRAIN_ROUNDS, _THREADS,
                            _PROFILE_CALLS)
  return benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)


def main(argv):
  del argv
  out = _check_flags()
  benchmarks.configure_jax('')
  device = jax.devices()[0]
  result = {'device': getattr(device, 'device_kind', str(device)),
            'backend': jax.default_backend(), 'jax': jax.__version__,
            'flax': flax.__version__, 'forward': {}, 'train': [],
            'profiles': {}}
  print(json.dumps({k: result[k] for k in ('device', 'backend', 'jax',
                                           'flax')}), flush=True)
  if result['backend'] == 'cpu':
    print('No GPU here: timing on the CPU.', file=sys.stderr, flush=True)
  write = lambda: benchmarks.write_json(out, result)
  # The scanned forward first, then the training steps (the issue's
  # table), then the slower-compiling variants.
  variants = _FORWARD_VARIANTS.value if _FORWARD_BATCHES.value else []
  for variant in variants[:1]:
    forward_phase(result, write, variant, _FAMILIES.value)
  if _TRAIN_BATCHES.value:
    train_phase(result, write)
  for variant in variants[1:]:
    forward_phase(result, write, variant, _UNROLLED_FAMILIES.value)


if __name__ == '__main__':
  app.run(main)
