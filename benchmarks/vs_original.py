r"""sact_jax against the original TensorFlow code, side by side on one machine.

Run by hand (not a test), on a quiet machine, from the project root:

  bash ../shared/tfref/setup.sh          # once: the TF port and its venv
  python -m benchmarks.vs_original       # the default workloads, ~30 min
  python -m benchmarks.vs_original --configs=train:32:sact:128:3 --processes=2

Every workload runs in its own process per side, alternating TF, JAX, TF,
JAX (`--processes` per side), so both see the same machine state;
the ratio of the medians is what counts on a shared, noisy machine. The TF
side is the original's modules ported to TF 2 (`--tfref_dir`, made by
`setup.sh`; oneDNN kernels, 2 intra- and 2 inter-op threads, no XLA); when
that directory has no venv, only the JAX side runs. The JAX side is this
file's own worker (`--worker=CONFIG`), on the current code:

* `train:DEPTH:TYPE:BATCH:STEPS[:VARIANT]`: a CIFAR training step, the
  trainer's own (forward, backward, momentum SGD; cross-entropy + 0.01
  ponder cost + 2e-4 L2), synthetic data; VARIANT (JAX side) `scan`
  (default), `unrolled` (`config.unroll`), `scan_noremat` (`config.remat`
  off) or `scan_ynn` (XLA's default compiler options: YNNPACK
  convolutions);
* `infer:FAMILY:DEPTH:TYPE:BATCH:HALT[:SIZE]`: eval-mode inference; HALT
  `never` sets every halting head to never halt early, `first` to halt
  every position after the first unit (both sides compute the same units).
  JAX times the dense model (split once, one call jitted with the
  library's compiler options, `conv.jit`) and, for ACT/SACT,
  `sparse.apply`; TF times the dense graph and, for ACT, its
  `act_early_stopping` mode.
* `claim:BATCH:FRACTION`: the claim sact_jax exists for, on ImageNet
  ResNet-101 224: TF times its dense vanilla network; the JAX side is
  benchmarks/sparse_inference.py (its own process: halting tuned to
  FRACTION of the vanilla FLOPs, `--breakdown=false --unrolled=false`),
  whose dense vanilla and `sparse.apply` medians fill the row; the last
  column is then the original's dense vanilla over `sparse.apply`.

With `--lockstep`, every row keeps one warm server per side
(benchmarks/lockstep.py; the TF side is benchmarks/tf_server.py in the TF
venv, with `--train` for a training row; the JAX side this file's worker or
sparse_inference.py with `--serve`) and asks them in turn, `--reps` rounds
per pair of processes (a training row's STEPS is then unused: a round is
one step per side): the calls of a round see the same machine state, and
each ratio is the median of the per-round ratios. On a VM whose speed
drifts over minutes that is the figure to quote; the medians of separate
processes move with the drift.

With `--shards=N` as well, each side of an inference or claim row is N
servers, each pinned to its own share of the CPUs with 1/N of the batch
(TF with as many threads as its CPUs), run together; a round takes the
slowest shard's time (`lockstep.ShardedClient`). That is the batch served
by one process per core, with no threads synchronising inside an
operation: on ImageNet XLA:CPU gains more from it than TF, on CIFAR both
gain alike (BUILD.md, "One process per core").

`--jax_infer_xla_flags` adds XLA flags to the JAX side's inference and
claim processes only, for example the batch-1 latency setting
`--xla_cpu_enable_concurrency_optimized_scheduler=false` (BUILD.md,
"XLA:CPU's scheduler and batch-1 latency"); the JSON records them.

Prints a markdown table and writes every process's JSON line (`--output`).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

import benchmarks
from sact_jax import host_memory

DEFAULT_CONFIGS = (
    'train:32:vanilla:128:5', 'train:32:act:128:5', 'train:32:sact:128:5',
    'train:110:vanilla:128:3', 'train:110:act:128:3', 'train:110:sact:128:3',
    'infer:cifar:110:vanilla:1:never', 'infer:cifar:110:vanilla:128:never',
    'infer:cifar:110:act:1:never', 'infer:cifar:110:act:1:first',
    'infer:cifar:110:sact:1:never', 'infer:cifar:110:sact:32:never',
    'infer:imagenet:101:vanilla:1:never', 'infer:imagenet:101:vanilla:32:never',
    'infer:imagenet:101:sact:1:never', 'infer:imagenet:101:act:1:first',
    'claim:1:0.5', 'claim:32:0.5',
)
_CONFIGS = flags.DEFINE_list('configs', list(DEFAULT_CONFIGS),
                             'Workloads (see the module docstring).')
_PROCESSES = flags.DEFINE_integer('processes', 1, 'Processes per side and '
                                'workload.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per inference process.')
_TFREF_DIR = flags.DEFINE_string(
    'tfref_dir', os.path.expanduser('~/.cache/sact-tfref'),
    'The TF port with its venv (../shared/tfref/setup.sh).')
_OUT = flags.DEFINE_string('output',
                           benchmarks.default_out('vs_original.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)
_REUSE = flags.DEFINE_bool(
    'reuse_freed_memory', True, 'Both sides keep freed host memory for reuse '
    '(`sact_jax.host_memory`, as the launchers do; TF through glibc\'s '
    'GLIBC_TUNABLES).')
_HUGE_PAGES = flags.DEFINE_bool(
    'huge_pages', False, 'Both sides\' processes start with glibc\'s '
    'transparent huge pages for their heap (`host_memory.'
    'HUGE_PAGES_TUNABLE`).')
_LOCKSTEP = flags.DEFINE_bool(
    'lockstep', False, 'Keep one warm server per side and time their calls '
    'in turn, --reps rounds per pair of processes (a training row: one '
    'step per side and round); ratios are medians of per-round ratios '
    '(benchmarks/lockstep.py).')
_SHARDS = flags.DEFINE_integer(
    'shards', 1, 'With --lockstep: each side of an inference or claim row '
    'as this many servers, each pinned to its share of the CPUs with its '
    'share of the batch (the module docstring). Training rows keep one '
    'server per side.')
_CACHE = flags.DEFINE_bool(
    'compilation_cache', True, 'The JAX side loads its programs from the '
    'benchmarks\' persistent compilation cache (benchmarks.CACHE_DIR, '
    'written by the first run). With reuse_freed_memory, a process that '
    'compiled them itself runs them up to 1.4x slower (BUILD.md, "Host '
    'memory").')
_INFER_XLA_FLAGS = flags.DEFINE_string(
    'jax_infer_xla_flags', '', 'Appended to XLA_FLAGS of the JAX side\'s '
    'inference and claim processes (not the training rows): for example '
    '--xla_cpu_enable_concurrency_optimized_scheduler=false, the batch-1 '
    'latency setting (BUILD.md, "XLA:CPU\'s scheduler and batch-1 '
    'latency").')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: time one workload '
                              'on the JAX side and print one JSON line.')
_SERVE = flags.DEFINE_bool('serve', False, 'Internal, with --worker: serve '
                           'the workload (benchmarks/lockstep.py).')

# Preset depths of each family (`sact_jax.models` presets, kept here so
# that the driver checks --configs without importing JAX); training rows
# are CIFAR's.
_DEPTHS = {'cifar': (20, 32, 56, 110), 'imagenet': (50, 101, 152, 200)}
_MODEL_TYPES = ('vanilla', 'act', 'sact')
_HALTS = ('never', 'first')
# JAX-side variants of a training step (benchmarks/steps.py); the TF
# side has one.
_TRAIN_VARIANTS = ('scan', 'unrolled', 'scan_noremat', 'scan_ynn')
_FORMS = ('train:DEPTH:TYPE:BATCH:STEPS[:VARIANT]',
          'infer:FAMILY:DEPTH:TYPE:BATCH:HALT[:SIZE]', 'claim:BATCH:FRACTION')


def _one_of(config: str, name: str, value: str, allowed) -> str:
  if value not in allowed:
    raise app.UsageError(f'--configs entry {config!r}: {name} {value!r} is '
                         f'not one of {", ".join(map(str, allowed))}.')
  return value


def _positive(config: str, name: str, value: str) -> int:
  try:
    number = int(value)
  except ValueError:
    number = 0
  if number < 1:
    raise app.UsageError(f'--configs entry {config!r}: {name} {value!r} is '
                         'not an integer >= 1.')
  return number


def parse(config: str) -> dict:
  """A --configs entry as a dict; a bad one is a one-line UsageError.

  Checked in full before any process starts: a typo would otherwise run,
  time nothing and overwrite the results with errors.
  """
  fields = config.split(':')
  kind = fields[0]
  counts = {'claim': (3,), 'train': (5, 6), 'infer': (6, 7)}
  if kind not in counts or len(fields) not in counts[kind]:
    form = ([f for f in _FORMS if f.startswith(kind + ':')]
            or [' or '.join(_FORMS)])[0]
    raise app.UsageError(f'--configs entry {config!r} is not {form}.')
  if kind == 'claim':
    batch = _positive(config, 'BATCH', fields[1])
    try:
      fraction = float(fields[2])
    except ValueError:
      fraction = 0.0
    if not 0.0 < fraction <= 1.0:
      raise app.UsageError(f'--configs entry {config!r}: FRACTION '
                           f'{fields[2]!r} is not in (0, 1].')
    return dict(kind='claim', family='imagenet', depth=101,
                model_type='vanilla', batch=batch, halt='never',
                size=224, fraction=fraction)
  if kind == 'train':
    depth = _positive(config, 'DEPTH', fields[1])
    _one_of(config, 'CIFAR DEPTH', depth, _DEPTHS['cifar'])
    return dict(kind='train', family='cifar', depth=depth,
                model_type=_one_of(config, 'TYPE', fields[2], _MODEL_TYPES),
                batch=_positive(config, 'BATCH', fields[3]),
                steps=_positive(config, 'STEPS', fields[4]),
                variant=_one_of(config, 'VARIANT', (fields + ['scan'])[5],
                                _TRAIN_VARIANTS))
  family = _one_of(config, 'FAMILY', fields[1], tuple(_DEPTHS))
  depth = _positive(config, 'DEPTH', fields[2])
  _one_of(config, f'{family} DEPTH', depth, _DEPTHS[family])
  default_size = '32' if family == 'cifar' else '224'
  return dict(kind='infer', family=family, depth=depth,
              model_type=_one_of(config, 'TYPE', fields[3], _MODEL_TYPES),
              batch=_positive(config, 'BATCH', fields[4]),
              halt=_one_of(config, 'HALT', fields[5], _HALTS),
              size=_positive(config, 'SIZE', (fields + [default_size])[6]))


# ---------------------------------------------------------------------------
# JAX side (the worker)
# ---------------------------------------------------------------------------


def _force_halting(model, halt: str):
  """Every head never halts early (`never`) or halts all after unit 1."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bias = -10.0 if halt == 'never' else 10.0
  for block in model.blocks:
    if block.steps is None:
      continue
    head = block.steps.head
    for layer in (head.global_conv, getattr(head, 'local_conv', None)):
      if layer is None:
        continue
      layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
      if layer.bias is not None:
        layer.bias[...] = jnp.full_like(layer.bias[...], bias)


