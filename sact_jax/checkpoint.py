"""Checkpoints: model-only, training runs, fine-tuning restores.

A model checkpoint is a directory holding everything needed to rebuild a
model, and nothing about training:

  <directory>/model_spec.json   architecture (`ModelSpec`) + free metadata
  <directory>/state/            orbax checkpoint of `nnx.state(model)` as a
                                plain nested dict (params and BN statistics)

The state is stored as a pure dict (no NNX `Variable` wrappers) so the files
do not depend on how a Flax version serialises variables.

A training run keeps an orbax `CheckpointManager` in `<workdir>/checkpoints`:
per step, the train state (params, BatchNorm statistics, optimizer state,
step) as plain nested dicts, the position of every host's data iterator, and
the model spec with the run's config (`save_run`, `restore_run`,
`restore_latest_model`).

The architecture is a `models.ModelSpec`; the reference's TF checkpoints are
read and converted by `tf_checkpoint.py`.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Mapping, Sequence

from absl import logging
from flax import nnx
import grain
import jax
import orbax.checkpoint as ocp

from sact_jax import models
from sact_jax import parallel

# The architecture stored with every checkpoint (it used to be defined here).
ModelSpec = models.ModelSpec

SPEC_FILE = 'model_spec.json'
# Subdirectory of a training workdir with the run's CheckpointManager.
RUN_DIR = 'checkpoints'
STATE_DIR = 'state'
_FORMAT = 'sact_jax.model_checkpoint'
_FORMAT_VERSION = 1

# Fine-tuning filter: the halting heads live in `blocks/<i>/steps/head`. An
# exact path component, so the CIFAR `head_bn` (trunk) is not caught.
HALTING_HEADS = nnx.PathContains('head')


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed, or does not fit the model."""


def _step_name(manager: ocp.CheckpointManager, step: int) -> str:
  return f'the step-{step} checkpoint in {manager.directory}'


@contextlib.contextmanager
def reading(what: str):
  """One CheckpointError for a checkpoint (`what`) that cannot be read.

  orbax, TensorStore and TF report a damaged or incomplete checkpoint (a
  file deleted or truncated, a manifest overwritten, an item missing) in
  many ways, some of them pages long; a caller gets what was read and the
  error's first line, cut to a readable length.
  """
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(first) > 200:
      first = first[:200] + '...'
    raise CheckpointError(
        f'Cannot read {what}, damaged or incomplete? '
        f'({type(e).__name__}: {first})') from e


# ---------------------------------------------------------------------------
# Paths and shapes
# ---------------------------------------------------------------------------


def path_str(path: Sequence[Any]) -> str:
  """'blocks/1/steps/head/local_conv/kernel' for an NNX state path."""
  return '/'.join(str(p) for p in path)


def _key_path_str(key_path: Sequence[Any]) -> str:
  """`path_str` of a jax tree key path (dict keys, sequence indices)."""
  return path_str([getattr(k, 'key', getattr(k, 'idx', k)) for k in key_path])


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Path string -> shape, for a nested dict of arrays or array metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_key_path_str(path): tuple(leaf.shape) for path, leaf in flat}


