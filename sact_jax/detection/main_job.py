"""The detection main job: train, evaluate, draw, into one workdir.

As `sact_jax/main_job.py` for classification: `config.json` first,
checkpoints and metrics while training, then `eval.json` (COCO metrics,
extractor FLOPs, ponder costs; written last, so its presence says the run
is finished) and `detections.png` (detections beside the extractor's
ponder maps, the paper's first figure).
"""

import os
from typing import Any

import jax
import ml_collections

from sact_jax import checkpoint
from sact_jax import evaluate as classification_eval
from sact_jax import main_job as classification_job
from sact_jax import parallel
from sact_jax import workdirs
from sact_jax.detection import evaluate as evaluate_lib
from sact_jax.detection import train as train_lib

PICTURE_FILE = 'detections.png'


def check_inputs(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Everything a run reads, checked before anything is written.

  The config (also against the run already in `workdir`), the dataset and
  `init_from` (read in full, unless the run resumes and will not read it):
  each would otherwise fail only after `config.json` is written, or the
  training started.

  Raises:
    validation.ConfigError: a bad config or `data_dir`, or a workdir that
      holds another run.
    data.DatasetNotFoundError: the dataset is not prepared.
    checkpoint.CheckpointError: `init_from` cannot be read or does not fit.
  """
  train_lib.validate_config(config, workdir)
  classification_job.check_resumable(config, workdir)
  train_lib.check_data(config)
  if checkpoint.latest_run_step(workdir) is None:
    train_lib.check_init_from(config)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any] | None:
  """Trains the detector, evaluates it and draws its detections.

  Nothing is written (not even `workdir`) unless `check_inputs` passes
  and `workdir` can be written.

  Returns:
    The evaluation metrics (also in `workdir/eval.json`), or None when
    training was preempted.

  Raises:
    The errors of `check_inputs`, workdirs.WorkdirError, and those of
    `train.train`.
  """
  check_inputs(config, workdir)
  workdirs.ensure_writable_dir(workdir)
  classification_job.write_config(config, workdir)
  result = train_lib.train(config, workdir)
  if result.preempted:
    return None
  metrics = result.eval_metrics
  if metrics is None:
    metrics = evaluate_lib.evaluate_detector(result.model, config)
  num_pictures = config.get('num_detection_pictures', 0)
  if num_pictures and jax.process_index() == 0:
    evaluate_lib.save_detection_pictures(
        parallel.local_copy(result.model), config,
        os.path.join(workdir, PICTURE_FILE), num_images=num_pictures)
  classification_job.check_resumable(config, workdir)
  if jax.process_index() == 0:
    classification_eval.save_json(
        metrics, os.path.join(workdir, classification_job.EVAL_FILE))
  return metrics