def _timed(fn, reps):
  import jax  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _infer_calls(config: str) -> dict:
  """The JAX side of an `infer` workload: name -> a call that blocks."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sact_jax import conv  # pylint: disable=g-import-not-at-top
  from sact_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sact_jax import models  # pylint: disable=g-import-not-at-top
  from sact_jax import sparse  # pylint: disable=g-import-not-at-top

  c = parse(config)
  rng = np.random.default_rng(0)
  size = c['size']
  images = jnp.asarray(rng.normal(size=(c['batch'], size, size, 3)),
                       jnp.float32)
  num_classes = 10 if c['family'] == 'cifar' else 1001
  model = models.create_model(c['family'], c['depth'], c['model_type'],
                              num_classes=num_classes, rngs=nnx.Rngs(0))
  model.eval()
  if c['model_type'] != 'vanilla':
    _force_halting(model, c['halt'])
  # The dense model as `evaluate.predict` runs it: split once, one jitted
  # call with the library's compiler options (`conv.jit`).
  graphdef, state = evaluate.eval_split_model(model)
  apply = conv.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  calls = {'dense': lambda: jax.block_until_ready(apply(state, images))}
  if c['model_type'] != 'vanilla':
    calls['sparse'] = lambda: jax.block_until_ready(
        sparse.apply(model, images))
  return calls


def _train_calls(config: str) -> dict:
  """The JAX side of a `train` workload: {'dense': a step that blocks}."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import steps  # pylint: disable=g-import-not-at-top

  c = parse(config)
  step, _ = steps.make_step(c['depth'], c['model_type'], c['batch'],
                            variant=c['variant'])
  return {'dense': lambda: jax.block_until_ready(step())}