def _describe_mismatch(expected: Mapping[str, tuple[int, ...]],
                       found: Mapping[str, tuple[int, ...]], *,
                       found_in: str = 'checkpoint',
                       expected_by: str = 'model') -> str | None:
  """One line naming missing, unexpected and mis-shaped variables."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  shapes = sorted(k for k in set(expected) & set(found)
                  if expected[k] != found[k])
  parts = []
  if missing:
    parts.append(f'{len(missing)} variable(s) missing from the {found_in} '
                 f'(e.g. {missing[:3]})')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected variable(s) in the '
                 f'{found_in} (e.g. {unexpected[:3]})')
  if shapes:
    examples = ', '.join(
        f'{k}: {found_in} {found[k]} vs {expected_by} {expected[k]}'
        for k in shapes[:3])
    parts.append(f'{len(shapes)} shape mismatch(es) ({examples})')
  return '; '.join(parts) if parts else None


# ---------------------------------------------------------------------------
# Save / restore
# ---------------------------------------------------------------------------


def _custom_classes(model: nnx.Module) -> list[str]:
  """The model's module classes from outside sact_jax and flax.

  A model built with `head_cls=`/`unit_cls=` (or a subclass) holds the same
  variables as the reference one: only the classes tell them apart.
  """
  names = {f'{type(m).__module__}.{type(m).__qualname__}'
           for _, m in nnx.iter_modules(model)}
  return sorted(n for n in names
                if not n.startswith(('sact_jax.', 'flax.')))


def _read_spec_file(directory: pathlib.Path
                    ) -> tuple[ModelSpec, dict, list[str]]:
  spec_path = directory / SPEC_FILE
  if not spec_path.is_file():
    raise CheckpointError(
        f'{directory} is not a sact_jax model checkpoint (no {SPEC_FILE}).')
  try:
    content = json.loads(spec_path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'Cannot read {spec_path}: {e}') from None
  if not isinstance(content, dict) or content.get('format') != _FORMAT:
    raise CheckpointError(
        f'{spec_path} is not a sact_jax model spec (format is not '
        f'{_FORMAT!r}).')
  if content.get('version') != _FORMAT_VERSION:
    raise CheckpointError(
        f'{spec_path} has format version {content.get("version")}; this '
        f'sact_jax reads version {_FORMAT_VERSION}.')
  try:
    spec = ModelSpec.from_dict(content['spec'])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'Invalid model spec in {spec_path}: {e}') from None
  return (spec, content.get('metadata', {}),
          list(content.get('custom_classes', [])))


def is_model_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a sact_jax model checkpoint (spec readable)."""
  try:
    _read_spec_file(pathlib.Path(directory))
  except CheckpointError:
    return False
  return True


def _read_checkpoint(directory: pathlib.Path
                     ) -> tuple[ModelSpec, dict, list[str]]:
  """`_read_spec_file` of a directory the caller named as a checkpoint.

  Raises:
    FileNotFoundError: there is no such directory.
    CheckpointError: as `_read_spec_file`; a training workdir is named as
      such (its model: `restore_latest_model`).
  """
  if not directory.is_dir():
    raise FileNotFoundError(f'No model checkpoint at {directory}: no such '
                            'directory.')
  if (directory / RUN_DIR).is_dir() and not (directory / SPEC_FILE).exists():
    raise CheckpointError(
        f'{directory} is a training workdir, not a model checkpoint: '
        'restore its latest checkpoint with restore_latest_model (the '
        'launchers: --workdir).')
  return _read_spec_file(directory)


