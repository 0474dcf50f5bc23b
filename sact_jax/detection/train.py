"""Detection training: the shared loop (`loop.py`), the Faster R-CNN loss.

Everything but the model, the loss and the evaluation is classification
training's: one 'data' mesh, a replicated `TrainState` updated by one
jitted, donating step, and `loop.run_loop` around it (resume, checkpoints
with the data position, SIGTERM, metrics, a stop on a non-finite loss,
evaluations during training: COCO metrics here).
The loss is `faster_rcnn.loss_and_metrics` (both stages, tau times the
ponder cost) plus the reference's L2 weight decay.
"""

import functools
import os
from typing import Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sact_jax import checkpoint as checkpoint_lib
from sact_jax import conv
from sact_jax import loop
from sact_jax import losses
from sact_jax import models
from sact_jax import optimizers
from sact_jax import parallel
from sact_jax.configs import validation
from sact_jax.data import detection as detection_data
from sact_jax.detection import evaluate as evaluate_lib
from sact_jax.detection import faster_rcnn

TrainState = loop.TrainState
# Ground truth and images: what a training step reads of a batch.
BATCH_KEYS = ('image', 'boxes', 'labels', 'crowd')
# Evaluation metrics written as `eval/<name>` summaries.
_EVAL_SCALARS = ('mAP', 'mAP@0.5', 'extractor_flops_percent', 'ponder_cost')


def detector_config(config: ml_collections.ConfigDict
                    ) -> faster_rcnn.DetectorConfig:
  """The detector of `config`; ConfigError (one line) if invalid."""
  try:
    return faster_rcnn.DetectorConfig.from_config(config)
  except (ValueError, TypeError, KeyError) as e:
    raise validation.ConfigError(f'Invalid detector in config: {e}') from None


def validate_config(config: ml_collections.ConfigDict,
                    workdir: str | None = None, *,
                    init_from: bool = True) -> None:
  """Everything that can be checked before any work starts (one line).

  Args:
    config: a detection training config (`configs/detection.py`).
    workdir: if given and it holds a checkpoint, the checkpoint's backbone
      must be the config's.
    init_from: whether `init_from` must name a classifier; evaluation does
      not read it (it may be gone since training).

  Raises:
    validation.ConfigError: one line naming the problem.
  """
  try:
    _validate(config, workdir, init_from)
  except (AttributeError, KeyError) as e:
    # ConfigDict's missing field (its AttributeError wraps the KeyError),
    # e.g. in the config.json of a classification run.
    cause = e.args[0] if isinstance(e, AttributeError) and e.args else e
    if not isinstance(cause, KeyError):
      raise
    name = cause.args[0] if cause.args else '?'
    raise validation.ConfigError(
        f'The config has no field {name}: is it a detection config?'
    ) from None


def _validate(config: ml_collections.ConfigDict, workdir: str | None,
              init_from: bool) -> None:
  """The checks of `validate_config`, which reports a missing field."""
  def check(condition, message):
    if not condition:
      raise validation.ConfigError(message)

  try:
    info = detection_data.detection_info(config.dataset)
  except (ValueError, KeyError) as e:
    raise validation.ConfigError(str(e)) from None
  detector = detector_config(config)
  check(config.num_detection_classes == info.num_classes,
        f'num_detection_classes={config.num_detection_classes} does not fit '
        f'{config.dataset}, which has {info.num_classes} classes.')
  # None (not 0) stands for the dataset's own size and boxes.
  size = config.get('image_size')
  check(size is None or (models.is_integer(size) and size >= 1),
        "image_size must be None (the dataset's) or an integer >= 1, got "
        f'{size!r}.')
  try:
    size = detection_data.check_image_size(config.dataset, size)
  except ValueError as e:
    raise validation.ConfigError(str(e)) from None
  check(size >= detector.stride,
        f'image_size={size} is smaller than the feature stride '
        f'{detector.stride}.')
  max_boxes = config.get('max_boxes')
  check(max_boxes is None
        or (models.is_integer(max_boxes) and max_boxes >= 1),
        "max_boxes must be None (the dataset's) or an integer >= 1, got "
        f'{max_boxes!r}.')
  validation.validate_optimization(config)
  # tfds refuses a slice beyond the split, but only once evaluation starts.
  num_eval = config.get('num_eval_examples')
  check(num_eval is None or num_eval <= info.num_eval_examples,
        f'num_eval_examples={num_eval} is more than the '
        f'{info.num_eval_examples} images of the {info.eval_split} split of '
        f'{config.dataset}.')
  pictures = config.get('num_detection_pictures', 0)
  check(models.is_integer(pictures) and pictures >= 0,
        f'num_detection_pictures must be an integer >= 0, got {pictures!r}.')
  try:
    evaluate_lib.check_num_images(config, pictures)
  except ValueError as e:
    raise validation.ConfigError(f'num_detection_pictures: {e}') from None
  path = config.get('init_from')
  # A resumed run reads its own checkpoint, never init_from.
  if init_from and path and not (
      workdir and checkpoint_lib.latest_run_step(workdir) is not None):
    found = os.path.isdir(path) and (
        checkpoint_lib.is_model_checkpoint(path)
        or checkpoint_lib.saved_run_spec(path) is not None)
    check(found, f'init_from={path!r} is neither a sact_jax model checkpoint '
          'nor a training workdir with a checkpoint.')
  if workdir is not None:
    check(workdir, 'workdir is an empty path.')
    validation.check_workdir(workdir, detector.backbone)