def worker(config: str, reps: int) -> dict:
  """Times one workload with the current sact_jax; returns medians (s)."""
  c = parse(config)
  result = {'config': config, 'impl': 'jax'}
  if c['kind'] == 'train':
    step = _train_calls(config)['dense']
    for _ in range(2):
      step()
    result['median_s'] = _timed(step, c['steps'])
    return result
  calls = _infer_calls(config)
  for fn in calls.values():  # Compile and warm up.
    for _ in range(2):
      fn()
  times = {name: [] for name in calls}
  for _ in range(reps):  # Interleaved.
    for name, fn in calls.items():
      times[name].append(_timed(fn, 1))
  result['median_s'] = statistics.median(times['dense'])
  if 'sparse' in times:
    result['sparse_median_s'] = statistics.median(times['sparse'])
  return result


# ---------------------------------------------------------------------------
# TF side and the driver
# ---------------------------------------------------------------------------


def _tf_commands(config: str, tfref: str, reps: int) -> list[tuple[str,
                                                                  list[str]]]:
  python = os.path.join(tfref, 'venv', 'bin', 'python')
  c = parse(config)
  if c['kind'] == 'train':
    return [('dense', [python, os.path.join(tfref, 'tf_train_step.py'),
                       '--model', str(c['depth']), '--model_type',
                       c['model_type'], '--batch', str(c['batch']),
                       '--steps', str(c['steps'])])]
  base = [python, os.path.join(tfref, 'tf_infer.py'), '--family',
          c['family'], '--model', str(c['depth']), '--batch',
          str(c['batch']), '--size', str(c['size']), '--reps', str(reps)]
  if c['model_type'] != 'vanilla':
    base += ['--halt', c['halt']]
  commands = [('dense', base + ['--model_type', c['model_type']])]
  if c['model_type'] == 'act':
    commands.append(('sparse', base + ['--model_type', 'act_early_stopping']))
  return commands