def read_spec(directory: str | os.PathLike) -> ModelSpec:
  """The architecture of a model checkpoint, without loading any weights."""
  return _read_checkpoint(pathlib.Path(directory))[0]


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The free-form metadata stored with `save_model(..., metadata=)`."""
  return _read_checkpoint(pathlib.Path(directory))[1]


def _check_model_matches_spec(model: nnx.Module, spec: ModelSpec):
  """Refuses to write a checkpoint that `restore_model` could not read."""
  # Attributes the shapes do not show (e.g. act vs sact with one unit).
  found = {'model_type': getattr(model, 'model_type', spec.model_type),
           'units': tuple(getattr(model, 'units', spec.units)),
           'eps': {b.eps for b in getattr(model, 'blocks', ())} or {spec.eps}}
  wanted = {'model_type': spec.model_type, 'units': spec.units,
            'eps': {spec.eps}}
  for key in found:
    if found[key] != wanted[key]:
      raise CheckpointError(f'The model has {key} {found[key]} but the spec '
                            f'says {wanted[key]}.')
  expected = _flat_shapes(nnx.to_pure_dict(nnx.state(spec.abstract_model())))
  found = _flat_shapes(nnx.to_pure_dict(nnx.state(model)))
  problem = _describe_mismatch(expected, found, found_in='model',
                               expected_by='spec')
  if problem:
    raise CheckpointError(f'The model does not match the spec {spec}: '
                          f'{problem}.')


def save_model(directory: str | os.PathLike, model: nnx.Module,
               spec: ModelSpec, *, overwrite: bool = False,
               metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes a model checkpoint (all of `nnx.state(model)` plus the spec).

  Everything is written into a temporary directory next to `directory` and
  renamed into place at the end, so a failed save leaves nothing behind.
  Single-process only (multi-host training saves through the trainer's
  CheckpointManager).

  Args:
    directory: where the checkpoint goes.
    model: the model; its state must have the shapes `spec` builds.
    spec: architecture of `model`.
    overwrite: replace an existing model checkpoint at `directory`. A
      directory that is not a model checkpoint is never replaced.
    metadata: JSON-serialisable extras stored in the spec file (e.g. where
      the weights came from).

  Returns:
    The absolute checkpoint directory.

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False, or it is
      not a model checkpoint (nor empty).
    CheckpointError: the model does not match `spec`.
    TypeError: `spec` is not a `ModelSpec` (e.g. its dict).
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
        'save_model is single-process; save multi-host runs through an orbax '
        'CheckpointManager.')
  if not isinstance(spec, ModelSpec):
    raise TypeError('spec must be a models.ModelSpec (ModelSpec.from_dict '
                    f'turns a dict into one), got {type(spec).__name__}.')
  directory = pathlib.Path(directory).absolute()
  check_output_directory(directory, overwrite=overwrite)
  _check_model_matches_spec(model, spec)
  content = {'format': _FORMAT, 'version': _FORMAT_VERSION,
             'spec': spec.to_dict(), 'metadata': dict(metadata or {})}
  custom = _custom_classes(model)
  if custom:
    content['custom_classes'] = custom
  spec_json = json.dumps(content, indent=2, sort_keys=True)  # Fails early.

  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(directory, 'tmp')
  tmp.mkdir()  # Not mkdtemp: its 0700 mode would stick to the checkpoint.
  try:
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      ckptr.save(tmp / STATE_DIR, args=ocp.args.StandardSave(state))
    (tmp / SPEC_FILE).write_text(spec_json + '\n')
    _replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info('Saved %s model checkpoint to %s.', spec, directory)
  return directory


def check_output_directory(directory: str | os.PathLike, *,
                           overwrite: bool):
  """Raises unless a model checkpoint may be written to `directory`.

  Exposed so that slow producers (the TF converter) fail before working.
  """
  directory = pathlib.Path(directory)
  if not directory.exists():
    return
  if not directory.is_dir():
    raise FileExistsError(f'{directory} exists and is not a directory.')
  if not any(directory.iterdir()):
    return  # An empty directory (e.g. made by a caller) holds nothing to lose.
  if not overwrite:
    raise FileExistsError(
        f'{directory} already exists; pass overwrite=True (--overwrite) to '
        'replace it.')
  if not is_model_checkpoint(directory):
    raise FileExistsError(
        f'{directory} exists and is not a sact_jax model checkpoint; refusing '
        'to replace it even with overwrite.')
  # Outputs other tools wrote beside the weights (evaluate's eval.json,
  # export_ponder_maps' folder) would go with them, and describe the
  # model replaced.
  others = sorted(p.name for p in directory.iterdir()
                  if p.name not in (STATE_DIR, SPEC_FILE))
  if others:
    raise FileExistsError(
        f'{directory} also holds {", ".join(others)}, not part of the model '
        'checkpoint (outputs of the model it holds?); move them away to '
        'replace it.')


def _sibling(directory: pathlib.Path, tag: str) -> pathlib.Path:
  """A fresh hidden name next to `directory` (same filesystem: renames)."""
  return directory.with_name(
      f'.{directory.name}.{tag}-{uuid.uuid4().hex[:12]}')


def _replace_directory(src: pathlib.Path, dst: pathlib.Path):
  """Renames `src` to `dst`, replacing an existing `dst` as late as possible."""
  if not dst.exists():
    src.rename(dst)
    return
  old = _sibling(dst, 'old')
  dst.rename(old)
  try:
    src.rename(dst)
  except BaseException:
    old.rename(dst)  # Put the previous checkpoint back.
    raise
  shutil.rmtree(old, ignore_errors=True)


def _restore_state(directory: pathlib.Path, spec: ModelSpec,
                   **model_kwargs) -> nnx.Module:
  abstract = spec.abstract_model(**model_kwargs)
  graphdef, abstract_state = nnx.split(abstract)
  target = nnx.to_pure_dict(abstract_state)
  state_dir = directory / STATE_DIR
  if not state_dir.is_dir():
    raise CheckpointError(
        f'{directory} is an incomplete model checkpoint (no {STATE_DIR}/).')
  with (ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr,
        reading(f'the model checkpoint {directory}')):
    stored = ckptr.metadata(state_dir).item_metadata
    if stored is None:
      raise CheckpointError(f'Cannot read the array metadata in {state_dir}.')
    problem = _describe_mismatch(_flat_shapes(target), _flat_shapes(stored))
    if problem:
      raise CheckpointError(
          f'The state in {directory} does not fit the model of its spec '
          f'{spec}: {problem}.')
    # `args=` always: without it orbax returns empty items (docs/method.md).
    restored = ckptr.restore(state_dir,
                             args=ocp.args.StandardRestore(target))
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


def restore_model(directory: str | os.PathLike,
                  **model_kwargs) -> tuple[nnx.Module, ModelSpec]:
  """Rebuilds a checkpointed model, in eval mode.

  Args:
    directory: a directory written by `save_model`.
    **model_kwargs: runtime options for `create_model` (`remat`, `unroll`,
      `fast_conv_backward`), and the same `head_cls`/`unit_cls` as the
      saved model's when it had its own (the checkpoint names them).

  Returns:
    `(model, spec)`.

  Raises:
    FileNotFoundError: `directory` does not exist.
    CheckpointError: not a sact_jax model checkpoint (e.g. a training
      workdir: `restore_latest_model`), its state does not fit the
      architecture in its spec, or the model was saved with other classes.
  """
  directory = pathlib.Path(directory).absolute()
  spec, _, saved_classes = _read_checkpoint(directory)
  model = _restore_state(directory, spec, **model_kwargs)
  built = _custom_classes(model)
  if built != saved_classes:
    describe = lambda names: ', '.join(names) or 'sact_jax classes only'
    raise CheckpointError(
        f'{directory} holds a model built with {describe(saved_classes)}, '
        f'but restore_model built one with {describe(built)}: pass the same '
        'classes (head_cls=, unit_cls=), or load the weights into a model of '
        'yours with restore_into.')
  model.eval()
  return model, spec


# ---------------------------------------------------------------------------
# Fine-tuning: partial restores
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestoreReport:
  """What `restore_into` did, as NNX path strings.

  Attributes:
    restored: model variables that now hold the checkpoint's values.
    skipped: model variables matched by `exclude` (left unchanged).
    unused: checkpoint variables that were not restored (excluded, or with
      no place in the model).
  """
  restored: tuple[str, ...]
  skipped: tuple[str, ...]
  unused: tuple[str, ...]

  def summary(self) -> str:
    return (f'restored {len(self.restored)} variable(s), skipped '
            f'{len(self.skipped)} (excluded), left {len(self.unused)} '
            'checkpoint variable(s) unused')


def _tags(predicate: Any) -> list[str]:
  """The tag filters (strings) anywhere inside an NNX filter predicate."""
  if isinstance(predicate, nnx.filterlib.WithTag):
    return [predicate.tag]
  inner = getattr(predicate, 'predicates', ())
  if isinstance(predicate, nnx.filterlib.Not):
    inner = (predicate.predicate,)
  return [tag for p in inner for tag in _tags(p)]


def _exclude_predicate(model: nnx.Module,
                       exclude: nnx.filterlib.Filter | None):
  """`restore_into`'s `exclude` as a predicate, refused if it matches nothing.

  A string is an NNX *tag* filter, not a path: `exclude='head'` would match
  nothing and silently overwrite the halting heads.
  """
  if exclude is None:
    return lambda path, x: False
  predicate = nnx.filterlib.to_predicate(exclude)
  tags = _tags(predicate)
  if tags:
    raise CheckpointError(
        f'exclude={exclude!r}: a string is an NNX tag filter, not a path; '
        f'use checkpoint.HALTING_HEADS or nnx.PathContains({tags[0]!r}).')
  if not any(predicate(tuple(path), variable)
             for path, variable in nnx.to_flat_state(nnx.state(model))):
    raise CheckpointError(
        f'exclude={exclude!r} matches no variable of the model; filter by '
        'path, e.g. checkpoint.HALTING_HEADS or nnx.PathContains(\'logits\').')
  return predicate


def restore_into(model: nnx.Module, source: str | os.PathLike | nnx.Module,
                 *, exclude: nnx.filterlib.Filter | None = None
                 ) -> RestoreReport:
  """Copies the variables of a checkpoint into an existing model.

  The fine-tuning restore of the reference: an ACT/SACT model starts from a
  vanilla checkpoint with every variable restored except the new halting
  heads (`exclude=HALTING_HEADS`). Variables are matched by NNX path; the
  vanilla model's stacked units have the same paths and shapes as the
  adaptive model's `steps.unit`. Nothing is changed unless every
  non-excluded model variable is found with the right shape.

  Args:
    model: the model to update in place (its train/eval mode is kept).
    source: a model checkpoint directory, or a model to copy from.
    exclude: NNX filter of model variables to leave untouched, e.g.
      `HALTING_HEADS`, `nnx.Any(HALTING_HEADS, nnx.PathContains('logits'))`.

  Returns:
    A `RestoreReport` (also logged).

  Raises:
    CheckpointError: a non-excluded model variable is missing from the
      source or has another shape, or `exclude` holds a string (a tag
      filter) or matches no model variable.
  """
  excluded = _exclude_predicate(model, exclude)
  if isinstance(source, nnx.Module):
    source_model, label = source, 'the source model'
  else:
    source_model, _ = restore_model(source)
    label = str(source)
  source_flat = {path_str(p): v
                 for p, v in nnx.to_flat_state(nnx.state(source_model))}

  updates, restored, skipped, missing, mismatched = {}, [], [], [], []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    name = path_str(path)
    if excluded(tuple(path), variable):
      skipped.append(name)
    elif name not in source_flat:
      missing.append(name)
    elif tuple(source_flat[name].shape) != tuple(variable.shape):
      mismatched.append(f'{name}: source {tuple(source_flat[name].shape)} '
                        f'vs model {tuple(variable.shape)}')
    else:
      updates[tuple(path)] = source_flat[name]
      restored.append(name)
  if missing or mismatched:
    parts = []
    if missing:
      parts.append(f'{len(missing)} model variable(s) missing from the '
                   f'source (e.g. {missing[:3]})')
    if mismatched:
      parts.append(f'{len(mismatched)} shape mismatch(es) '
                   f'({"; ".join(mismatched[:3])})')
    raise CheckpointError(
        f'Cannot restore {label} into the model: {"; ".join(parts)}. '
        'Exclude variables that are new in the model with `exclude=`.')
  nnx.update(model, nnx.from_flat_state(updates))
  report = RestoreReport(
      restored=tuple(restored), skipped=tuple(skipped),
      unused=tuple(sorted(set(source_flat) - set(restored))))
  logging.info('restore_into from %s: %s; skipped: %s.', label,
               report.summary(), list(report.skipped))
  return report


# ---------------------------------------------------------------------------
# Training-run checkpoints
# ---------------------------------------------------------------------------


def to_pure(tree: Any) -> Any:
  """nnx.State nodes of `tree` -> plain nested dicts (the on-disk format)."""
  return jax.tree.map(
      lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x,
      tree, is_leaf=lambda x: isinstance(x, nnx.State))


def from_pure(template: Any, pure: Any) -> Any:
  """Inverse of `to_pure`, with `template` giving the nnx.State structure."""
  def restore(t, p):
    if isinstance(t, nnx.State):
      t = jax.tree.map(lambda x: x, t)  # New Variables: leave `t` untouched.
      nnx.replace_by_pure_dict(t, p)
    else:
      t = p
    return t
  return jax.tree.map(restore, template, pure,
                      is_leaf=lambda x: isinstance(x, nnx.State))


def run_manager(workdir: str, *, keep: int = 3,
                read_only: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager in `workdir/checkpoints`."""
  directory = os.path.join(os.path.abspath(workdir), RUN_DIR)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options)


