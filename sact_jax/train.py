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
* Around the step, `loop.py` (shared with detection training): resume
  from the workdir's orbax checkpoint (train state, every host's data
  position, model spec), save every `checkpoint_every_steps`, at the end
  and on SIGTERM, metrics to TensorBoard, `metrics.jsonl` and the console,
  a stop before the next checkpoint on a non-finite loss; every
  `eval_every_steps`, the test split's metrics and (SACT) a picture of
  ponder maps (`log_evaluation`).
"""

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
from flax import nnx
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sact_jax import checkpoint as checkpoint_lib
from sact_jax import conv
from sact_jax import data as data_lib
from sact_jax import evaluate
from sact_jax import loop
from sact_jax import losses
from sact_jax import metric_writer
from sact_jax import models
from sact_jax import optimizers
from sact_jax import parallel
from sact_jax import visualize
from sact_jax.configs import validation

CHECKPOINT_DIR = loop.CHECKPOINT_DIR
METRICS_FILE = metric_writer.METRICS_FILE
TENSORBOARD_DIR = metric_writer.TENSORBOARD_DIR

# Evaluation metrics written as `eval/<name>` summaries.
_EVAL_SCALARS = ('top1_accuracy', 'flops_percent_of_vanilla',
                 'ponder_cost_total', 'ponder_inside_outside_ratio')

Batch = loop.Batch
Metrics = loop.Metrics
# The loop's types, under the names users of this module know.
NonFiniteLossError = loop.NonFiniteLossError
TrainState = loop.TrainState
TrainResult = loop.TrainResult


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
             mesh: jax.sharding.Mesh,
             compiler_options: dict[str, str] | None = None) -> 'Trainer':
    """Compiles nothing yet; `compiler_options` None: the backend's
    (`conv.compiler_options`), {}: XLA's defaults."""
    parallel.check_platform(mesh)
    if compiler_options is None:
      compiler_options = conv.compiler_options(
          mesh.devices.flat[0].platform)
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
        step_fn,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0, compiler_options=compiler_options or None)
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
      # A vanilla model (or one of single-unit blocks) has no halting heads
      # to keep, and `restore_into` refuses a filter that matches nothing.
      heads = nnx.state(model, checkpoint_lib.HALTING_HEADS)
      exclude = checkpoint_lib.HALTING_HEADS if jax.tree.leaves(heads) else None
      report = checkpoint_lib.restore_into(
          model, self.config.init_from, exclude=exclude)
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
  params, opt_state = loop.sgd_update(tx, grads, state)
  finite = loop.all_finite(loss, params)
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


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains (or resumes) the model of `config`, checkpointing in `workdir`.

  Raises:
    validation.ConfigError: bad config, or `workdir` holds another model.
    data.DatasetNotFoundError: the dataset is not prepared.
    NonFiniteLossError: the loss or parameters became non-finite; the last
      good checkpoint is kept.
  """
  validation.validate_config(config, workdir)
  trainer = Trainer.create(config, parallel.make_mesh())

  def console_line(step, total, scalars, left):
    logging.info(
        'step %d/%d | loss %.4f | accuracy %.3f | ponder %.3f | FLOPs '
        '%.1f%% | %s | %s', step, total, scalars['loss'],
        scalars['accuracy'], scalars['ponder_loss'],
        100 * scalars['flops_fraction'],
        f'{scalars["steps_per_sec"]:.2f} steps/s'
        if 'steps_per_sec' in scalars else '-', left)

  def evaluate_now(state, writer, step):
    model = trainer.eval_model(state)
    metrics = evaluate.evaluate_model(model, config, verbose=False)
    log_evaluation(writer, step, metrics, model, config)
    return metrics

  return loop.run_loop(
      config, workdir, trainer, make_train_dataset(config),
      batch_keys=('image', 'label'),
      vanilla_flops=trainer.spec.vanilla_flops(
          data_lib.image_shape(config.dataset, config.image_size)),
      console_line=console_line, evaluate_now=evaluate_now,
      check_first_batch=lambda batch: check_batch(batch, config))


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