def _run_json(command: list[str], env: dict) -> dict:
  proc = subprocess.run(command, capture_output=True, text=True, env=env,
                        check=False, timeout=3600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    return {'error': proc.stderr.strip().splitlines()[-1:]}
  return json.loads(lines[-1])


def _claim_command(c: dict, *args: str) -> list[str]:
  """benchmarks/sparse_inference.py on a `claim` row's workload."""
  return [sys.executable, '-m', 'benchmarks.sparse_inference',
          '--families=imagenet', f'--batch_sizes={c["batch"]}',
          f'--fractions={c["fraction"]}',
          f'--reuse_freed_memory={_REUSE.value}',
          *([] if _CACHE.value else ['--cache_dir=']), *args]


def _worker_command(config: str, *args: str) -> list[str]:
  """This file's JAX worker on a `train` or `infer` row's workload."""
  return [sys.executable, '-m', 'benchmarks.vs_original',
          f'--worker={config}', f'--reuse_freed_memory={_REUSE.value}',
          f'--compilation_cache={_CACHE.value}', *args]


def _run_claim(config: str, env: dict) -> dict:
  """The JAX side of a `claim` row: benchmarks/sparse_inference.py."""
  c = parse(config)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'sparse_inference.json')
    proc = subprocess.run(
        _claim_command(c, '--breakdown=false', '--unrolled=false',
                       f'--reps={_REPS.value}', f'--reps_large={_REPS.value}',
                       f'--out={out}'),
        capture_output=True, text=True, env=env, check=False, timeout=3600)
    if proc.returncode != 0 or not os.path.exists(out):
      return {'config': config, 'impl': 'jax',
              'error': proc.stderr.strip().splitlines()[-1:]}
    with open(out) as f:
      row = json.load(f)['results'][0]
  timing = row['timing']
  return {'config': config, 'impl': 'jax',
          'median_s': timing['vanilla']['wall_median'],
          'sparse_median_s': timing['sparse']['wall_median'],
          'flop_fraction': row['flop_fraction']}