def check_data(config: ml_collections.ConfigDict, *,
               train: bool = True) -> None:
  """Opens the dataset's splits (generating `sact_detection` if needed).

  For launchers, before they write anything: a dataset that is not
  prepared or a `data_dir` that cannot be used would otherwise only fail
  once the run starts (a traceback, for the latter).

  Args:
    config: a valid detection config (`validate_config`).
    train: whether the training split is needed too, not only eval's.

  Raises:
    data.DatasetNotFoundError: the dataset is not prepared (COCO).
    validation.ConfigError: `data_dir` cannot be read or written.
  """
  info = detection_data.detection_info(config.dataset)
  data_dir = config.get('data_dir')
  splits = (info.train_split, info.eval_split) if train else (
      info.eval_split,)
  for split in dict.fromkeys(splits):
    try:
      detection_data.make_detection_dataset(
          config.dataset, split, batch_size=1, train=False,
          data_dir=data_dir, image_size=config.get('image_size'),
          max_boxes=config.get('max_boxes'))
    except OSError as e:
      where = f' ({e.filename})' if e.filename else ''
      raise validation.ConfigError(
          f'data_dir={data_dir!r} cannot be used for {config.dataset}: '
          f'{e.strerror or e}{where}.') from None
    except ValueError as e:
      raise validation.ConfigError(str(e)) from None


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """Reads `init_from` into a detector's backbone (an abstract one).

  For launchers, before they write anything: a classifier of another
  architecture or a damaged checkpoint would otherwise only fail once
  training starts. Reads the whole classifier.

  Raises:
    checkpoint.CheckpointError: `init_from` cannot be read, or its weights
      do not fit the detector's backbone.
  """
  path = config.get('init_from')
  if not path:
    return
  detector = detector_config(config)
  try:
    init_backbone(nnx.eval_shape(lambda: faster_rcnn.create(detector)), path)
  except checkpoint_lib.CheckpointError as e:
    raise checkpoint_lib.CheckpointError(f'init_from={path!r}: {e}') from None


def load_classifier(path: str) -> nnx.Module:
  """The classifier of a model checkpoint or of a training workdir."""
  if checkpoint_lib.is_model_checkpoint(path):
    return checkpoint_lib.restore_model(path)[0]
  spec = checkpoint_lib.saved_run_spec(path)
  if spec is None:
    raise checkpoint_lib.CheckpointError(
        f'{path} holds neither a model checkpoint nor a training run.')
  return checkpoint_lib.restore_latest_model(path, spec)


def init_backbone(model: faster_rcnn.FasterRCNN, path: str
                  ) -> checkpoint_lib.RestoreReport:
  """Restores the backbone from a classifier (not its logits).

  Halting heads come along when the classifier has them (a SACT detector
  from a SACT classifier, as the paper's); from a vanilla classifier an
  ACT/SACT detector keeps its freshly initialised heads.
  """
  source = load_classifier(path)
  exclude = nnx.PathContains('logits')
  if source.model_type == 'vanilla' and model.backbone.model_type != (
      'vanilla'):
    exclude = nnx.Any(exclude, checkpoint_lib.HALTING_HEADS)
  return checkpoint_lib.restore_into(model.backbone, source, exclude=exclude)


