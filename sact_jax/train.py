"""Training loop: data-parallel SGD on one mesh, orbax checkpoints, metrics.

* One mesh with a single 'data' axis over every device of every host. Each
  host reads its own shard of the data; its batch rows become its devices'
  rows of a global batch (`jax.make_array_from_process_local_data`). The
  train state is replicated; `jax.jit` with donation runs the step, and XLA
  inserts the all-reduces (gradients and BatchNorm statistics are over the
  global batch, so 1 and N devices compute the same step). No pmap.
* Loss: cross-entropy (+ label smoothing) + tau * ponder loss + the
  reference's L2 weight decay on conv/dense kernels; optax SGD with momentum
  and a piecewise constant learning rate.
* orbax `CheckpointManager` in `workdir/checkpoints`: train state (params,
  BatchNorm statistics, optimizer state, step) as plain nested dicts, the
  position of every host's data iterator, and the model spec. Saved every
  `checkpoint_every_steps`, at the end, and on SIGTERM (preemption); a
  workdir with a checkpoint resumes from it.
* Metrics at a steady cadence: TensorBoard (tensorboardX: no TensorFlow
  needed), `workdir/metrics.jsonl` and a console line. Files are written by
  process 0 only.
* A non-finite loss (or parameters) stops training before the next
  checkpoint, so the last good checkpoint is never overwritten.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
from flax import nnx
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from sact_jax import checkpoint as checkpoint_lib
from sact_jax import data as data_lib
from sact_jax import evaluate
from sact_jax import flops as flops_lib
from sact_jax import models
from sact_jax import parallel
from sact_jax import visualize

CHECKPOINT_DIR = checkpoint_lib.RUN_DIR
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'

# Evaluation metrics written as `eval/<name>` summaries.
_EVAL_SCALARS = ('top1_accuracy', 'flops_percent_of_vanilla',
                 'ponder_cost_total', 'ponder_inside_outside_ratio')

Batch = dict[str, np.ndarray]
Metrics = dict[str, jax.Array]


class ConfigError(ValueError):
  """A config (or workdir) that training cannot start with; one line."""


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or parameters and stopped."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def model_spec(config: ml_collections.ConfigDict) -> models.ModelSpec:
  """The architecture `config` describes (raises ConfigError if invalid)."""
  try:
    return models.ModelSpec.from_config(config)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'Invalid model in config: {e}') from None


def model_options(config: ml_collections.ConfigDict) -> dict[str, bool]:
  """Runtime options of `create_model` (not part of the weights' spec)."""
  return {'remat': config.get('remat', False),
          'unroll': config.get('unroll', False)}


def label_offset(config: ml_collections.ConfigDict) -> int:
  """Shift of dataset labels into the model's classes (see data.label_offset)."""
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
  check(schedule in ('piecewise', 'cosine'),
        f"lr_schedule must be 'piecewise' or 'cosine', got {schedule!r}.")
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
  for name in ('eval_every_steps', 'num_eval_ponder_maps'):
    value = config.get(name, 0)
    check(isinstance(value, int) and value >= 0,
          f'{name} must be an integer >= 0, got {value!r}.')
  ema_decay = config.get('ema_decay')
  check(ema_decay is None or 0 < ema_decay < 1,
        f'ema_decay must lie in (0, 1) or be None, got {ema_decay}.')
  num_eval = config.get('num_eval_examples')
  check(num_eval is None or num_eval >= 1,
        f'num_eval_examples must be >= 1 or None, got {num_eval}.')
  if config.get('init_from'):
    check(checkpoint_lib.is_model_checkpoint(config.init_from),
          f'init_from={config.init_from!r} is not a sact_jax model '
          'checkpoint directory (written by sact_jax.checkpoint.save_model '
          'or experiments.convert_checkpoint).')
  if workdir is not None:
    saved = checkpoint_lib.saved_run_spec(workdir)
    if saved is not None and saved != spec:
      raise ConfigError(
          f'{os.path.join(workdir, CHECKPOINT_DIR)} holds a checkpoint of a '
          f'different model ({saved.describe()}) than the config '
          f'({spec.describe()}); use another --workdir.')


def check_batch(batch: Batch, config: ml_collections.ConfigDict) -> None:
  """One clear error for input batches the model cannot take."""
  image = batch['image']
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(
        f'Expected images shaped [batch, height, width, 3] from '
        f'{config.dataset}, got shape {tuple(image.shape)}.')
  if batch['label'].shape != image.shape[:1]:
    raise ValueError(f'Expected one label per image, got labels shaped '
                     f'{tuple(batch["label"].shape)} for images shaped '
                     f'{tuple(image.shape)}.')


# ---------------------------------------------------------------------------
# Loss and optimizer
# ---------------------------------------------------------------------------


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> Callable[[jax.Array], jax.Array]:
  """The rate of the update made at `step` (0-based).

  'piecewise', as TF `piecewise_constant(step, boundaries, ...)`:
  `learning_rate * scales[i]` where i is the number of boundaries strictly
  below `step` (scale 1 before the first). 'cosine': optax's linear warm-up
  from 0 to `learning_rate` over `warmup_steps`, then cosine decay to 0 at
  `num_train_steps`.
  """
  if config.get('lr_schedule', 'piecewise') == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=0.0)
  boundaries = np.asarray(config.lr_boundaries, np.int64)
  values = config.learning_rate * np.asarray(
      (1.0, *config.lr_scales), np.float32)

  def schedule(step):
    index = jnp.sum(jnp.asarray(step)[..., None] > boundaries, axis=-1)
    return jnp.asarray(values)[index]
  return schedule


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """SGD with (heavy-ball) momentum, as TF's MomentumOptimizer."""
  return optax.sgd(learning_rate_schedule(config), momentum=config.momentum)


