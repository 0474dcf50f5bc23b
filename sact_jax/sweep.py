"""FLOPs-accuracy sweeps: one training run per tau and per vanilla depth.

The paper's trade-off plots train one network at several ponder-cost
weights tau (ACT and SACT curves) next to plain ResNets of several depths
(the baseline curve). `plan` turns a base config into those runs, each
named for what it varies; `run_sweep` trains them one after another, each
in its own workdir under a root, and can be started again at any time:

* a finished run is skipped (`main_job.is_finished`: its workdir has
  `eval.json`, which `main_job.train_and_evaluate` writes last); one whose
  `num_train_steps` was raised since trains on from its last checkpoint;
* an interrupted run resumes from its latest checkpoint (what training does
  with any workdir that has one);
* every run's config is validated before the first one starts, so a bad
  value stops the sweep before any work, not hours into it; so is a config
  that differs from an existing run's in more than
  `main_job.RESUMABLE_FIELDS` (finished runs included: the sweep's table
  would mix runs of other settings under one label).

`sact_jax.tradeoff` reads the results (of this sweep or of workdirs trained
one per job elsewhere) into a table and a figure.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import ml_collections

from sact_jax import checkpoint
from sact_jax import main_job
from sact_jax import models
from sact_jax.configs import validation

ADAPTIVE_TYPES = ('act', 'sact')


class SweepError(ValueError):
  """A sweep that cannot be planned as asked; one line."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: its workdir's name and its config."""
  name: str
  config: ml_collections.ConfigDict


def run_name(model_type: str, *, tau: float | None = None,
             units: Sequence[int] = ()) -> str:
  """`sact_tau0.02` for adaptive runs, `vanilla_units2-2-2` for vanilla."""
  if model_type in ADAPTIVE_TYPES:
    return f'{model_type}_tau{tau:g}'
  return f'{model_type}_units{"-".join(str(u) for u in units)}'


def parse_units(text: str | Sequence[int], num_blocks: int
                ) -> tuple[int, ...]:
  """Units per block from a flag value, `3` (every block) or `1-2-3`.

  Args:
    text: one value of `--vanilla_units`, or units per block as a sequence.
    num_blocks: the number of blocks of the base config's model.

  Raises:
    SweepError: not positive integers, or a per-block list of another
      length than the model has blocks.
  """
  parts = (str(text).split('-') if isinstance(text, str)
           else [str(n) for n in text])
  try:
    units = tuple(int(part) for part in parts)
  except ValueError:
    raise SweepError(
        f'Bad vanilla units {text!r}: give units per block as N (every '
        "block) or N-N-N, e.g. '2' or '1-2-3'.") from None
  if len(units) == 1:
    units *= num_blocks
  if len(units) != num_blocks or min(units) < 1:
    raise SweepError(
        f'Bad vanilla units {text!r}: the model has {num_blocks} blocks, '
        'each needs at least one unit.')
  return units


