r"""Trains (resumes) and evaluates a model: a thin launcher of sact_jax.train.

  python -m experiments.train --config=sact_jax/configs/default.py \
      --workdir=/tmp/sact_shapes

  python -m experiments.train --config=sact_jax/configs/cifar10.py:sact_110 \
      --config.tau=0.005 --workdir=/tmp/cifar10_sact_110

Multi-host: start the same command on every host. On a cluster that jax
detects (TPU pods, SLURM, Open MPI) pass `--multihost`; elsewhere give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. The
workdir must be on a filesystem all hosts share.

Bad input (config, dataset, workdir of another model) ends with one error
line and exit status 2; a non-finite loss with exit status 1.
"""

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. '
    'sact_jax/configs/default.py or sact_jax/configs/cifar10.py:sact_110.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics, evaluation and '
    'pictures; a workdir with a checkpoint resumes.', required=True)
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() with the '
    "cluster's auto-detected settings.")
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for multi-host '
    'runs outside auto-detected clusters.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process (with --coordinator_address).')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir',
    os.path.join(os.environ.get('XDG_CACHE_HOME',
                                os.path.expanduser('~/.cache')),
                 'sact_jax', 'jax_compilation_cache'),
    'Persistent XLA compilation cache (cuts start-up of later runs by '
    "seconds to minutes); '' disables it.")


class _QuietLibraries:
  """Drops INFO records of orbax and tfds (dozens per checkpoint)."""

  _NOISY = (f'{os.sep}orbax{os.sep}', f'{os.sep}tensorflow_datasets{os.sep}')

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def _fail(message: str, status: int) -> None:
  """One error line on stderr, no traceback."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(_QuietLibraries())
  # Before any other jax use: rbg keys make model init several times faster
  # on CPU (no compilation per parameter shape), and the cache skips
  # compilations made by earlier runs.
  jax.config.update('jax_default_prng_impl', 'rbg')
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if _COORDINATOR.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()

  # Imported after jax is configured.
  from sact_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sact_jax import data  # pylint: disable=g-import-not-at-top
  from sact_jax import train  # pylint: disable=g-import-not-at-top

  logging.info('JAX %s, process %d of %d, %d local / %d global devices: %s',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               ', '.join(str(d) for d in jax.local_devices()))
  try:
    # A config file that cannot be loaded is only reported on first use.
    config = _CONFIG.value
    config.get('dataset')
  except OSError as e:
    _fail(_one_line(e), 2)
  try:
    train.validate_config(config, _WORKDIR.value)
    train.train_and_evaluate(config, _WORKDIR.value)
  except (train.ConfigError, data.DatasetNotFoundError,
          checkpoint.CheckpointError) as e:
    _fail(str(e), 2)
  except train.NonFiniteLossError as e:
    _fail(str(e), 1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but bad flags end with one line and exit status 2.

  ml_collections puts the config file's whole traceback into the flag error
  (e.g. for an unknown variant); only its last line, the error, is kept.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # Raised by ml_collections for --config.<field> that the config lacks.
    _fail(f'Unknown config field {str(e).strip(chr(34))}: overrides can only '
          'set fields that the config file defines.', 2)
  except (flags.Error, TypeError, ValueError) as e:
    _fail(_one_line(e), 2)


def _one_line(error: Exception) -> str:
  """The first and last lines of a message that may embed a traceback."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}'


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=_parse_flags)