def _is_kernel(path: tuple[Any, ...]) -> bool:
  return str(path[-1]) == 'kernel'


def weight_decay_penalty(params: nnx.State, weight_decay: float) -> jax.Array:
  """`weight_decay * sum(w^2) / 2` over conv and dense kernels.

  This is slim's `l2_regularizer(weight_decay)`, which the reference puts on
  every conv (logits and halting convs included); BatchNorm parameters and
  biases are not decayed.
  """
  total = jnp.zeros((), jnp.float32)
  for path, variable in nnx.to_flat_state(params):
    if _is_kernel(path):
      total += jnp.sum(jnp.square(variable[...]))
  return 0.5 * weight_decay * total


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy with TF-style label smoothing.

  Targets are `onehot * (1 - s) + s / K`, as `tf.losses.softmax_cross_entropy`
  with `label_smoothing=s`.
  """
  num_classes = logits_BxK.shape[-1]
  targets_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets_BxK = (targets_BxK * (1 - label_smoothing)
                   + label_smoothing / num_classes)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxK, targets_BxK))


# ---------------------------------------------------------------------------
# Train state and step
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a training step changes.

  Attributes:
    step: number of optimizer updates made, int32 scalar.
    params: `nnx.Param` variables of the model.
    model_state: the other model variables (BatchNorm statistics).
    opt_state: optax state.
    ema: with `config.ema_decay`, the exponential moving averages of the
      model variables, `{'params': ..., 'model_state': ...}`; else None.
  """
  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: Any
  ema: dict[str, nnx.State] | None = None


def ema_update(ema: Any, new: Any, decay: float, num_updates: jax.Array
               ) -> Any:
  """One step of an exponential moving average, as TF's.

  `tf.train.ExponentialMovingAverage(decay, num_updates)` (what the original
  evaluates its ImageNet models with) uses `min(decay, (1 + n) / (10 + n))`,
  so that early averages are not dominated by the initialisation. Written as
  `ema - (1 - d) * (ema - new)`: a variable that does not change keeps its
  average exactly.
  """
  n = jnp.asarray(num_updates, jnp.float32)
  d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, x: e - (1.0 - d).astype(e.dtype) * (e - x),
                      ema, new)