def _latest_run_meta(manager: ocp.CheckpointManager
                     ) -> tuple[int | None, dict[str, Any] | None]:
  """The latest run checkpoint's step and `save_run` metadata, if any."""
  step = manager.latest_step()
  if step is None:
    return None, None
  with reading(_step_name(manager, step)):
    return step, manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']


def latest_run_step(workdir: str) -> int | None:
  """The step of the latest run checkpoint in `workdir`, if any."""
  if not os.path.isdir(os.path.join(workdir, RUN_DIR)):
    return None
  with run_manager(workdir, read_only=True) as manager:
    return manager.latest_step()


def saved_run_spec(workdir: str) -> ModelSpec | None:
  """The model spec of the latest run checkpoint in `workdir`, if any."""
  if not os.path.isdir(os.path.join(workdir, RUN_DIR)):
    return None
  with run_manager(workdir, read_only=True) as manager:
    _, meta = _latest_run_meta(manager)
  return None if meta is None else ModelSpec.from_dict(meta['model_spec'])


class _DataPosition:
  """A data iterator's position, frozen at save time, for grain's handler.

  grain's orbax handler (one `process_<i>-of-<n>.json` per host) may write
  in a background thread while training already draws the next batches; it
  reads this snapshot instead of the live iterator.
  """

  def __init__(self, position: Mapping[str, Any]):
    self._state = json.dumps(position)

  def get_state(self) -> bytes:
    return self._state.encode()