def _server_commands(config: str, tfref: str, shard: int = 0,
                     cpus: tuple[set[int], ...] = ()) -> tuple[list[str],
                                                              list[str]]:
  """The TF and JAX lockstep servers of a workload.

  With `cpus` (one set per shard; not for `train`), those of shard
  `shard`: its part of the batch, TF with a thread per CPU of its set.
  """
  c = parse(config)
  here = os.path.dirname(os.path.abspath(__file__))
  tf = [os.path.join(tfref, 'venv', 'bin', 'python'),
        os.path.join(here, 'tf_server.py'), f'--tfref_dir={tfref}',
        f'--family={c["family"]}', f'--depth={c["depth"]}',
        f'--model_type={c["model_type"]}']
  if c['kind'] == 'train':
    return (tf + ['--train', f'--batch={c["batch"]}', '--size=32'],
            _worker_command(config, '--serve'))
  shards = max(len(cpus), 1)
  batch = c['batch'] // shards
  threads = len(cpus[shard]) if cpus else 2
  tf += [f'--batch={batch}', f'--size={c["size"]}', f'--halt={c["halt"]}',
         f'--threads={threads}']
  if c['kind'] == 'claim':
    jax_side = _claim_command(c, '--serve', f'--shard={shard}/{shards}')
  else:  # Random images: a shard is the workload at its part of the batch.
    fields = config.split(':')
    fields[4] = str(batch)
    jax_side = _worker_command(':'.join(fields), '--serve')
  return tf, jax_side


def _shards(config: str) -> int:
  """Servers per side of a lockstep row: --shards, but one for a training
  row."""
  return 1 if parse(config)['kind'] == 'train' else _SHARDS.value


def _clients(config: str, tfref: str, env: dict, tf_env: dict) -> list:
  """A lockstep client per side, sharded where `_shards` > 1."""
  from benchmarks import lockstep  # pylint: disable=g-import-not-at-top
  if _shards(config) == 1:
    tf_command, jax_command = _server_commands(config, tfref)
    return [lockstep.Client('tf', tf_command, tf_env),
            lockstep.Client('jax', jax_command, env)]
  cpus = tuple(lockstep.cpu_shards(_SHARDS.value))
  commands = [_server_commands(config, tfref, k, cpus)
              for k in range(len(cpus))]
  return [lockstep.ShardedClient('tf', [tf for tf, _ in commands], tf_env,
                                 list(cpus)),
          lockstep.ShardedClient('jax', [jx for _, jx in commands], env,
                                 list(cpus))]


def _lockstep(config: str, tfref: str, env: dict, tf_env: dict
              ) -> tuple[dict, list[dict]]:
  """A table row from --processes pairs of servers, --reps rounds each."""
  from benchmarks import lockstep  # pylint: disable=g-import-not-at-top
  per_round, records = [], []
  for rep in range(_PROCESSES.value):
    clients = _clients(config, tfref, env, tf_env)
    try:
      info = {c.name: c.ready() for c in clients}
      rounds = lockstep.rounds(clients, _REPS.value)
    except lockstep.ServerError as e:
      print(f'{config}: {e}', file=sys.stderr, flush=True)
      records.append({'config': config, 'rep': rep, 'lockstep': True,
                      'error': str(e)})
      continue
    finally:
      for c in clients:
        c.close()
    per_round += rounds
    records.append({'config': config, 'rep': rep, 'lockstep': True,
                    'ready': info, 'rounds': rounds})
  row = {'config': config, 'lockstep_rounds': len(per_round),
         'shards': _shards(config)}
  for side in ('tf', 'jax'):
    for workload in ('dense', 'sparse'):
      row[f'{side}_{workload}'] = _median(
          [r[side].get(workload) for r in per_round])
  row['ratio_jax_over_tf'] = lockstep.median_ratio(
      per_round, ('jax', 'dense'), ('tf', 'dense'))
  row['ratio_sparse_over_jax_dense'] = lockstep.median_ratio(
      per_round, ('jax', 'sparse'), ('jax', 'dense'))
  row['ratio_tf_sparse_over_jax_sparse'] = lockstep.median_ratio(
      per_round, ('tf', 'sparse'), ('jax', 'sparse'))
  row['ratio_tf_dense_over_jax_sparse'] = lockstep.median_ratio(
      per_round, ('tf', 'dense'), ('jax', 'sparse'))
  return row, records