@dataclasses.dataclass
class Trainer:
  """The compiled pieces of a run: model structure, optimizer, step.

  Attributes:
    config: the training config.
    mesh: the device mesh.
    spec: the model architecture.
    graphdef: NNX structure of the model in training mode.
    tx: the optimizer.
    train_step: jitted `(state, batch) -> (state, metrics)`; donates state.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  spec: models.ModelSpec
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  train_step: Callable[[TrainState, dict[str, jax.Array]],
                       tuple[TrainState, Metrics]]

  @classmethod
  def create(cls, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> 'Trainer':
    spec = model_spec(config)
    abstract = spec.abstract_model(**model_options(config))
    abstract.train()
    graphdef = nnx.graphdef(abstract)
    tx = make_optimizer(config)
    step_fn = functools.partial(
        _train_step, graphdef=graphdef, tx=tx,
        schedule=learning_rate_schedule(config), tau=config.tau,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        label_offset=label_offset(config),
        ema_decay=config.get('ema_decay'))
    train_step = jax.jit(
        step_fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0)
    return cls(config, mesh, spec, graphdef, tx, train_step)

  def _init(self) -> TrainState:
    model = self.spec.create(nnx.Rngs(self.config.seed),
                             **model_options(self.config))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state,
                      opt_state=self.tx.init(params),
                      ema=self._initial_ema(params, model_state))

  def _initial_ema(self, params: nnx.State, model_state: nnx.State
                   ) -> dict[str, nnx.State] | None:
    """The averages start at the initial variables (copies)."""
    if self.config.get('ema_decay') is None:
      return None
    return {'params': jax.tree.map(jnp.copy, params),
            'model_state': jax.tree.map(jnp.copy, model_state)}

  def init_state(self) -> TrainState:
    """A fresh state (or `config.init_from`), replicated on the mesh.

    Initialised inside one jit: one compilation instead of one per
    parameter shape, and the arrays are created in place on every device.
    """
    state = jax.jit(self._init, out_shardings=parallel.replicated(self.mesh))()
    if self.config.get('init_from'):
      model = self.model(state)
      report = checkpoint_lib.restore_into(
          model, self.config.init_from, exclude=checkpoint_lib.HALTING_HEADS)
      logging.info('Initialised from %s: %s.', self.config.init_from,
                   report.summary())
      _, params, model_state = nnx.split(model, nnx.Param, ...)
      state = jax.device_put(
          state.replace(params=params, model_state=model_state,
                        ema=self._initial_ema(params, model_state)),
          parallel.replicated(self.mesh))
    return state

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes, replicated on the mesh; no compute."""
    abstract = jax.eval_shape(self._init)
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract)

  def model(self, state: TrainState) -> nnx.Module:
    """The model holding `state`'s variables (training mode)."""
    return nnx.merge(self.graphdef, state.params, state.model_state)

  def eval_model(self, state: TrainState) -> nnx.Module:
    """The model to evaluate, eval mode: the moving averages when kept."""
    if state.ema is None:
      model = self.model(state)
    else:
      model = nnx.merge(self.graphdef, state.ema['params'],
                        state.ema['model_state'])
    model.eval()
    return model


def _train_step(state: TrainState, batch: dict[str, jax.Array], *,
                graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                schedule: Callable[[jax.Array], jax.Array], tau: float,
                weight_decay: float, label_smoothing: float,
                label_offset: int, ema_decay: float | None = None
                ) -> tuple[TrainState, Metrics]:
  """One SGD update on a global batch; returns the new state and metrics."""
  images = batch['image']
  labels = batch['label'].astype(jnp.int32) + label_offset

  def loss_fn(params):
    # Fresh Variables: BatchNorm updates its statistics in place, which NNX
    # allows only for Variables created at the current trace level.
    model_state = jax.tree.map(lambda x: x, state.model_state)
    model = nnx.merge(graphdef, params, model_state)
    logits, aux = model(images)
    ce = cross_entropy(logits, labels, label_smoothing)
    decay = weight_decay_penalty(params, weight_decay)
    loss = ce + tau * aux['ponder_loss'] + decay
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    return loss, (model_state, logits, aux, ce, decay)

  (loss, (model_state, logits, aux, ce, decay)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss)
  for leaf in jax.tree.leaves(params):
    finite &= jnp.all(jnp.isfinite(leaf))
  metrics = {
      'loss': loss,
      'cross_entropy': ce,
      'ponder_loss': aux['ponder_loss'],
      'weight_decay_loss': decay,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'flops': jnp.mean(aux['flops']),
      'learning_rate': schedule(state.step),
      'finite': finite,
  }
  for i, ponder_cost in enumerate(aux['ponder_cost']):
    metrics[f'ponder_cost/block_{i}'] = jnp.mean(ponder_cost)
  ema = state.ema
  if ema is not None:
    ema = ema_update(ema, {'params': params, 'model_state': model_state},
                     ema_decay, state.step + 1)
  new_state = TrainState(step=state.step + 1, params=params,
                         model_state=model_state, opt_state=opt_state,
                         ema=ema)
  return new_state, metrics


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def make_train_dataset(config: ml_collections.ConfigDict,
                       shard_index: int | None = None,
                       shard_count: int | None = None) -> grain.IterDataset:
  """This host's shard of the training data: global batch / host count."""
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  info = data_lib.dataset_info(config.dataset)
  return data_lib.make_dataset(
      config.dataset, info.train_split,
      batch_size=config.batch_size // shard_count, train=True,
      seed=config.seed, data_dir=config.get('data_dir'),
      shard_index=shard_index, shard_count=shard_count,
      image_size=config.image_size,
      worker_count=config.get('data_workers', 0))