def save_run(manager: ocp.CheckpointManager, step: int,
             state: Mapping[str, Any], data_position: Mapping[str, Any],
             spec: ModelSpec, config: Mapping[str, Any]) -> None:
  """Saves a train state (a dict of arrays / nnx.States) at `step`.

  Args:
    manager: from `run_manager`.
    step: the step number of the checkpoint.
    state: the train state's fields; nnx.States are stored as pure dicts.
    data_position: this host's data iterator position (JSON-compatible,
      `data.get_iterator_state`).
    spec: the model's architecture.
    config: the run's config as JSON-compatible data.
  """
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(to_pure(dict(state))),
      data=grain.checkpoint.CheckpointSave(_DataPosition(data_position)),
      meta=ocp.args.JsonSave({'model_spec': spec.to_dict(),
                              'config': dict(config),
                              'ema': 'ema' in state})), force=True)
  logging.info('Saving the step-%d checkpoint to %s.', step, manager.directory)


def _check_host_count(manager: ocp.CheckpointManager, step: int) -> None:
  """Refuses a run checkpoint saved by another number of hosts.

  Each host saved its own data position (`process_<i>-of-<n>.json`), for
  its shard of the data: with another host count the shards differ, and
  grain finds no position for this one.
  """
  data_dir = os.path.join(os.fspath(manager.directory), str(step), 'data')
  counts = {int(m.group(1)) for name in
            (os.listdir(data_dir) if os.path.isdir(data_dir) else ())
            if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', name))}
  if counts and counts != {jax.process_count()}:
    raise CheckpointError(
        f'{_step_name(manager, step)} was saved by {max(counts)} hosts '
        f'(processes) and this run has {jax.process_count()}: each host '
        'resumes its own data shard, so resume it with '
        f'{max(counts)}, or train in another --workdir.')


def restore_run(manager: ocp.CheckpointManager, step: int,
                template: Mapping[str, Any],
                iterator: grain.DatasetIterator) -> dict[str, Any]:
  """Restores `save_run`'s state into `template`'s structure and shardings.

  `template` has the same keys as the saved state, with nnx.States of
  `jax.ShapeDtypeStruct`s (carrying the target shardings); `iterator` is
  moved to the saved data position.
  """
  _check_host_count(manager, step)
  target = to_pure(dict(template))
  with reading(_step_name(manager, step)):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
        data=grain.checkpoint.CheckpointRestore(iterator)))['state']
  return {k: from_pure(v, restored[k]) for k, v in template.items()}


