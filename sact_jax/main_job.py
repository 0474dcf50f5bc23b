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

from sact_jax import checkpoint
from sact_jax import evaluate
from sact_jax import parallel
from sact_jax import train as train_lib
from sact_jax import visualize
from sact_jax.configs import validation

PONDER_MAPS_DIR = 'ponder_maps'
# Written last: its presence says the run is finished (`is_finished`).
EVAL_FILE = 'eval.json'
# The run's config as JSON, written first: what `sact_jax.tradeoff` reads
# next to `eval.json` (tau is not part of the model eval.json describes).
CONFIG_FILE = 'config.json'
# Config fields a resumed run may change: where data comes from, how often
# it logs, checkpoints and evaluates, what it draws, runtime options that
# leave the weights' meaning alone, and how long it trains (a schedule
# that decays over `num_train_steps` is then stretched from the resumed
# step on: the run matches no run trained to either length from scratch).
# Not `data_workers`: the saved data position fits only a pipeline with as
# many workers.
RESUMABLE_FIELDS = frozenset({
    'data_dir', 'eval_batch_size', 'log_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'eval_every_steps',
    'num_eval_examples', 'num_ponder_maps', 'num_eval_ponder_maps',
    'num_detection_pictures', 'remat', 'unroll', 'num_train_steps',
    # Read only by a run's first start (it may have moved since).
    'init_from'})


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was trained with (its `config.json`).

  Raises:
    validation.ConfigError: there is none, or it cannot be read.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise validation.ConfigError(f'{workdir} does not exist.')
  if not os.path.isfile(path):
    raise validation.ConfigError(
        f'{workdir} has no {CONFIG_FILE}: give the --config of its training '
        'run.')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise validation.ConfigError(f'Cannot read {path}: {e}') from None


def _flatten(fields: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested config fields as one dict keyed by dotted paths."""
  flat = {}
  for key, value in fields.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run under a config that would make its record lie.

  `config.json` says how the checkpoints in `workdir` were trained; a run
  resumed with another tau, schedule or dataset would overwrite it while
  the weights keep the old training (and `sact_jax.tradeoff` would label
  them with the new tau). Fields in `RESUMABLE_FIELDS` may change, and
  `num_train_steps` not below the latest checkpoint's step.

  Raises:
    validation.ConfigError: one line naming the changed fields.
  """
  step = checkpoint.latest_run_step(workdir)
  if step is None or not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return
  # Dotted paths ('detector.crop_size'); a field only one side has (added
  # to the schema since) is no change.
  saved = _flatten(read_config(workdir).to_dict())
  current = _flatten(json.loads(config.to_json_best_effort()))
  changed = [f'{key} {saved[key]!r} -> {current[key]!r}'
             for key in sorted(saved.keys() & current.keys())
             if key not in RESUMABLE_FIELDS and saved[key] != current[key]]
  if changed:
    raise validation.ConfigError(
        f'{workdir} holds a run trained with other settings '
        f'({"; ".join(changed)}, says its {CONFIG_FILE}); resume it with '
        'its own config or use another --workdir.')
  if config.num_train_steps < step:
    raise validation.ConfigError(
        f'num_train_steps={config.num_train_steps} is below the step-{step} '
        f'checkpoint in {workdir}; resume with at least {step} or use '
        'another --workdir.')


def is_finished(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether `workdir` holds the evaluated end of `config`'s training.

  Its `eval.json`, unless its latest checkpoint is before
  `config.num_train_steps` (a run to extend). A finished run whose
  checkpoints were deleted to save space stays finished.
  """
  if not os.path.exists(os.path.join(workdir, EVAL_FILE)):
    return False
  step = checkpoint.latest_run_step(workdir)
  return step is None or step >= config.num_train_steps


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records `config` as the run's (`config.json`) before training.

  A finished run extended by a larger `num_train_steps` is no longer
  finished: its `eval.json` goes too, so that a preempted extension leaves
  no workdir that looks finished with the shorter run's numbers.
  """
  if jax.process_index() != 0:
    return
  eval_path = os.path.join(workdir, EVAL_FILE)
  if os.path.exists(eval_path) and not is_finished(config, workdir):
    os.remove(eval_path)
  evaluate.save_json(json.loads(config.to_json_best_effort()),
                     os.path.join(workdir, CONFIG_FILE))


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
  check_resumable(config, workdir)
  write_config(config, workdir)
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
