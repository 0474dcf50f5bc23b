r"""Evaluates a trained detector: COCO metrics, extractor FLOPs, pictures.

  python -m experiments.evaluate_detection --workdir=/tmp/detection_sact

Restores the latest checkpoint of the training run in `--workdir` (with
its `config.json`, or the run's `--config`), prints one line of metrics,
writes them as JSON to `--output` (default: `eval.json` in the workdir)
and draws `--pictures` eval images (default 8; 0: none) into
`detections.png` next to it (detections beside the extractor's ponder
maps).

Bad input (flags, config, dataset, a missing checkpoint, an output that
cannot be written) ends with one `error:` line and exit status 2 before
the evaluation starts (see experiments/_cli.py).
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import _cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, "The detection config of the training run; default: the "
    "run's config.json.", lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.',
                               required=True)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'JSON output path (default: eval.json in the workdir).')
_CACHE_DIR = _cli.define_cache_flag()
_PICTURES = flags.DEFINE_integer(
    'pictures', 8, 'Eval images drawn into detections.png next to the '
    'output; 0: none.', lower_bound=0)


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value
  if not workdir:
    _cli.fail('--workdir is an empty path.')
  if _OUTPUT.value == '':
    _cli.fail('--output is an empty path: give a file name, or leave it out '
              'for eval.json in the workdir.')
  output = _OUTPUT.value or os.path.join(workdir, 'eval.json')
  config = _cli.config_value(_CONFIG)
  _cli.configure_jax(_CACHE_DIR.value)
  from sact_jax import data  # pylint: disable=g-import-not-at-top
  from sact_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sact_jax import main_job as classification_job  # pylint: disable=g-import-not-at-top
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  from sact_jax.detection import evaluate as detection_eval  # pylint: disable=g-import-not-at-top
  from sact_jax.detection import main_job  # pylint: disable=g-import-not-at-top
  from sact_jax.detection import train as detection_train  # pylint: disable=g-import-not-at-top

  # ValueErrors: ConfigError, CheckpointError, WorkdirError, and the
  # evaluation's own refusals of bad settings.
  try:
    if config is None:
      config = classification_job.read_config(workdir)
    detection_train.validate_config(config, workdir, init_from=False)
    try:
      detection_eval.check_num_images(config, _PICTURES.value)
    except ValueError as e:
      raise ValueError(f'--pictures: {e}') from None
    detection_train.check_data(config, train=False)
    model = detection_train.restore_detector(config, workdir)
  except (ValueError, data.DatasetNotFoundError) as e:
    _cli.fail(_cli.one_line(e))
  try:
    workdirs.ensure_writable_file(output)
    metrics = detection_eval.evaluate_detector(model, config)
    evaluate.save_json(metrics, output)
    if _PICTURES.value:
      detection_eval.save_detection_pictures(
          model, config,
          os.path.join(os.path.dirname(os.path.abspath(output)),
                       main_job.PICTURE_FILE),
          num_images=_PICTURES.value)
  except (ValueError, data.DatasetNotFoundError) as e:
    _cli.fail(_cli.one_line(e))
  print(detection_eval.summary_line(metrics))
  print(f'Metrics written to {output}.')


if __name__ == '__main__':
  _cli.run(main)