def restore_latest_model(workdir: str, spec: ModelSpec,
                         **options) -> nnx.Module:
  """The model of the latest training checkpoint in `workdir`, eval mode.

  Only the model variables are read (not the optimizer state), replicated
  over all devices: their moving averages when the run kept them
  (`ema_decay`), else the variables themselves.

  Args:
    workdir: a training run's workdir.
    spec: the architecture expected; the checkpoint's must be the same.
    **options: runtime options of `ModelSpec.create` (`remat`, `unroll`).

  Raises:
    CheckpointError: `workdir` holds no training checkpoint, or one of
      another model.
  """
  return restore_latest_variables(workdir, spec.abstract_model(**options),
                                  spec)


def restore_latest_variables(workdir: str, abstract_model: nnx.Module,
                             spec: ModelSpec) -> nnx.Module:
  """`abstract_model` with the variables of `workdir`'s latest checkpoint.

  As `restore_latest_model`, for any model whose run checkpoints are saved
  with `spec` (a classifier, or a detector around its backbone's spec).

  Raises:
    CheckpointError: `workdir` holds no training checkpoint, or one saved
      with another spec.
  """
  missing = CheckpointError(
      f'No training checkpoint in {os.path.join(workdir, RUN_DIR)}.')
  if not os.path.isdir(os.path.join(workdir, RUN_DIR)):
    raise missing
  with run_manager(workdir, read_only=True) as manager:
    # One manager and one step for the metadata and the weights: a run that
    # saves meanwhile cannot mix two checkpoints.
    step, meta = _latest_run_meta(manager)
    if meta is None:
      raise missing
    saved = ModelSpec.from_dict(meta['model_spec'])
    if saved != spec:
      raise CheckpointError(
          f'The checkpoint in {workdir} holds another model '
          f'({saved.describe()}) than the config ({spec.describe()}).')
    return _restore_model_variables(manager, step, abstract_model,
                                    meta.get('ema', False), workdir)