def _train_step(state: TrainState, batch: dict[str, jax.Array], *,
                graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                schedule: Callable[[jax.Array], jax.Array],
                detector: faster_rcnn.DetectorConfig, weight_decay: float,
                seed: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD update of the detector on a global batch."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    model_state = jax.tree.map(lambda x: x, state.model_state)
    model = nnx.merge(graphdef, params, model_state)
    loss, metrics = faster_rcnn.loss_and_metrics(model, batch, key, detector,
                                                 state.step)
    decay = losses.weight_decay_penalty(params, weight_decay)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    return loss + decay, (model_state, metrics, decay)

  (loss, (model_state, metrics, decay)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  params, opt_state = loop.sgd_update(tx, grads, state)
  finite = loop.all_finite(loss, params)
  metrics = {**metrics, 'loss': loss, 'weight_decay_loss': decay,
             'flops': jnp.mean(metrics['flops']),
             'learning_rate': schedule(state.step), 'finite': finite}
  return TrainState(step=state.step + 1, params=params,
                    model_state=model_state, opt_state=opt_state), metrics


class Trainer:
  """The compiled pieces of a detection run (as `train.Trainer`'s)."""

  def __init__(self, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh):
    parallel.check_platform(mesh)
    self.config, self.mesh = config, mesh
    self.detector = detector_config(config)
    # Saved with checkpoints: a workdir holds one backbone's detectors.
    self.spec = self.detector.backbone
    abstract = nnx.eval_shape(lambda: faster_rcnn.create(self.detector))
    abstract.train()
    self.graphdef = nnx.graphdef(abstract)
    self.tx = optimizers.make_optimizer(config)
    step_fn = functools.partial(
        _train_step, graphdef=self.graphdef, tx=self.tx,
        schedule=optimizers.learning_rate_schedule(config),
        detector=self.detector, weight_decay=config.weight_decay,
        seed=config.seed)
    self.train_step = jax.jit(
        step_fn, in_shardings=(parallel.replicated(mesh),
                               parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=conv.compiler_options(
            mesh.devices.flat[0].platform))

  def _init(self) -> TrainState:
    model = faster_rcnn.create(self.detector, seed=self.config.seed)
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state,
                      opt_state=self.tx.init(params))

  def init_state(self) -> TrainState:
    """A fresh state, the backbone from `init_from` if set; replicated."""
    state = jax.jit(self._init,
                    out_shardings=parallel.replicated(self.mesh))()
    if self.config.get('init_from'):
      model = self.model(state)
      report = init_backbone(model, self.config.init_from)
      logging.info('Backbone initialised from %s: %s.',
                   self.config.init_from, report.summary())
      _, params, model_state = nnx.split(model, nnx.Param, ...)
      state = jax.device_put(
          state.replace(params=params, model_state=model_state),
          parallel.replicated(self.mesh))
    return state

  def abstract_state(self) -> TrainState:
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(self._init))

  def model(self, state: TrainState) -> faster_rcnn.FasterRCNN:
    return nnx.merge(self.graphdef, state.params, state.model_state)

  def eval_model(self, state: TrainState) -> faster_rcnn.FasterRCNN:
    model = self.model(state)
    model.eval()
    return model


def make_train_dataset(config: ml_collections.ConfigDict):
  """This host's shard of the training data."""
  info = detection_data.detection_info(config.dataset)
  return detection_data.make_detection_dataset(
      config.dataset, info.train_split,
      batch_size=config.batch_size // jax.process_count(), train=True,
      seed=config.seed, data_dir=config.get('data_dir'),
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      image_size=config.get('image_size'),
      max_boxes=config.get('max_boxes'),
      worker_count=config.get('data_workers', 0))


def train(config: ml_collections.ConfigDict,
          workdir: str) -> loop.TrainResult:
  """Trains (or resumes) the detector of `config` in `workdir`.

  Raises:
    validation.ConfigError: bad config, or `workdir` holds another model.
    data.DatasetNotFoundError: the dataset is not prepared.
    loop.NonFiniteLossError: the loss became non-finite; the last good
      checkpoint is kept.
  """
  validate_config(config, workdir)
  trainer = Trainer(config, parallel.make_mesh())
  size = detection_data.check_image_size(config.dataset,
                                        config.get('image_size'))

  def console_line(step, total, scalars, left):
    logging.info(
        'step %d/%d | loss %.4f | rpn %.3f + %.3f | box %.3f + %.3f | '
        'ponder %.3f | extractor FLOPs %.1f%% | %s', step, total,
        scalars['loss'], scalars['rpn_objectness'],
        scalars['rpn_localization'], scalars['box_classification'],
        scalars['box_localization'], scalars['ponder_loss'],
        100 * scalars['flops_fraction'], left)

  def evaluate_now(state, writer, step):
    metrics = evaluate_lib.evaluate_detector(trainer.eval_model(state),
                                             config, verbose=False)
    # TensorBoard tag names cannot hold '@'.
    writer.write(step, {f'eval/{k.replace("@", "_")}': metrics[k]
                        for k in _EVAL_SCALARS if metrics.get(k) is not None})
    logging.info('eval at step %d | %s', step,
                 evaluate_lib.summary_line(metrics))
    return metrics

  return loop.run_loop(
      config, workdir, trainer, make_train_dataset(config),
      batch_keys=BATCH_KEYS,
      vanilla_flops=faster_rcnn.vanilla_extractor_flops(trainer.detector,
                                                        size),
      console_line=console_line, evaluate_now=evaluate_now)


def restore_detector(config: ml_collections.ConfigDict, workdir: str
                     ) -> faster_rcnn.FasterRCNN:
  """The detector of the latest checkpoint of a training run, eval mode.

  Raises:
    validation.ConfigError: bad config, or `workdir` holds another model.
    checkpoint.CheckpointError: `workdir` holds no checkpoint.
  """
  validate_config(config, workdir, init_from=False)
  detector = detector_config(config)
  abstract = nnx.eval_shape(lambda: faster_rcnn.create(detector))
  return checkpoint_lib.restore_latest_variables(workdir, abstract,
                                                 detector.backbone)