def plan(base_config: ml_collections.ConfigDict, *, taus: Sequence[float],
         vanilla_units: Sequence[str | Sequence[int]],
         model_types: Sequence[str] = ('sact',)) -> list[Run]:
  """The runs of a sweep: each adaptive type at each tau, then vanilla.

  Args:
    base_config: the config every run starts from (dataset, steps, widths,
      the adaptive runs' units); runs differ in `model_type`, `tau` and,
      for vanilla, `units`.
    taus: ponder-cost weights of the adaptive runs.
    vanilla_units: units per block of each vanilla run (`parse_units`:
      tuples, or strings such as '2' (every block) and '1-2-3').
    model_types: which adaptive types to sweep over `taus` ('act', 'sact').

  Returns:
    The runs, adaptive ones first (in order of type, then tau).

  Raises:
    SweepError: an unknown model type, a negative tau, bad vanilla units,
      or the same run asked for twice.
  """
  try:
    num_blocks = len(models.resolve_units(
        base_config.family, models.depth_or_units(base_config.units)))
  except ValueError as e:
    raise SweepError(f'Bad base config: {e}') from None
  vanilla_units = [parse_units(u, num_blocks) for u in vanilla_units]
  unknown = [t for t in model_types if t not in ADAPTIVE_TYPES]
  if unknown:
    raise SweepError(f'Unknown model types {unknown}: the sweep varies tau '
                     f'of {", ".join(ADAPTIVE_TYPES)}; vanilla depths come '
                     'from the vanilla units.')
  if any(tau < 0 for tau in taus):
    raise SweepError(f'taus must be >= 0, got {list(taus)}.')
  if model_types and not taus:
    raise SweepError(f'No taus for the model types {list(model_types)}.')
  runs = []
  for model_type in model_types:
    for tau in taus:
      config = base_config.copy_and_resolve_references()
      config.model_type = model_type
      config.tau = float(tau)
      runs.append(Run(run_name(model_type, tau=tau), config))
  for units in vanilla_units:
    config = base_config.copy_and_resolve_references()
    config.model_type = 'vanilla'
    config.units = tuple(units)
    runs.append(Run(run_name('vanilla', units=units), config))
  names = [r.name for r in runs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise SweepError(f'Runs asked for twice: {", ".join(repeated)}.')
  if not runs:
    raise SweepError('Nothing to run: give taus and/or vanilla units.')
  return runs


def validate(runs: Sequence[Run], root: str) -> None:
  """Checks every run's config (and existing workdir) before any work.

  Raises:
    validation.ConfigError: naming the run whose config is bad, e.g. a
      workdir that holds a checkpoint of another model, or of the same
      model trained under other settings (`main_job.check_resumable`).
  """
  for r in runs:
    workdir = os.path.join(root, r.name)
    try:
      validation.validate_config(r.config, workdir)
      main_job.check_resumable(r.config, workdir)
    except validation.ConfigError as e:
      raise validation.ConfigError(f'Run {r.name}: {e}') from None


TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any] | None]


def run_sweep(runs: Sequence[Run], root: str, *,
              train_fn: TrainFn = main_job.train_and_evaluate
              ) -> list[dict[str, Any]]:
  """Trains the runs that are not finished, one after another.

  Args:
    runs: from `plan`; validate them first (`validate`).
    root: the sweep's directory; run `r` uses `root/r.name`.
    train_fn: trains and evaluates one config into one workdir, returning
      the metrics, or None when preempted (the default is the main job's).

  Returns:
    One record per run: `name`, `workdir`, `status` ('skipped' (finished
    before), 'done' or 'preempted'; runs after a preempted one are not
    started and not listed) and `seconds`.
  """
  records = []
  for index, r in enumerate(runs):
    workdir = os.path.join(root, r.name)
    prefix = f'run {index + 1}/{len(runs)} {r.name}'
    if main_job.is_finished(r.config, workdir):
      logging.info('%s: finished before, skipped', prefix)
      records.append(dict(name=r.name, workdir=workdir, status='skipped',
                          seconds=0.0))
      continue
    resuming = os.path.isdir(os.path.join(workdir, checkpoint.RUN_DIR))
    logging.info('%s: %s in %s', prefix,
                 'resuming' if resuming else 'training', workdir)
    start = time.time()
    metrics = train_fn(r.config, workdir)
    seconds = time.time() - start
    status = 'preempted' if metrics is None else 'done'
    records.append(dict(name=r.name, workdir=workdir, status=status,
                        seconds=seconds))
    if metrics is None:
      logging.warning('%s: preempted after %.0f s; run the sweep again to '
                      'resume', prefix, seconds)
      break
    logging.info('%s: done in %.0f s, test top-1 %.2f%%, %.3g FLOPs per '
                 'image', prefix, seconds, 100 * metrics['top1_accuracy'],
                 metrics['flops_mean'])
  return records
