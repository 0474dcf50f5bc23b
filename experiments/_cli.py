"""How every launcher under experiments/ ends on bad input.

One convention for all of them, so scripts and people can rely on it:

* bad input (flags, config, paths, checkpoints, datasets, a missing
  optional dependency), refused before any work: one `error: ...` line on
  stderr, exit status 2 (`BAD_INPUT`);
* a failure during the run (e.g. a non-finite loss): one `error: ...` line,
  exit status 1 (`RUN_FAILED`).

Neither prints a traceback: the user has something to fix, not a bug to
report. Launchers call `run(main)` instead of `absl.app.run(main)`.
"""

import logging as py_logging
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from sact_jax import host_memory

BAD_INPUT = 2
RUN_FAILED = 1


def fail(message: str, status: int = BAD_INPUT) -> NoReturn:
  """One error line on stderr (a message's lines joined), no traceback.

  Output directories that `check_output_dir` or `check_output_file` made
  and nothing was written into yet are removed first: bad input leaves
  nothing behind.
  """
  _remove_empty_made_dirs()
  message = ' '.join(line.strip() for line in message.splitlines())
  print(f'error: {message.strip()}', file=sys.stderr, flush=True)
  sys.exit(status)


_TRACEBACK = 'Traceback (most recent call last):'
# Longer messages (e.g. a compiler's dump) are cut in the middle.
_MAX_CHARS = 1500


def one_line(error: BaseException) -> str:
  """An error's message on one line, without an embedded traceback.

  All its lines are kept, joined: the middle ones may say what to do (e.g.
  the `tfds build` command of a missing dataset). A traceback in it
  (ml_collections puts a config file's into its flag errors) is cut to its
  last line, the exception.
  """
  lines = [line.strip() for line in str(error).splitlines()]
  if _TRACEBACK in lines:
    exception = [line for line in lines if line][-1]
    lines = lines[:lines.index(_TRACEBACK)] + [exception]
  message = ' '.join(line for line in lines if line)
  if not message:
    return type(error).__name__
  if len(message) > _MAX_CHARS:
    head = _MAX_CHARS * 2 // 3
    message = (f'{message[:head]} [...] '
               f'{message[len(message) - (_MAX_CHARS - head):]}')
  return message


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parsing, but bad flags end with one line and exit status 2.

  ml_collections puts the config file's whole traceback into the flag error
  (e.g. for an unknown variant); only its last line is kept (`one_line`).
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # Raised by ml_collections for --config.<field> that the config lacks
    # (an AttributeError may wrap the KeyError); the message may be the
    # quoted name and a suggestion on a second line.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    message = str(e.args[0]) if e.args else str(e)
    name, _, suggestion = message.partition('\n')
    suggestion = f' {suggestion.strip()}' if suggestion.strip() else ''
    fail(f"Unknown config field '{name.strip(chr(34) + chr(39))}': overrides "
         f'can only set fields that the config file defines.{suggestion}')
  except (flags.Error, TypeError, ValueError) as e:
    message = one_line(e)
    # A variant (`file.py:name`) given to a config file that has none.
    no_variants = re.match(
        r'flag --(\w+)=([^:]*):(.*): Error whilst parsing config file: '
        r'TypeError: get_config\(\) takes 0 positional arguments', message)
    if no_variants:
      name, path, variant = no_variants.groups()
      fail(f'--{name}={path}:{variant}: {path} has no variants; give '
           f"--{name}={path} without ':{variant}'.")
    fail(message)


def config_value(config_flag: flags.FlagHolder):
  """The config of a `config_flags` flag, or one line if it cannot load.

  A config file that cannot be read is only reported on first use, after
  flag parsing.
  """
  try:
    config = config_flag.value
    if config is not None:
      config.get('dataset')
    return config
  except OSError as e:
    fail(one_line(e))


