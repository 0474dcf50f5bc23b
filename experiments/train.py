r"""Trains (resumes) and evaluates a model: a thin launcher of sact_jax.train.

  python -m experiments.train --config=sact_jax/configs/default.py \
      --workdir=/tmp/sact_shapes

  python -m experiments.train --config=sact_jax/configs/cifar10.py:sact_110 \
      --config.tau=0.005 --workdir=/tmp/cifar10_sact_110

Multi-host: start the same command on every host. On a cluster that jax
detects (TPU pods, SLURM, Open MPI) pass `--multihost`; elsewhere give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. The
workdir must be on a filesystem all hosts share.

Bad input (flags, config, dataset, a workdir that cannot be written or holds
another model) ends with one `error:` line and exit status 2 before any work
starts; a non-finite loss with exit status 1 (see experiments/_cli.py).
"""

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import _cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. '
    'sact_jax/configs/default.py or sact_jax/configs/cifar10.py:sact_110.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics, evaluation and '
    'pictures; a workdir with a checkpoint resumes.', required=True)
_MULTIHOST = _cli.MultihostFlags()
_CACHE_DIR = _cli.define_cache_flag()


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  _cli.configure_jax(_CACHE_DIR.value)
  _MULTIHOST.initialize()

  # Imported after jax is configured.
  from sact_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sact_jax import data  # pylint: disable=g-import-not-at-top
  from sact_jax import main_job  # pylint: disable=g-import-not-at-top
  from sact_jax import train  # pylint: disable=g-import-not-at-top
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  from sact_jax.configs import validation  # pylint: disable=g-import-not-at-top

  logging.info('JAX %s, process %d of %d, %d local / %d global devices: %s',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               ', '.join(str(d) for d in jax.local_devices()))
  config = _cli.config_value(_CONFIG)
  try:
    validation.validate_config(config, _WORKDIR.value)
    data.check_available(config.dataset, config.get('data_dir'))
    # After the config (a bad one leaves no directory behind), before any
    # work: training would only find out when it first writes.
    workdirs.ensure_writable_dir(_WORKDIR.value)
    main_job.train_and_evaluate(config, _WORKDIR.value)
  except (validation.ConfigError, data.DatasetNotFoundError,
          checkpoint.CheckpointError, workdirs.WorkdirError) as e:
    _cli.fail(str(e))
  except train.NonFiniteLossError as e:
    _cli.fail(str(e), _cli.RUN_FAILED)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  _cli.run(main)