def _ms(seconds):
  if seconds is None:
    return ''
  return f'{1e3 * seconds:.1f} ms' if seconds < 1 else f'{seconds:.2f} s'


def _median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def _ratio(row: dict, key: str, numerator: str, denominator: str):
  """The row's per-round median ratio (lockstep) or its medians' ratio."""
  if row.get(key) is not None:
    return row[key]
  if row.get(numerator) and row.get(denominator):
    return row[numerator] / row[denominator]
  return None


def table(summary: list[dict]) -> str:
  lines = ['| workload | original (TF) dense / early stop | sact_jax dense / '
           'sparse.apply | dense ratio (JAX / TF) | sparse.apply / JAX dense '
           '|', '| --- | --- | --- | --- | --- |']
  for r in summary:
    tf = ' / '.join(_ms(v) for v in (r['tf_dense'], r['tf_sparse'])
                    if v is not None)
    jx = ' / '.join(_ms(v) for v in (r['jax_dense'], r['jax_sparse'])
                    if v is not None)
    ratio = _ratio(r, 'ratio_jax_over_tf', 'jax_dense', 'tf_dense')
    sparse_ratio = _ratio(r, 'ratio_sparse_over_jax_dense', 'jax_sparse',
                          'jax_dense')
    cells = [f'{ratio:.2f}' if ratio else '',
             f'{sparse_ratio:.2f}' if sparse_ratio else '']
    claim = _ratio(r, 'ratio_tf_dense_over_jax_sparse', 'tf_dense',
                   'jax_sparse')
    if r['config'].startswith('claim:') and claim:
      cells[1] += f' (original dense / sparse.apply: {claim:.2f}x)'
    early = _ratio(r, 'ratio_tf_sparse_over_jax_sparse', 'tf_sparse',
                   'jax_sparse')
    if r['tf_sparse'] and early:
      cells[1] += f' (original early stop / sparse.apply: {early:.2f}x)'
    name = r['config']
    if r.get('lockstep_rounds'):
      shards = r.get('shards', 1)
      name += (f' (lockstep, {r["lockstep_rounds"]} rounds'
               + (f', {shards} processes per side)' if shards > 1 else ')'))
    lines.append(f'| {name} | {tf} | {jx} | {cells[0]} | {cells[1]} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  # A count of 0 timed nothing and wrote a summary of nulls.
  benchmarks.check_at_least(1, _PROCESSES, _REPS, _SHARDS)
  if _WORKER.value:
    benchmarks.start_process(_REUSE.value,
                             benchmarks.CACHE_DIR if _CACHE.value else '')
    if _SERVE.value:
      from benchmarks import lockstep  # pylint: disable=g-import-not-at-top
      kind = parse(_WORKER.value)['kind']
      if kind == 'claim':
        raise app.UsageError('--serve takes a train or infer workload.')
      calls = (_train_calls(_WORKER.value) if kind == 'train'
               else _infer_calls(_WORKER.value))
      lockstep.serve(calls, {'impl': 'jax'})
      return
    print(json.dumps(worker(_WORKER.value, _REPS.value)), flush=True)
    return
  if _SHARDS.value > 1 and not _LOCKSTEP.value:
    raise app.UsageError('--shards needs --lockstep.')
  if _SHARDS.value > 1:
    from benchmarks import lockstep  # pylint: disable=g-import-not-at-top
    try:
      lockstep.cpu_shards(_SHARDS.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  for config in _CONFIGS.value:  # Bad configs fail before anything runs.
    c = parse(config)
    if _SHARDS.value > 1 and c['kind'] != 'train' and (
        c['batch'] % _SHARDS.value):
      raise app.UsageError(f'{config}: --shards={_SHARDS.value} must divide '
                           'its batch size.')
  out = benchmarks.check_output(_OUT.value, 'output', _OVERWRITE.value)
  tfref = _TFREF_DIR.value
  have_tf = os.path.exists(os.path.join(tfref, 'venv', 'bin', 'python'))
  if not have_tf:
    # --lockstep pairs a JAX server with a TF one: without TF the rows run
    # as separate JAX processes, which the notice and the JSON say.
    dropped = [f for f, on in (('--lockstep', _LOCKSTEP.value),
                               (f'--shards={_SHARDS.value}',
                                _SHARDS.value > 1)) if on]
    print(f'No TF port at {tfref} (bash ../shared/tfref/setup.sh makes it): '
          'timing the JAX side only'
          + (f', one process at a time, without {" and ".join(dropped)}'
             if dropped else '') + '.', file=sys.stderr)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  tf_env = dict(env)
  infer_env = dict(env, XLA_FLAGS=' '.join(
      f for f in (env.get('XLA_FLAGS', ''), _INFER_XLA_FLAGS.value) if f))
  if _REUSE.value:
    # TF gains from it too (BUILD.md, "Host memory"): both sides keep freed
    # memory, or neither.
    tf_env['GLIBC_TUNABLES'] = host_memory.GLIBC_TUNABLES
  if _HUGE_PAGES.value:
    env, tf_env, infer_env = (
        host_memory.with_tunables(e, host_memory.HUGE_PAGES_TUNABLE)
        for e in (env, tf_env, infer_env))
  records, summary = [], []
  lockstep_run = _LOCKSTEP.value and have_tf
  for config in _CONFIGS.value:
    if lockstep_run:
      row, lockstep_records = _lockstep(
          config, tfref, env if parse(config)['kind'] == 'train'
          else infer_env, tf_env)
      records += lockstep_records
      summary.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
      continue
    runs = {'tf_dense': [], 'tf_sparse': [], 'jax_dense': [],
            'jax_sparse': []}
    first = len(records)
    for rep in range(_PROCESSES.value):
      if have_tf:
        for variant, command in _tf_commands(config, tfref, _REPS.value):
          r = _run_json(command, tf_env)
          r.update(config=config, impl='tf', variant=variant, rep=rep)
          records.append(r)
          runs[f'tf_{variant}'].append(r.get('median_s'))
      kind = parse(config)['kind']
      if kind == 'claim':
        r = _run_claim(config, infer_env)
      else:
        r = _run_json(_worker_command(config, f'--reps={_REPS.value}'),
                      env if kind == 'train' else infer_env)
      r.update(config=config, impl='jax', rep=rep)
      records.append(r)
      runs['jax_dense'].append(r.get('median_s'))
      runs['jax_sparse'].append(r.get('sparse_median_s'))
    for r in records[first:]:  # The last stderr line of a failed process.
      if 'error' in r:
        side = ' '.join([r['impl']] + ([r['variant']] if 'variant' in r
                                       else []))
        error = r['error']
        error = error if isinstance(error, str) else ' '.join(error)
        print(f'{config} ({side}, rep {r["rep"]}): {error or "failed"}',
              file=sys.stderr, flush=True)
    row = {'config': config, **{k: _median(v) for k, v in runs.items()}}
    summary.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  print(table(summary))
  benchmarks.write_json(out, {
      'summary': summary, 'records': records,
      # As run: without TF, --lockstep and --shards were not applied.
      'settings': {'tf': have_tf, 'lockstep': lockstep_run,
                   'shards': _SHARDS.value if lockstep_run else 1,
                   'processes': _PROCESSES.value, 'reps': _REPS.value,
                   'compilation_cache': _CACHE.value,
                   'reuse_freed_memory': _REUSE.value,
                   'huge_pages': _HUGE_PAGES.value},
      'xla_flags': {'train': env.get('XLA_FLAGS', ''),
                    'infer': infer_env['XLA_FLAGS']},
      'glibc_tunables': {'jax': infer_env.get('GLIBC_TUNABLES', ''),
                         'tf': tf_env.get('GLIBC_TUNABLES', '')}})
  print(f'Wrote {out}')
  sides = ('tf', 'jax') if have_tf else ('jax',)
  timeless = [f'{r["config"]} ({side})' for r in summary for side in sides
              if r[f'{side}_dense'] is None]
  if timeless:  # Written all the same: the records hold the errors.
    sys.exit(f'No times for {", ".join(timeless)} (errors above).')


if __name__ == '__main__':
  app.run(main)
