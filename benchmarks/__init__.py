"""Benchmarks, run by hand (BUILD.md, "Benchmarks")."""

import os
import subprocess
import tempfile

# JAX's persistent compilation cache of the benchmarks' JAX processes: a
# process that loads its programs from it runs them at full speed under
# `sact_jax.host_memory`, one that compiled them itself does not (BUILD.md,
# "Host memory").
CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'sact_jax_jit')

# Where the benchmarks write their JSON by default: this folder's
# `results/`, wherever they are run from.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'results')

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


def check_positive_ints(flag, *, minimum: int = 1,
                        empty_ok: bool = False) -> list[int]:
  """A list flag's values as integers >= `minimum` (1 unless given), or a
  one-line UsageError; no value is an error unless `empty_ok`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  values = flag.value or []
  if ((not values and not empty_ok)
      or not all(v.isdigit() and int(v) >= minimum for v in values)):
    raise app.UsageError(f'--{flag.name}={",".join(values)}: each must be '
                         f'an integer >= {minimum}.')
  return [int(v) for v in values]


def check_at_least(minimum, *holders) -> None:
  """Each numeric flag of `holders` at least `minimum`, or a one-line
  UsageError: a count of 0 would time nothing (NaN, or an error after
  compiling)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  for flag in holders:
    if flag.value is None or flag.value < minimum:
      raise app.UsageError(f'--{flag.name}={flag.value}: must be >= '
                           f'{minimum}.')


def default_out(filename: str) -> str:
  """`filename` under benchmarks/results/, found from this file (not from
  the working directory)."""
  return os.path.join(RESULTS_DIR, filename)


_overwrite = None


def define_overwrite_flag():
  """The `--overwrite` flag (once per process, for any benchmark that
  imports another's): needed to replace a result file git tracks."""
  global _overwrite
  if _overwrite is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    _overwrite = flags.DEFINE_bool(
        'overwrite', False, 'Replace the output file although git tracks '
        'it (a committed result); without it such a run is refused.')
  return _overwrite


def _tracked(path: str) -> bool:
  """Whether git tracks `path` (False where git or a repository is not)."""
  try:
    return subprocess.run(
        ['git', 'ls-files', '--error-unmatch', '--', os.path.basename(path)],
        cwd=os.path.dirname(path), capture_output=True, check=False,
        timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def check_output(path: str, flag: str = 'out', overwrite: bool = False
                 ) -> str:
  """`path` as an absolute path, its folder made; else a one-line
  UsageError.

  For a benchmark's `main`, before any work: an unwritable path used to
  fail after the whole run, and a default run to replace a committed
  result (refused here unless `overwrite`, the `--overwrite` flag).

  Args:
    path: the output file.
    flag: the name of the flag that gave it, for the message.
    overwrite: whether a file that git tracks may be replaced.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  if not path:
    raise app.UsageError(f'--{flag} must name a file.')
  path = os.path.abspath(path)
  folder = os.path.dirname(path)
  if os.path.isdir(path):
    raise app.UsageError(f'--{flag}={path} is a directory.')
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):  # Can a file be made there?
      pass
  except (FileExistsError, NotADirectoryError):
    in_the_way = folder
    while not os.path.exists(in_the_way):
      in_the_way = os.path.dirname(in_the_way)
    raise app.UsageError(f'--{flag}={path} cannot be written: {in_the_way} '
                         'is not a folder.') from None
  except OSError as e:
    raise app.UsageError(f'--{flag}={path} cannot be written: '
                         f'{e.strerror or e}.') from None
  if not overwrite and _tracked(path):
    raise app.UsageError(
        f'--{flag}={path} is a result git tracks: pass another --{flag}, '
        'or --overwrite to replace it.')
  return path


def write_json(path: str, data, indent: int = 1) -> None:
  """A benchmark's results as JSON at `path`, its folder made if need be.

  `evaluate.save_json`'s atomic write, so that a run cut off mid-write
  leaves the previous file; NaN is refused, as it is not JSON
  (`check_at_least` keeps the counts that would make it out).
  """
  from sact_jax import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.save_json(data, path, indent=indent)
