r"""Trains (resumes), evaluates and draws a detector: sact_jax.detection.

  python -m experiments.train_detection \
      --config=sact_jax/configs/detection.py:sact \
      --config.init_from=/tmp/shapes_classifier --workdir=/tmp/detection_sact

Writes checkpoints, metrics (TensorBoard, metrics.jsonl), `eval.json`
(COCO metrics, extractor FLOPs and ponder costs) and `detections.png` to
the workdir; a workdir with a checkpoint resumes. Multi-host as
experiments/train.py: `--multihost` on a cluster jax detects, elsewhere
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.

Bad input (flags, config, dataset, init_from, a workdir that cannot be
written or holds another model) ends with one `error:` line and exit
status 2 before any work starts; a non-finite loss with exit status 1 (see
experiments/_cli.py).
"""

from absl import flags
from ml_collections import config_flags

from experiments import _cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Detection config file, e.g. '
    'sact_jax/configs/detection.py:sact.', lock_config=True)
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
  from sact_jax import train  # pylint: disable=g-import-not-at-top
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  from sact_jax.configs import validation  # pylint: disable=g-import-not-at-top
  from sact_jax.detection import main_job  # pylint: disable=g-import-not-at-top

  config = _cli.config_value(_CONFIG)
  try:
    # Checks the config, data, init_from and workdir before it writes.
    main_job.train_and_evaluate(config, _WORKDIR.value)
  except (validation.ConfigError, data.DatasetNotFoundError,
          checkpoint.CheckpointError, workdirs.WorkdirError) as e:
    _cli.fail(str(e))
  except train.NonFiniteLossError as e:
    _cli.fail(str(e), _cli.RUN_FAILED)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  _cli.run(main)