def _state_tree(state: TrainState) -> dict[str, Any]:
  tree = {'step': state.step, 'params': state.params,
          'model_state': state.model_state, 'opt_state': state.opt_state}
  if state.ema is not None:
    tree['ema'] = state.ema
  return tree


def _save(manager: ocp.CheckpointManager, state: TrainState,
          iterator: grain.DatasetIterator, spec: models.ModelSpec,
          config: ml_collections.ConfigDict) -> None:
  checkpoint_lib.save_run(
      manager, int(parallel.fetch(state.step)), _state_tree(state),
      data_lib.get_iterator_state(iterator), spec,
      json.loads(config.to_json_best_effort()))


def _restore(manager: ocp.CheckpointManager, step: int, trainer: Trainer,
             iterator: grain.DatasetIterator) -> TrainState:
  restored = checkpoint_lib.restore_run(
      manager, step, _state_tree(trainer.abstract_state()), iterator)
  return TrainState(**restored)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


class MetricWriter:
  """TensorBoard scalars and JSON lines; a no-op except on process 0."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      # tensorboardX: event files without TensorFlow.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    record = {'step': step, 'time': time.time(), **scalars}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def write_image(self, step: int, tag: str, image_HxWx3: np.ndarray) -> None:
    """An RGB uint8 picture, shown in TensorBoard's Images tab."""
    if self._active:
      self._tb.add_image(tag, image_HxWx3, step, dataformats='HWC')

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
      self._active = False


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


# ---------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------