def _restore_model_variables(manager: ocp.CheckpointManager, step: int,
                             abstract: nnx.Module, use_ema: bool,
                             workdir: str) -> nnx.Module:
  """The model variables (or their averages) of one run checkpoint."""
  graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
  # The trainer's mesh: the restored weights are placed as it places them.
  sharding = parallel.replicated(parallel.make_mesh())

  def target_of(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nnx.to_pure_dict(state))
  target = {'params': target_of(params), 'model_state': target_of(model_state)}
  if use_ema:
    target = {'ema': target}
  with reading(_step_name(manager, step)):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))['state']
  if use_ema:
    restored = restored['ema']
  # A partial restore leaves what the checkpoint lacks abstract: a run of
  # another kind (a detector's workdir for a classifier, or the reverse).
  lacking = [_key_path_str(path) for path, leaf
             in jax.tree_util.tree_leaves_with_path(restored)
             if not isinstance(leaf, jax.Array)]
  if lacking:
    raise CheckpointError(
        f'{_step_name(manager, step)} lacks {len(lacking)} of the model\'s '
        f'variables (e.g. {lacking[0]}): it is a run of another kind of '
        'model (a detector\'s for a classifier, or the reverse?).')
  nnx.replace_by_pure_dict(params, restored['params'])
  nnx.replace_by_pure_dict(model_state, restored['model_state'])
  model = nnx.merge(graphdef, params, model_state)
  model.eval()
  logging.info('Restored the step-%d model%s from %s.', step,
               ' (moving averages)' if use_ema else '', workdir)
  return model