class ModelFlags:
  """--config, --workdir and --checkpoint of a launcher that reads a model.

  Args:
    config_help: what the launcher takes from its --config.
    verb: what it does with the model ('evaluate', 'draw', 'score').
  """

  def __init__(self, config_help: str, verb: str):
    self.config = config_flags.DEFINE_config_file(
        'config', None, f'Config file: {config_help} and, with --workdir, '
        "the model; default with --workdir: the run's config.json.",
        lock_config=False)
    self.workdir = flags.DEFINE_string(
        'workdir', None, f'Training workdir: {verb} its latest checkpoint.')
    self.checkpoint = flags.DEFINE_string(
        'checkpoint', None, f'Model-only checkpoint directory to {verb}.')

  def checked_config(self, argv: Sequence[str]):
    """The preamble every such launcher shares; returns the config or None.

    No stray arguments, exactly one model source, and with --workdir a
    config (by default the run's own `config.json`); each refused with one
    line.
    """
    if len(argv) > 1:
      fail(f'Unexpected arguments: {" ".join(argv[1:])}')
    # Imported here: launchers configure jax before the library loads.
    from sact_jax import evaluate  # pylint: disable=g-import-not-at-top
    workdir, checkpoint = self.workdir.value, self.checkpoint.value
    try:
      evaluate.check_model_source(workdir, checkpoint)
    except ValueError as e:
      fail(str(e))
    config = config_value(self.config)
    if config is None and workdir is not None:
      from sact_jax import main_job  # pylint: disable=g-import-not-at-top
      try:
        config = main_job.read_config(workdir)
      except ValueError as e:  # ConfigError.
        fail(str(e))
    return config


# Output directories that the checks below made (`fail` removes those that
# are still empty).
_made_dirs: list[str] = []


def check_output_dir(path: str) -> None:
  """`workdirs.ensure_writable_dir`, refused in one line.

  The directories it makes are removed again if the run then fails (with
  `fail`) before writing into them: a later check, e.g. of the dataset, may
  still refuse the run.
  """
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  _checked(workdirs.ensure_writable_dir, path, path)


def check_output_file(path: str) -> None:
  """`workdirs.ensure_writable_file`, as `check_output_dir`."""
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  _checked(workdirs.ensure_writable_file, path,
           os.path.dirname(os.path.abspath(path)) if path else '')


def _checked(check: Callable[[str], None], path: str,
             directory: str) -> None:
  """Runs `check(path)`, noting the directories above it that it makes."""
  missing = []
  directory = os.path.abspath(directory) if directory else ''
  while directory and not os.path.lexists(directory):
    missing.append(directory)
    directory = os.path.dirname(directory)
  try:
    check(path)
  except ValueError as e:  # WorkdirError.
    fail(one_line(e))
  _made_dirs.extend(missing)


def _remove_empty_made_dirs() -> None:
  """Removes what the output checks made, deepest first, if still empty."""
  for path in sorted(set(_made_dirs), key=len, reverse=True):
    try:
      os.rmdir(path)
    except OSError:
      pass  # Written into, or removed by someone else.
  _made_dirs.clear()


class _QuietLibraries:
  """Drops INFO records of orbax and tfds (dozens per checkpoint).

  And orbax's warnings on every read-only checkpoint manager, which is how
  the library looks into a workdir (`checkpoint.run_manager`).
  """

  _NOISY = (f'{os.sep}orbax{os.sep}', f'{os.sep}tensorflow_datasets{os.sep}')

  def filter(self, record) -> bool:
    if not any(part in record.pathname for part in self._NOISY):
      return True
    message = str(record.msg)
    return record.levelno >= py_logging.WARNING and not (
        message.startswith('Given directory is read only')
        or 'read_only=True' in message)


def _drop_backend_probe(record) -> bool:
  """Drops jax's INFO line on each platform it finds absent.

  (TPU on every GPU or CPU host.) A platform that is present but fails
  still warns.
  """
  return not (record.levelno < py_logging.WARNING
              and str(record.msg).startswith('Unable to initialize backend'))


def define_cache_flag() -> flags.FlagHolder:
  """--compilation_cache_dir of every launcher that compiles.

  All but the converter and the collectors. The cache also spares
  `sparse.apply` a slowdown that compiling in-process costs it under
  `host_memory` (BUILD.md, "Host memory").
  """
  return flags.DEFINE_string(
      'compilation_cache_dir',
      os.path.join(os.environ.get('XDG_CACHE_HOME',
                                  os.path.expanduser('~/.cache')),
                   'sact_jax', 'jax_compilation_cache'),
      'Persistent XLA compilation cache (cuts start-up of later runs by '
      "seconds to minutes); '' disables it.")


