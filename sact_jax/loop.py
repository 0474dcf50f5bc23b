"""The training loop every task shares: resume, steps, metrics, saves, evals.

Classification (`train.py`) and detection (`detection/train.py`) differ in
their model, loss and evaluation; what a run does around its step is this
module's: restore the latest checkpoint of the workdir (or initialise),
draw batches from the host's shard, run the jitted step, fetch metrics at a
steady cadence (TensorBoard, `metrics.jsonl`, a console line) and stop on a
non-finite one before the next checkpoint, save every
`checkpoint_every_steps`, at the end and on SIGTERM or Ctrl-C (orbax
`CheckpointManager`: train state, every host's data position, model spec),
and evaluate every `eval_every_steps`.
"""

import dataclasses
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
from sact_jax import flops as flops_lib
from sact_jax import metric_writer
from sact_jax import models
from sact_jax import parallel

CHECKPOINT_DIR = checkpoint_lib.RUN_DIR

Batch = dict[str, np.ndarray]
Metrics = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or parameters and stopped."""


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


def sgd_update(tx: optax.GradientTransformation, grads: Any,
               state: TrainState) -> tuple[Any, Any]:
  """The optimizer's new parameters and state from one step's gradients."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def all_finite(loss: jax.Array, params: Any) -> jax.Array:
  """Whether the loss and every parameter are finite (what stops a run)."""
  finite = jnp.isfinite(loss)
  for leaf in jax.tree.leaves(params):
    finite &= jnp.all(jnp.isfinite(leaf))
  return finite


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


def _restore(manager: ocp.CheckpointManager, step: int, trainer: Any,
             iterator: grain.DatasetIterator) -> TrainState:
  restored = checkpoint_lib.restore_run(
      manager, step, state_tree(trainer.abstract_state()), iterator)
  return TrainState(**restored)


class PreemptionWatcher:
  """Says when to save and stop because the process got SIGTERM or Ctrl-C.

  One process: a SIGTERM or SIGINT handler sets a flag (checked between
  steps); a second Ctrl-C interrupts at once (KeyboardInterrupt), without
  saving. Several: jax's preemption service (started by `jax.distributed`,
  which catches SIGTERM itself) picks a step at which every host stops
  together.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._flag = threading.Event()
    self._previous = {}
    self.signal_name = 'SIGTERM'
    self._multihost = jax.process_count() > 1
    if (not self._multihost
        and threading.current_thread() is threading.main_thread()):
      self._previous = {s: signal.signal(s, self._handle)
                        for s in self._SIGNALS}

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:  # The next Ctrl-C is the user's own.
      signal.signal(signum, self._previous[signum])
      logging.warning('Ctrl-C: saving a checkpoint after this step, then '
                      'stopping (Ctrl-C again to stop without saving).')
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # The preemption service is not running.
        return False
    return self._flag.is_set()

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    model: the trained model, eval mode (the moving averages with
      `ema_decay`).
    state: the final train state.
    preempted: training stopped early on SIGTERM or Ctrl-C (after saving).
    eval_metrics: `evaluate.evaluate_model`'s metrics of the final model
      when the loop evaluated at the last step (`eval_every_steps` divides
      `num_train_steps`), else None.
  """
  model: nnx.Module
  state: TrainState
  preempted: bool
  eval_metrics: dict[str, Any] | None = None


def run_loop(config: ml_collections.ConfigDict, workdir: str, trainer: Any,
             dataset: grain.IterDataset, *, batch_keys: tuple[str, ...],
             vanilla_flops: int,
             console_line: Callable[[int, int, dict[str, float], str], None],
             evaluate_now: Callable[
                 [TrainState, metric_writer.MetricWriter, int],
                 dict[str, Any]],
             check_first_batch: Callable[[Batch], None] | None = None
             ) -> TrainResult:
  """The training loop of any task: resume, steps, metrics, saves, evals.

  Args:
    config: the run's config (`num_train_steps`, `log_every_steps`,
      `checkpoint_every_steps`, `keep_checkpoints`, `eval_every_steps`).
    workdir: checkpoints, metrics and TensorBoard go here.
    trainer: has `mesh`, `spec` (saved with checkpoints), `train_step`
      (`(state, batch) -> (state, metrics)`, metrics with `loss`, `flops`
      and `finite`), `init_state()`, `abstract_state()`, `eval_model()`.
    dataset: this host's training data.
    batch_keys: the batch entries the step reads.
    vanilla_flops: denominator of the `flops_fraction` summary.
    console_line: `(step, total, scalars, time_left)` -> logs a line.
    evaluate_now: `(state, writer, step)` -> metrics, every
      `eval_every_steps`; the last one is returned when it was at the end.
    check_first_batch: raises on a first batch the model cannot take.
  """
  mesh, spec = trainer.mesh, trainer.spec
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
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

    writer = metric_writer.MetricWriter(workdir, start_step=step)
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
      scalars['flops_fraction'] = scalars['flops'] / vanilla_flops
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
        console_line(step, total, scalars, left)

    eval_every = config.get('eval_every_steps') or 0
    eval_metrics = None
    first = True
    while step < total:
      if watcher.should_stop(step):
        preempted = True
        break
      batch = next(iterator)
      if first and check_first_batch is not None:
        check_first_batch(batch)
      state, metrics = trainer.train_step(
          state, parallel.shard_batch(batch, mesh, batch_keys))
      step += 1
      pending.append(metrics)
      save_now = step % config.checkpoint_every_steps == 0 or step == total
      if first or step % config.log_every_steps == 0 or save_now:
        flush()
      first = False
      # Evaluate before saving: a process that dies in between resumes
      # from the previous checkpoint and evaluates this step again, not
      # after it (its records of the steps after that checkpoint dropped).
      if eval_every and step % eval_every == 0:
        eval_metrics = evaluate_now(state, writer, step)
      if save_now:
        writer.flush()
        _save(manager, state, iterator, spec, config)
        last_saved = step
    if preempted or (last_saved != step and step > 0):
      flush()
      if last_saved != step:
        writer.flush()
        _save(manager, state, iterator, spec, config)
        last_saved = step
    if preempted:
      logging.warning('Stopped by %s at step %d: checkpoint saved in %s;'
                      ' run the same command again to resume.',
                      watcher.signal_name, step,
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
