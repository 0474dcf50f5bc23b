r"""A/B of `sparse.apply` options, two warm processes in lockstep.

Starts two benchmarks/sparse_inference.py servers (`--serve`: the dense
vanilla model and `sparse.apply` at `--fraction` of its FLOPs, the same
models and halting) that differ only in their `SparseOptions`, in the
source tree they run from (`--a_tree`, `--b_tree`) or in environment
variables (`--a_env`, `--b_env`), asks them in
turn for `--rounds` rounds (benchmarks/lockstep.py) and prints the medians
and the median per-round ratio B / A of `sparse.apply` and of the dense
model. Between options the dense model is the same program in both: its
ratio shows what the method resolves on this machine (1.00 within a
percent or two).

  python -m benchmarks.sparse_ab --b='{"unit_cost": 9e7}' --batch=1
  python -m benchmarks.sparse_ab --a='{"dense_head": 1.0}' \
      --b='{"dense_head": 1e9}' --batch=32 --rounds=10
  git worktree add /tmp/base HEAD~1 && \
      python -m benchmarks.sparse_ab --a_tree=/tmp/base  # Code A/B.
  python -m benchmarks.sparse_ab --b_env='{"OMP_WAIT_POLICY": "passive"}'
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

import benchmarks
from benchmarks import lockstep

_A = flags.DEFINE_string('a', '{}', 'SparseOptions fields of A (JSON).')
_B = flags.DEFINE_string('b', '{}', 'SparseOptions fields of B (JSON).')
_A_TREE = flags.DEFINE_string(
    'a_tree', None, 'Source tree A runs from (e.g. a `git worktree` of '
    'another commit: its sact_jax and benchmarks); default this one.')
_B_TREE = flags.DEFINE_string('b_tree', None, 'Source tree B runs from.')
_A_ENV = flags.DEFINE_string('a_env', '{}', 'Environment variables set for A '
                             '(JSON), e.g. \'{"OMP_WAIT_POLICY": "passive"}\'.')
_B_ENV = flags.DEFINE_string('b_env', '{}', 'Environment variables set for B '
                             '(JSON).')
_FAMILY = flags.DEFINE_enum('family', 'imagenet', ['cifar', 'imagenet'],
                            'Model family (sparse_inference.py).')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_FRACTION = flags.DEFINE_float('fraction', 0.5,
                               'FLOP fraction the halting is tuned to.')
_ROUNDS = flags.DEFINE_integer('rounds', 30, 'Rounds (one call of each '
                               'workload per server per round).')
_CACHE = flags.DEFINE_bool(
    'compilation_cache', False, 'Let the servers use the persistent '
    'compilation cache. Off by default: both then compile in-process, as '
    'an A and a B with different options would not both find their '
    'programs cached.')
_OUT = flags.DEFINE_string(
    'output', None, 'Also write JSON: the setup, the medians and ratios '
    'printed, and every round.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

# Builds a side's `SparseOptions` from its tree's sact_jax (a tree of
# another commit may have other fields): a bad field fails here, at once,
# instead of in its server after the other side's models are built.
_CHECK_OPTIONS = ('import json, sys; from sact_jax import sparse; '
                  'sparse.SparseOptions(**json.loads(sys.argv[1]))')


def main(argv):
  del argv
  options, extra_env = {}, {}
  for flag, into in ((_A, options), (_B, options), (_A_ENV, extra_env),
                     (_B_ENV, extra_env)):
    try:
      value = json.loads(flag.value)
    except json.JSONDecodeError as e:
      raise app.UsageError(f'--{flag.name} is not JSON: {e}') from e
    if not isinstance(value, dict):
      raise app.UsageError(f'--{flag.name} is not a JSON object.')
    into[flag.name[0]] = value
  trees = {'a': _A_TREE.value, 'b': _B_TREE.value}
  for tree in trees.values():
    if tree is not None and not os.path.isfile(
        os.path.join(tree, 'benchmarks', 'sparse_inference.py')):
      raise app.UsageError(f'{tree} has no benchmarks/sparse_inference.py')

  def env(name):  # The tree's sact_jax before any installed one.
    tree = trees[name]
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               **{k: str(v) for k, v in extra_env[name].items()})
    if tree is not None:
      env['PYTHONPATH'] = os.pathsep.join(
          [os.path.abspath(tree), *filter(None, [env.get('PYTHONPATH')])])
    return env

  if _BATCH.value < 1 or _ROUNDS.value < 1:
    raise app.UsageError('--batch and --rounds must be >= 1.')
  if not 0.0 < _FRACTION.value <= 1.0:
    raise app.UsageError(f'--fraction={_FRACTION.value} is not in (0, 1].')
  for name in ('a', 'b'):
    check = subprocess.run(
        [sys.executable, '-c', _CHECK_OPTIONS, json.dumps(options[name])],
        env=env(name), cwd=trees[name], capture_output=True, text=True,
        check=False)
    if check.returncode:
      error = (check.stderr.strip().splitlines() or ['failed'])[-1]
      raise app.UsageError(f'--{name}={json.dumps(options[name])}: {error}')
  # Checked before the servers start: a missing folder used to fail after
  # the whole run.
  out = (None if _OUT.value is None else
         benchmarks.check_output(_OUT.value, 'output', _OVERWRITE.value))

  clients = [lockstep.Client(name, [
      sys.executable, '-m', 'benchmarks.sparse_inference', '--serve',
      f'--families={_FAMILY.value}', f'--batch_sizes={_BATCH.value}',
      f'--fractions={_FRACTION.value}',
      f'--sparse_options={json.dumps(options[name])}',
      *([] if _CACHE.value else ['--cache_dir='])], env(name),
                             cwd=trees[name])
             for name in ('a', 'b')]
  try:
    ready = {c.name: c.ready() for c in clients}
    per_round = lockstep.rounds(clients, _ROUNDS.value)
  finally:
    for c in clients:
      c.close()
  print(f'A {options["a"]} {extra_env["a"] or ""}, B {options["b"]} '
        f'{extra_env["b"] or ""}; {_FAMILY.value} batch '
        f'{_BATCH.value}, FLOP fraction '
        f'{ready["a"]["flop_fraction"]:.3f} / {ready["b"]["flop_fraction"]:.3f}'
        f', {len(per_round)} rounds')
  summary = {}
  for workload in ('sparse', 'dense'):
    a, b = ([r[n][workload] for r in per_round] for n in 'ab')
    summary[workload] = {
        'a_median_s': statistics.median(a),
        'b_median_s': statistics.median(b),
        'b_over_a': lockstep.median_ratio(per_round, ('b', workload),
                                          ('a', workload))}
    print(f'  {workload:6s} A {1e3 * summary[workload]["a_median_s"]:8.1f} '
          f'ms  B {1e3 * summary[workload]["b_median_s"]:8.1f} ms  B / A '
          f'{summary[workload]["b_over_a"]:.3f}')
  if out:
    benchmarks.write_json(out, {
        'family': _FAMILY.value, 'batch': _BATCH.value,
        'fraction': _FRACTION.value, 'a_tree': _A_TREE.value,
        'b_tree': _B_TREE.value, 'compilation_cache': _CACHE.value,
        'options': options, 'env': extra_env, 'ready': ready,
        'summary': summary, 'rounds': per_round})
    print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
