"""Training loop: data-parallel SGD on one mesh, orbax checkpoints, metrics.

* One mesh with a single 'data' axis over every device of every host. Each
  host reads its own shard of the data; its batch rows become its devices'
  rows of a global batch (`jax.make_array_from_process_local_data`). The
  train state is replicated; `jax.jit` with donation runs the step, and XLA
  inserts the all-reduces (gradients and BatchNorm statistics are over the
  global batch, so 1 and N devices compute the same step). No pmap.
* Loss: cross-entropy (+ label smoothing) + tau * ponder loss + the
  reference's L2 weight decay on conv/dense kernels (`losses.py`); SGD with
  momentum, a piecewise constant or warm-up + cosine learning rate, and an
  optional moving average of the weights (`optimizers.py`).
* orbax `CheckpointManager` in `workdir/checkpoints`: train state (params,
  BatchNorm statistics, optimizer state, step) as plain nested dicts, the
  position of every host's data iterator, and the model spec. Saved every
  `checkpoint_every_steps`, at the end, and on SIGTERM (preemption); a
  workdir with a checkpoint resumes from it.
* Metrics at a steady cadence (`metric_writer.py`): TensorBoard,
  `workdir/metrics.jsonl` and a console line; every `eval_every_steps`, the
  test split's metrics and (SACT) a picture of ponder maps.
* A non-finite loss (or parameters) stops training before the next
  checkpoint, so the last good checkpoint is never overwritten.
"""

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

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
from sact_jax import losses
from sact_jax import metric_writer
from sact_jax import models
from sact_jax import optimizers
from sact_jax import parallel
from sact_jax import visualize
from sact_jax.configs import validation

CHECKPOINT_DIR = checkpoint_lib.RUN_DIR
METRICS_FILE = metric_writer.METRICS_FILE
TENSORBOARD_DIR = metric_writer.TENSORBOARD_DIR

# Evaluation metrics written as `eval/<name>` summaries.
_EVAL_SCALARS = ('top1_accuracy', 'flops_percent_of_vanilla',
                 'ponder_cost_total', 'ponder_inside_outside_ratio')

Batch = dict[str, np.ndarray]
Metrics = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or parameters and stopped."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


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
    spec = validation.model_spec(config)
    abstract = spec.abstract_model(**validation.model_options(config))
    abstract.train()
    graphdef = nnx.graphdef(abstract)
    tx = optimizers.make_optimizer(config)
    step_fn = functools.partial(
        _train_step, graphdef=graphdef, tx=tx,
        schedule=optimizers.learning_rate_schedule(config), tau=config.tau,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        label_offset=validation.label_offset(config),
        ema_decay=config.get('ema_decay'))
    train_step = jax.jit(
        step_fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0)
    return cls(config, mesh, spec, graphdef, tx, train_step)

  def _init(self) -> TrainState:
    model = self.spec.create(nnx.Rngs(self.config.seed),
                             **validation.model_options(self.config))
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
    ce = losses.cross_entropy(logits, labels, label_smoothing)
    decay = losses.weight_decay_penalty(params, weight_decay)
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
    ema = optimizers.ema_update(
        ema, {'params': params, 'model_state': model_state}, ema_decay,
        state.step + 1)
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


def state_tree(state: TrainState) -> dict[str, Any]:
  tree = {'step': state.step, 'params': state.params,
          'model_state': state.model_state, 'opt_state': state.opt_state}
  if state.ema is not None:
    tree['ema'] = state.ema
  return tree


def _save(manager: ocp.CheckpointManager, state: TrainState,
          iterator: grain.DatasetIterator, spec: models.ModelSpec,
          config: ml_collections.ConfigDict) -> None:
  checkpoint_lib.save_run(
      manager, int(parallel.fetch(state.step)), state_tree(state),
      data_lib.get_iterator_state(iterator), spec,
      json.loads(config.to_json_best_effort()))


def _restore(manager: ocp.CheckpointManager, step: int, trainer: Trainer,
             iterator: grain.DatasetIterator) -> TrainState:
  restored = checkpoint_lib.restore_run(
      manager, step, state_tree(trainer.abstract_state()), iterator)
  return TrainState(**restored)


# ---------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------


class PreemptionWatcher:
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
    validation.ConfigError: bad config, or `workdir` holds another model.
    data.DatasetNotFoundError: the dataset is not prepared.
    NonFiniteLossError: the loss or parameters became non-finite; the last
      good checkpoint is kept.
  """
  validation.validate_config(config, workdir)
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

    writer = metric_writer.MetricWriter(workdir)
    watcher = PreemptionWatcher()
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
        left = (f'{metric_writer.format_seconds((total - step) / rate)} left'
                if rate else 'compiled')
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


def log_evaluation(writer: metric_writer.MetricWriter, step: int,
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
