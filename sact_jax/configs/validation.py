"""What a training config means for the model and data, checked up front.

`validate_config` checks everything that can be checked before any work
starts, so a bad config ends with one line and nothing written. Kept apart
from the config files (which import only `sact_jax.configs`) because it needs
the models, the datasets and the checkpoints.
"""

import math
import numbers
import os

import jax
import ml_collections

from sact_jax import blocks
from sact_jax import checkpoint as checkpoint_lib
from sact_jax import data as data_lib
from sact_jax import models


class ConfigError(ValueError):
  """A config (or workdir) that training cannot start with; one line."""


def model_spec(config: ml_collections.ConfigDict) -> models.ModelSpec:
  """The architecture `config` describes (raises ConfigError if invalid)."""
  try:
    return models.ModelSpec.from_config(config)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'Invalid model in config: {e}') from None


def model_options(config: ml_collections.ConfigDict) -> dict[str, object]:
  """Runtime options of `create_model` (not part of the weights' spec)."""
  return {'remat': config.get('remat'),
          'unroll': config.get('unroll', False)}


def label_offset(config: ml_collections.ConfigDict) -> int:
  """Shift of dataset labels into the model's classes (data.label_offset)."""
  try:
    return data_lib.label_offset(config.dataset, config.num_classes)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate_config(config: ml_collections.ConfigDict,
                    workdir: str | None = None) -> None:
  """Checks everything that can be checked before any work starts.

  Args:
    config: a training config (see `sact_jax.configs.base_config`).
    workdir: if given and it holds a checkpoint, the checkpoint's model must
      be the model of `config`.

  Raises:
    ConfigError: one line naming the problem.
  """
  def check(condition, message):
    if not condition:
      raise ConfigError(message)

  try:
    info = data_lib.dataset_info(config.dataset)
  except (ValueError, KeyError) as e:
    raise ConfigError(
        f'Unknown dataset {config.dataset!r}: supported datasets are '
        f'{", ".join(data_lib.SUPPORTED_DATASETS)} (sact_shapes also as '
        f'sact_shapes/tiny). ({e})') from None
  check(config.tau >= 0, f'tau must be >= 0, got {config.tau}.')
  check(0 < config.eps < 1, f'eps must lie in (0, 1), got {config.eps}.')
  remat = config.get('remat')
  check(blocks.is_remat_mode(remat),
        f"remat must be None, True, False or 'convs', got {remat!r}.")
  spec = model_spec(config)
  label_offset(config)
  try:
    data_lib.image_shape(config.dataset, config.image_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check(config.image_size >= 8,
        f'image_size must be >= 8, got {config.image_size}.')
  check(info.image_shape[-1] == 3,
        f'{config.dataset} has {info.image_shape[-1]}-channel images; the '
        'models take RGB (3 channels).')

  validate_optimization(config)
  _check_eval_sizes(config, info)
  # A resumed run reads its own checkpoint, never init_from (which may have
  # moved since).
  resuming = (workdir is not None
              and checkpoint_lib.latest_run_step(workdir) is not None)
  if config.get('init_from') and not resuming:
    check(checkpoint_lib.is_model_checkpoint(config.init_from),
          f'init_from={config.init_from!r} is not a sact_jax model '
          'checkpoint directory (written by sact_jax.checkpoint.save_model '
          'or experiments.convert_checkpoint).')
  if workdir is not None:
    check(workdir, 'workdir is an empty path.')
    check_workdir(workdir, spec)


def _check_eval_sizes(config: ml_collections.ConfigDict,
                      info: data_lib.DatasetInfo) -> None:
  """Images asked of the eval split fit it (else evaluation or the ponder
  maps would fail only after training)."""
  available = info.eval_size(config.get('eval_split', None))
  if available is None:
    return
  asked = {'num_eval_examples': config.get('num_eval_examples')}
  if config.model_type == 'sact':  # The models whose maps are drawn.
    asked['num_ponder_maps'] = config.get('num_ponder_maps', 0)
    asked['num_eval_ponder_maps'] = config.get('num_eval_ponder_maps', 0)
  for name, value in asked.items():
    if value is not None and value > available:
      raise ConfigError(
          f'{name}={value} is more than the {available} images of the '
          f'{info.eval_split} split of {config.dataset}.')


def check_workdir(workdir: str, spec: models.ModelSpec) -> None:
  """A workdir to resume must hold a checkpoint of the same model, if any."""
  saved = checkpoint_lib.saved_run_spec(workdir)
  if saved is not None and saved != spec:
    raise ConfigError(
        f'{os.path.join(workdir, checkpoint_lib.RUN_DIR)} holds a checkpoint '
        f'of a different model ({saved.describe()}) than the config '
        f'({spec.describe()}); use another --workdir.')


def validate_optimization(config: ml_collections.ConfigDict) -> None:
  """The batch, schedule, optimizer and cadence fields of a training config.

  Shared by classification and detection training (`base_config` fields).

  Raises:
    ConfigError: one line naming the problem.
  """
  def check(condition, message):
    if not condition:
      raise ConfigError(message)

  for name, value in _floats(config.to_dict()):
    check(math.isfinite(value), f'{name} must be finite, got {value}.')
  seed = config.get('seed', 0)
  check(isinstance(seed, int) and seed >= 0,
        f'seed must be an integer >= 0, got {seed!r}.')
  num_devices, num_hosts = jax.device_count(), jax.process_count()
  for name in ('batch_size', 'eval_batch_size'):
    value = config[name]
    check(isinstance(value, int) and value >= 1,
          f'{name} must be a positive integer, got {value!r}.')
  check(config.batch_size % num_devices == 0,
        f'batch_size={config.batch_size} is not divisible by the '
        f'{num_devices} devices; use a multiple of {num_devices}.')
  check(config.batch_size % num_hosts == 0,
        f'batch_size={config.batch_size} is not divisible by the '
        f'{num_hosts} hosts.')
  check(config.num_train_steps >= 0,
        f'num_train_steps must be >= 0, got {config.num_train_steps}.')
  check(config.learning_rate > 0,
        f'learning_rate must be > 0, got {config.learning_rate}.')
  schedule = config.get('lr_schedule', 'piecewise')
  check(schedule in ('piecewise', 'staircase', 'cosine'),
        "lr_schedule must be 'piecewise', 'staircase' or 'cosine', got "
        f'{schedule!r}.')
  if schedule == 'staircase':
    decay_steps = config.get('lr_decay_steps')
    check(isinstance(decay_steps, int) and decay_steps >= 1,
          f"lr_decay_steps must be an integer >= 1 for lr_schedule="
          f"'staircase', got {decay_steps!r}.")
    factor = config.get('lr_decay_factor', 0.1)
    check(0 < factor <= 1,
          f'lr_decay_factor must lie in (0, 1], got {factor}.')
  warmup = config.get('warmup_steps', 0)
  check(isinstance(warmup, int) and warmup >= 0,
        f'warmup_steps must be an integer >= 0, got {warmup!r}.')
  check(schedule != 'cosine' or warmup < max(config.num_train_steps, 1),
        f'warmup_steps={warmup} must be below num_train_steps='
        f'{config.num_train_steps}.')
  boundaries, scales = tuple(config.lr_boundaries), tuple(config.lr_scales)
  check(len(boundaries) == len(scales),
        f'lr_boundaries {boundaries} and lr_scales {scales} must have the '
        'same length.')
  check(all(b > a for a, b in zip(boundaries, boundaries[1:]))
        and all(b >= 0 for b in boundaries),
        f'lr_boundaries must be increasing and >= 0, got {boundaries}.')
  check(0 <= config.momentum < 1,
        f'momentum must lie in [0, 1), got {config.momentum}.')
  check(config.weight_decay >= 0,
        f'weight_decay must be >= 0, got {config.weight_decay}.')
  check(0 <= config.label_smoothing < 1,
        f'label_smoothing must lie in [0, 1), got {config.label_smoothing}.')
  for name in ('log_every_steps', 'checkpoint_every_steps',
               'keep_checkpoints'):
    check(config[name] >= 1, f'{name} must be >= 1, got {config[name]}.')
  for name in ('eval_every_steps', 'num_eval_ponder_maps', 'num_ponder_maps',
               'data_workers'):
    value = config.get(name, 0)
    check(isinstance(value, int) and value >= 0,
          f'{name} must be an integer >= 0, got {value!r}.')
  ema_decay = config.get('ema_decay')
  check(ema_decay is None or 0 < ema_decay < 1,
        f'ema_decay must lie in (0, 1) or be None, got {ema_decay}.')
  num_eval = config.get('num_eval_examples')
  check(num_eval is None or num_eval >= 1,
        f'num_eval_examples must be >= 1 or None, got {num_eval}.')


def _floats(tree, prefix=''):
  """`(dotted name, value)` of every float in a nested config dict."""
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _floats(value, f'{name}.')
    elif isinstance(value, (list, tuple)):
      for i, item in enumerate(value):
        if isinstance(item, numbers.Real) and not isinstance(item, int):
          yield f'{name}[{i}]', float(item)
    elif isinstance(value, numbers.Real) and not isinstance(value, int):
      yield name, float(value)
