"""The main job: train, then evaluate, then draw, into one workdir.

The top floor of the library: training, evaluation and pictures each depend
only on lower floors (models, data, checkpoints); this module is the one
place that runs them in sequence, and `experiments/train.py` calls it.
"""

import json
import os
from typing import Any

import jax
import ml_collections

from sact_jax import evaluate
from sact_jax import parallel
from sact_jax import train as train_lib
from sact_jax import visualize

PONDER_MAPS_DIR = 'ponder_maps'
# Written last: its presence says the run is finished (sact_jax.sweep).
EVAL_FILE = 'eval.json'
# The run's config as JSON, written first: what `sact_jax.tradeoff` reads
# next to `eval.json` (tau is not part of the model eval.json describes).
CONFIG_FILE = 'config.json'


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any] | None:
  """Trains, evaluates and draws ponder maps (SACT) into `workdir`.

  The evaluation of the final model is the training loop's own last one
  when it evaluated at the last step (no second pass over the test split).

  `config.json` is written before training and `eval.json` after
  everything else, so a workdir with `eval.json` holds a finished run.

  Returns:
    The evaluation metrics (also in `workdir/eval.json`), or None when
    training was preempted.
  """
  if jax.process_index() == 0:
    evaluate.save_json(json.loads(config.to_json_best_effort()),
                       os.path.join(workdir, CONFIG_FILE))
  result = train_lib.train(config, workdir)
  if result.preempted:
    return None
  metrics = result.eval_metrics
  if metrics is None:
    metrics = evaluate.evaluate_model(result.model, config)
  else:
    evaluate.log_table(metrics)
  num_maps = config.get('num_ponder_maps', 0)
  if config.model_type == 'sact' and num_maps > 0:
    model = parallel.local_copy(result.model)
    if jax.process_index() == 0:
      visualize.save_ponder_maps(model, config,
                                 os.path.join(workdir, PONDER_MAPS_DIR),
                                 num_images=num_maps)
  if jax.process_index() == 0:
    evaluate.save_json(metrics, os.path.join(workdir, EVAL_FILE))
  return metrics
