"""The detection main job: train, evaluate, draw, into one workdir.

As `sact_jax/main_job.py` for classification: `config.json` first,
checkpoints and metrics while training, then `eval.json` (COCO metrics,
extractor FLOPs, ponder costs; written last, so its presence says the run
is finished) and `detections.png` (detections beside the extractor's
ponder maps, the paper's first figure).
"""

import json
import os
from typing import Any

import jax
import ml_collections

from sact_jax import evaluate as classification_eval
from sact_jax import main_job as classification_job
from sact_jax import parallel
from sact_jax.detection import evaluate as evaluate_lib
from sact_jax.detection import train as train_lib

PICTURE_FILE = 'detections.png'


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any] | None:
  """Trains the detector, evaluates it and draws its detections.

  Returns:
    The evaluation metrics (also in `workdir/eval.json`), or None when
    training was preempted.
  """
  classification_job.check_resumable(config, workdir)
  if jax.process_index() == 0:
    classification_eval.save_json(
        json.loads(config.to_json_best_effort()),
        os.path.join(workdir, classification_job.CONFIG_FILE))
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