class MultihostFlags:
  """--multihost, or --coordinator_address, --num_processes, --process_id.

  Of the launchers that train; one definition, so that they take the same
  flags and refuse the same mistakes.
  """

  def __init__(self):
    self.multihost = flags.DEFINE_bool(
        'multihost', False, 'Call jax.distributed.initialize() with the '
        "cluster's auto-detected settings (TPU pods, SLURM, Open MPI).")
    self.coordinator_address = flags.DEFINE_string(
        'coordinator_address', None, 'HOST:PORT of process 0, for multi-host '
        'runs outside auto-detected clusters.')
    self.num_processes = flags.DEFINE_integer(
        'num_processes', None,
        'Number of processes (with --coordinator_address).', lower_bound=1)
    self.process_id = flags.DEFINE_integer(
        'process_id', None,
        'This process, 0 to N - 1 (with --coordinator_address).',
        lower_bound=0)

  def initialize(self) -> None:
    """Starts `jax.distributed` as the flags ask, before any other jax use.

    Flags that contradict each other are refused before jax is called (it
    would ignore some or fail with a traceback); jax's own refusal, e.g. of
    --multihost off a cluster, ends as one line too.
    """
    address = self.coordinator_address.value
    num_processes, process_id = self.num_processes.value, self.process_id.value
    if not address:
      if num_processes is not None or process_id is not None:
        fail('--num_processes and --process_id need --coordinator_address '
             '(on a cluster jax detects, give --multihost alone).')
      if not self.multihost.value:
        return
    elif None not in (num_processes, process_id) and (
        process_id >= num_processes):
      fail(f'--process_id={process_id} must lie in [0, {num_processes}) '
           f'with --num_processes={num_processes}.')
    try:
      if address:
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=num_processes,
                                   process_id=process_id)
      else:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # JaxRuntimeError too.
      if address:
        hint = ('outside a cluster jax detects, give --num_processes and '
                '--process_id too' if None in (num_processes, process_id)
                else f'--coordinator_address={address}: HOST:PORT of '
                'process 0')
      else:
        hint = ('--multihost needs a cluster jax detects; elsewhere give '
                '--coordinator_address, --num_processes and --process_id')
      fail(f'jax.distributed.initialize failed: {one_line(e)} ({hint})')


def configure_jax(cache_dir: str) -> None:
  """What launchers that train or evaluate set up before any other jax use.

  rbg keys make model init several times faster on CPU (no compilation per
  parameter shape); the cache skips compilations made by earlier runs.
  """
  jax.config.update('jax_default_prng_impl', 'rbg')
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _drop_restore_noise(unraisable) -> None:
  """Drops the tracebacks a damaged checkpoint leaves around its error line.

  orbax restores through asyncio; when TensorStore fails on one array, the
  other reads' coroutines die with it or call back into the closed event
  loop, and Python prints each as an unraisable exception.
  """
  error, source = unraisable.exc_value, unraisable.object
  code = getattr(source, 'cr_code', None)
  if (isinstance(error, RuntimeError)
      and str(error) == 'Event loop is closed') or (
          code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename):
    return
  sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with this module's conventions for bad input.

  `app.UsageError`s raised by `main` (absl would print the whole usage text
  and exit 1) end as one line with exit status 2 too. Freed host memory is
  kept for reuse (`host_memory`) before JAX starts its backend; orbax's and
  tfds's INFO lines are dropped. The flags defined here are key flags of the
  launcher, so that its --help lists them (absl lists only the main
  module's). jax's INFO line on each absent platform is dropped.
  """
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  host_memory.reuse_freed_memory()
  logging.get_absl_logger().addFilter(_QuietLibraries())
  py_logging.getLogger('jax._src.xla_bridge').addFilter(_drop_backend_probe)
  sys.unraisablehook = _drop_restore_noise
  # The same reads' tasks, logged by asyncio ("Task exception was never
  # retrieved"); the launchers run no asyncio code of their own.
  py_logging.getLogger('asyncio').setLevel(py_logging.CRITICAL)

  def checked_main(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(one_line(e))

  app.run(checked_main, flags_parser=parse_flags)