class _PreemptionWatcher:
  """Says when to save and stop because the process got SIGTERM.

  One process: a SIGTERM handler sets a flag (checked between steps).
  Several: jax's preemption service (started by `jax.distributed`, which
  catches SIGTERM itself) picks a step at which every host stops together.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multihost = jax.process_count() > 1
    if (not self._multihost
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # The preemption service is not running.
        return False
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    model: the trained model, eval mode (the moving averages with
      `ema_decay`).
    state: the final train state.
    preempted: training stopped early on SIGTERM (after saving).
    eval_metrics: `evaluate.evaluate_model`'s metrics of the final model
      when the loop evaluated at the last step (`eval_every_steps` divides
      `num_train_steps`), else None.
  """
  model: nnx.Module
  state: TrainState
  preempted: bool
  eval_metrics: dict[str, Any] | None = None


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains (or resumes) the model of `config`, checkpointing in `workdir`.

  Raises:
    ConfigError: bad config, or `workdir` holds another model.
    data.DatasetNotFoundError: the dataset is not prepared.
    NonFiniteLossError: the loss or parameters became non-finite; the last
      good checkpoint is kept.
  """
  validate_config(config, workdir)
  mesh = parallel.make_mesh()
  trainer = Trainer.create(config, mesh)
  spec = trainer.spec
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  dataset = make_train_dataset(config)
  iterator = iter(dataset)

  manager = checkpoint_lib.run_manager(workdir, keep=config.keep_checkpoints)
  writer = watcher = None
  try:
    latest = manager.latest_step()
    start = time.time()
    if latest is not None:
      state = _restore(manager, latest, trainer, iterator)
      logging.info('Resumed from the step-%d checkpoint in %s.', latest,
                   workdir)
    else:
      state = trainer.init_state()
    step = int(parallel.fetch(state.step))
    logging.info('Model: %s, %d parameters; state ready in %.1f s.',
                 spec.describe(), flops_lib.param_count(trainer.model(state)),
                 time.time() - start)

    vanilla = spec.vanilla_flops(
        data_lib.image_shape(config.dataset, config.image_size))

    writer = MetricWriter(workdir)
    watcher = _PreemptionWatcher()
    total = config.num_train_steps
    pending: list[Metrics] = []
    last_saved = latest
    preempted = False
    timer_step, timer_start = step, None

    def flush() -> None:
      """Fetches pending metrics; stops on non-finite ones; writes summaries."""
      nonlocal timer_step, timer_start
      if not pending:
        return
      fetched = jax.tree.map(parallel.fetch, pending)
      first_step = step - len(pending) + 1
      for i, m in enumerate(fetched):
        if not m['finite']:
          kept = (f'The last good checkpoint (step {last_saved}) in '
                  f'{os.path.join(workdir, CHECKPOINT_DIR)} is kept'
                  if last_saved is not None else 'No checkpoint was written')
          raise NonFiniteLossError(
              f'Non-finite loss or parameters at step {first_step + i} (loss '
              f'{float(m["loss"])}); training stopped. {kept}; try a lower '
              'learning rate.')
      pending.clear()
      scalars = {k: float(np.mean([m[k] for m in fetched]))
                 for k in fetched[0] if k != 'finite'}
      scalars['flops_fraction'] = scalars['flops'] / vanilla
      now = time.time()
      if timer_start is None:  # The first step includes compilation.
        rate = None
      else:
        rate = (step - timer_step) / max(now - timer_start, 1e-9)
        scalars['steps_per_sec'] = rate
      timer_step, timer_start = step, now
      writer.write(step, scalars)
      if is_main:
        left = (f'{_format_seconds((total - step) / rate)} left' if rate
                else 'compiled')
        logging.info(
            'step %d/%d | loss %.4f | accuracy %.3f | ponder %.3f | FLOPs '
            '%.1f%% | %s | %s', step, total, scalars['loss'],
            scalars['accuracy'], scalars['ponder_loss'],
            100 * scalars['flops_fraction'],
            f'{rate:.2f} steps/s' if rate else '-', left)

    eval_every = config.get('eval_every_steps') or 0
    eval_metrics = None

    def evaluate_now() -> dict[str, Any]:
      model = trainer.eval_model(state)
      metrics = evaluate.evaluate_model(model, config, verbose=False)
      log_evaluation(writer, step, metrics, model, config)
      return metrics

    first = True
    while step < total:
      if watcher.should_stop(step):
        preempted = True
        break
      batch = next(iterator)
      if first:
        check_batch(batch, config)
      state, metrics = trainer.train_step(state,
                                          parallel.shard_batch(batch, mesh))
      step += 1
      pending.append(metrics)
      save_now = step % config.checkpoint_every_steps == 0 or step == total
      if first or step % config.log_every_steps == 0 or save_now:
        flush()
      first = False
      if save_now:
        _save(manager, state, iterator, spec, config)
        last_saved = step
      if eval_every and step % eval_every == 0:
        eval_metrics = evaluate_now()
    if preempted or (last_saved != step and step > 0):
      flush()
      if last_saved != step:
        _save(manager, state, iterator, spec, config)
        last_saved = step
    if preempted:
      logging.warning('Preempted (SIGTERM) at step %d: checkpoint saved in %s;'
                      ' run the same command again to resume.', step,
                      os.path.join(workdir, CHECKPOINT_DIR))
  finally:
    if watcher is not None:
      watcher.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()

  model = trainer.eval_model(state)
  final = eval_every and step == total and total % eval_every == 0
  return TrainResult(model=model, state=state, preempted=preempted,
                     eval_metrics=eval_metrics if final else None)


def log_evaluation(writer: 'MetricWriter', step: int,
                   metrics: dict[str, Any], model: nnx.Module,
                   config: ml_collections.ConfigDict) -> None:
  """Test-split metrics as `eval/...` summaries, a console line, and (SACT)
  a picture of ponder maps in TensorBoard."""
  scalars = {f'eval/{k}': metrics[k] for k in _EVAL_SCALARS
             if metrics.get(k) is not None}
  writer.write(step, scalars)
  num_maps = config.get('num_eval_ponder_maps', 0)
  if config.model_type == 'sact' and num_maps > 0:
    model = parallel.local_copy(model)
    if jax.process_index() == 0:
      figures = visualize.ponder_figures(model, config, num_images=num_maps)
      writer.write_image(step, 'eval/ponder_maps',
                         visualize.figure_array(figures[0]))
  ratio = metrics.get('ponder_inside_outside_ratio')
  flops = metrics.get('flops_percent_of_vanilla')
  logging.info(
      'eval at step %d | test top-1 %.2f%% | FLOPs %s | ponder %.3f | '
      'inside/outside %s', step, 100 * metrics['top1_accuracy'],
      'n/a' if flops is None else f'{flops:.1f}%',
      metrics['ponder_cost_total'],
      'n/a' if ratio is None else f'{ratio:.3f}')
