"""Benchmarks, run by hand (BUILD.md, "Benchmarks")."""

import json
import os

# JAX's persistent compilation cache of the benchmarks' JAX processes: a
# process that loads its programs from it runs them at full speed under
# `sact_jax.host_memory`, one that compiled them itself does not (BUILD.md,
# "Host memory").
CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'sact_jax_jit')

# The paper's two models that the benchmarks time, with their inputs.
MODELS = {
    'cifar': dict(depth=110, size=32, num_classes=10),
    'imagenet': dict(depth=101, size=224, num_classes=1001),
}


def configure_jax(cache_dir: str) -> None:
  """What a benchmark's JAX process sets up first: rbg keys (fast model
  init on the CPU) and, unless `cache_dir` is '', the compilation cache."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_default_prng_impl', 'rbg')
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def define_process_flags():
  """A benchmark's `--cache_dir` and `--reuse_freed_memory` flags (for
  `start_process`), defined at its import."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  cache_dir = flags.DEFINE_string(
      'cache_dir', CACHE_DIR, 'Persistent compilation cache ("" to disable).')
  reuse = flags.DEFINE_bool(
      'reuse_freed_memory', True, 'Keep freed host memory for reuse '
      '(`sact_jax.host_memory`), as the launchers do.')
  return cache_dir, reuse


def start_process(reuse_freed_memory: bool, cache_dir: str) -> None:
  """What a benchmark's JAX process does first, before JAX's backend
  starts: host memory kept for reuse (if asked), then `configure_jax`."""
  if reuse_freed_memory:
    from sact_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reuse_freed_memory()
  configure_jax(cache_dir)


def check_choices(flag, allowed, *, empty_ok: bool = False,
                  note: str = '') -> list[str]:
  """A list flag's values, each one of `allowed`, or a one-line UsageError.

  For a benchmark's `main`, before any work: a typo would otherwise time
  nothing (or another variant) and write over the committed results.

  Args:
    flag: the flag's holder (`flags.DEFINE_list`'s return value).
    allowed: the values it may take.
    empty_ok: whether no value (or None) is allowed too.
    note: said after the allowed values (e.g. what they depend on).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  values = flag.value or []
  allowed = [str(a) for a in allowed]
  if (not values and not empty_ok) or any(v not in allowed for v in values):
    raise app.UsageError(f'--{flag.name}={",".join(values)}: each must be '
                         f'one of {", ".join(allowed)}{note}.')
  return values


def check_positive_ints(flag) -> list[int]:
  """A list flag's values as integers >= 1, or a one-line UsageError."""
  from absl import app  # pylint: disable=g-import-not-at-top
  values = flag.value or []
  if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
    raise app.UsageError(f'--{flag.name}={",".join(values)}: each must be '
                         'an integer >= 1.')
  return [int(v) for v in values]


def write_json(path: str, data, indent: int = 1) -> None:
  """A benchmark's results as JSON at `path`, its folder made if need be."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f, indent=indent)
