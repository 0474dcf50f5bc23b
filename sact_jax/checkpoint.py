"""Checkpoints: model-only, training runs, fine-tuning restores, TF converter.

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

TensorFlow is imported lazily, only to read the reference's TF checkpoints.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
from flax import nnx
import jax
import numpy as np
import grain
import orbax.checkpoint as ocp

from sact_jax import act as act_lib
from sact_jax import blocks as blocks_lib
from sact_jax import reference
from sact_jax.models import factory

SPEC_FILE = 'model_spec.json'
# Subdirectory of a training workdir with the run's CheckpointManager.
RUN_DIR = 'checkpoints'
STATE_DIR = 'state'
_FORMAT = 'sact_jax.model_checkpoint'
_FORMAT_VERSION = 1

# Fine-tuning filter: the halting heads live in `blocks/<i>/steps/head`. An
# exact path component, so the CIFAR `head_bn` (trunk) is not caught.
HALTING_HEADS = nnx.PathContains('head')

# Top TF scope of each family's variables (as in `reference.py`).
_TF_SCOPES = {'cifar': 'resnet_residual', 'imagenet': 'resnet_v2'}

TF_MISSING_MESSAGE = (
    'Reading TF checkpoints needs TensorFlow, which is not installed: '
    'pip install -e .[tf]')

# Last name component of variables that TF optimizers and
# `tf.train.ExponentialMovingAverage` add next to each model variable.
_EMA_SUFFIX = 'ExponentialMovingAverage'
_SLOT_SUFFIXES = frozenset({
    'Momentum', 'RMSProp', 'RMSProp_1', 'Adam', 'Adam_1', 'Adagrad',
    'AdagradDA', 'Ftrl', 'Ftrl_1', 'Adadelta', 'Adadelta_1', _EMA_SUFFIX})


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed, or does not fit the model."""


class TensorFlowMissingError(ImportError):
  """Reading a TF checkpoint was asked for, but TensorFlow is absent."""


# ---------------------------------------------------------------------------
# ModelSpec
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What `models.create_model` needs to rebuild a checkpointed model.

  Runtime options that do not change the weights (`remat`, `unroll`,
  `fast_conv_backward`) are not part of the spec; pass them to `create` or
  `restore_model`.

  Attributes:
    family: 'cifar' or 'imagenet'.
    units: units per block; a preset depth (e.g. 110) is resolved on
      construction.
    model_type: 'vanilla', 'act' or 'sact'.
    num_classes: size of the logits.
    base_channels: None for the family default.
    eps: halting threshold is `1 - eps`.
  """
  family: str
  units: tuple[int, ...]
  model_type: str
  num_classes: int
  base_channels: int | None = None
  eps: float = act_lib.DEFAULT_EPS

  def __post_init__(self):
    # Frozen: normalise through object.__setattr__ (the documented idiom).
    object.__setattr__(self, 'units',
                       factory.resolve_units(self.family, self.units))
    if self.model_type not in blocks_lib.MODEL_TYPES:
      raise ValueError(f'model_type must be one of {blocks_lib.MODEL_TYPES}, '
                       f'got {self.model_type!r}.')
    if int(self.num_classes) < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}.')
    object.__setattr__(self, 'num_classes', int(self.num_classes))
    if self.base_channels is not None:
      if int(self.base_channels) < 1:
        raise ValueError(
            f'base_channels must be >= 1, got {self.base_channels}.')
      object.__setattr__(self, 'base_channels', int(self.base_channels))
    if not 0.0 < float(self.eps) < 1.0:
      raise ValueError(f'eps must lie in (0, 1), got {self.eps}.')
    object.__setattr__(self, 'eps', float(self.eps))

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (units as a list)."""
    d = dataclasses.asdict(self)
    d['units'] = list(self.units)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelSpec':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'Unknown ModelSpec field(s) {unknown}.')
    d = dict(d)
    if isinstance(d.get('units'), list):
      d['units'] = tuple(d['units'])
    return cls(**d)

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'ModelSpec':
    """The architecture a training config describes (ValueError if bad)."""
    # One value is a depth: `--config.units=3` arrives as (3,).
    units = factory.depth_or_units(config['units'])
    return cls(family=config['family'], units=units,
               model_type=config['model_type'],
               num_classes=config['num_classes'],
               base_channels=config.get('base_channels'), eps=config['eps'])

  def describe(self) -> str:
    """One line for messages: 'cifar sact units=[2, 2, 2] classes=6 ...'."""
    return (f'{self.family} {self.model_type} units={list(self.units)} '
            f'classes={self.num_classes} base_channels={self.base_channels} '
            f'eps={self.eps}')

  def create(self, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Builds the model; `kwargs` are runtime options (`remat`, ...)."""
    return factory.create_model(
        self.family, self.units, self.model_type,
        num_classes=self.num_classes, base_channels=self.base_channels,
        eps=self.eps, rngs=rngs, **kwargs)

  def abstract_model(self, **kwargs) -> nnx.Module:
    """The model with `ShapeDtypeStruct`s instead of arrays (no init cost)."""
    return nnx.eval_shape(lambda: self.create(nnx.Rngs(0), **kwargs))


# ---------------------------------------------------------------------------
# Paths and shapes
# ---------------------------------------------------------------------------


def path_str(path: Sequence[Any]) -> str:
  """'blocks/1/steps/head/local_conv/kernel' for an NNX state path."""
  return '/'.join(str(p) for p in path)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Path string -> shape, for a nested dict of arrays or array metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path):
          tuple(leaf.shape)
      for path, leaf in flat}


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


def _read_spec_file(directory: pathlib.Path) -> tuple[ModelSpec, dict]:
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
  return spec, content.get('metadata', {})


def is_model_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a sact_jax model checkpoint (spec readable)."""
  try:
    _read_spec_file(pathlib.Path(directory))
  except CheckpointError:
    return False
  return True


def read_spec(directory: str | os.PathLike) -> ModelSpec:
  """The architecture of a model checkpoint, without loading any weights."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'No model checkpoint at {directory}: no such '
                            'directory.')
  return _read_spec_file(directory)[0]


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The free-form metadata stored with `save_model(..., metadata=)`."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'No model checkpoint at {directory}: no such '
                            'directory.')
  return _read_spec_file(directory)[1]


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
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
        'save_model is single-process; save multi-host runs through an orbax '
        'CheckpointManager.')
  directory = pathlib.Path(directory).absolute()
  check_output_directory(directory, overwrite=overwrite)
  _check_model_matches_spec(model, spec)
  content = {'format': _FORMAT, 'version': _FORMAT_VERSION,
             'spec': spec.to_dict(), 'metadata': dict(metadata or {})}
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
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    stored = ckptr.metadata(state_dir).item_metadata
    if stored is None:
      raise CheckpointError(f'Cannot read the array metadata in {state_dir}.')
    problem = _describe_mismatch(_flat_shapes(target), _flat_shapes(stored))
    if problem:
      raise CheckpointError(
          f'The state in {directory} does not fit the model of its spec '
          f'{spec}: {problem}.')
    # `args=` always: without it orbax returns empty items (ENVIRONMENT.md).
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
      `fast_conv_backward`).

  Returns:
    `(model, spec)`.

  Raises:
    FileNotFoundError: `directory` does not exist.
    CheckpointError: not a sact_jax model checkpoint, or its state does not
      fit the architecture in its spec.
  """
  directory = pathlib.Path(directory).absolute()
  spec = read_spec(directory)
  model = _restore_state(directory, spec, **model_kwargs)
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
      source or has another shape.
  """
  if isinstance(source, nnx.Module):
    source_model, label = source, 'the source model'
  else:
    source_model, _ = restore_model(source)
    label = str(source)
  source_flat = {path_str(p): v
                 for p, v in nnx.to_flat_state(nnx.state(source_model))}
  excluded = (nnx.filterlib.to_predicate(exclude) if exclude is not None
              else lambda path, x: False)

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
# TF checkpoints of the reference implementation
# ---------------------------------------------------------------------------


def _import_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TensorFlowMissingError(TF_MISSING_MESSAGE) from None
  return tf


def resolve_tf_checkpoint(path: str | os.PathLike) -> str:
  """The checkpoint prefix (`.../model.ckpt-N`) for a prefix, file or dir.

  A directory is resolved through its `checkpoint` state file
  (`tf.train.latest_checkpoint`) or, when that names nothing that exists (a
  released archive keeps the authors' absolute paths), its only `*.index`
  file. A `.index`, `.data-*` or `.meta` file stands for its prefix.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    tf = _import_tf()
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      indexes = sorted(pathlib.Path(path).glob('*.index'))
      if len(indexes) != 1:
        raise FileNotFoundError(
            f'Cannot pick a TF checkpoint in {path}: no usable "checkpoint" '
            f'state file and {len(indexes)} *.index files; pass a checkpoint '
            'prefix (e.g. DIR/model.ckpt-100000).')
      prefix = str(indexes[0])[:-len('.index')]
    return prefix
  prefix = re.sub(r'\.(index|meta|data-\d+-of-\d+)$', '', path)
  if os.path.isfile(prefix + '.index'):
    return prefix
  if os.path.isfile(path) and prefix == path:
    return path  # A V1 (single file) checkpoint; TF reads those too.
  raise FileNotFoundError(
      f'No TF checkpoint at {path}: {prefix}.index does not exist.')


def read_tf_checkpoint(path: str | os.PathLike,
                       names: Iterable[str] | None = None
                       ) -> dict[str, np.ndarray]:
  """Variables of a TF (V2, name-based) checkpoint as numpy arrays.

  Args:
    path: checkpoint prefix, its `.index` file, or a directory.
    names: variables to read (default: all).

  Raises:
    TensorFlowMissingError: TensorFlow is not installed (`pip install -e
      .[tf]`).
    FileNotFoundError: no checkpoint at `path`.
    CheckpointError: a requested name is not in the checkpoint.
  """
  tf = _import_tf()
  prefix = resolve_tf_checkpoint(path)
  reader = tf.train.load_checkpoint(prefix)
  available = reader.get_variable_to_shape_map()
  names = sorted(available) if names is None else list(names)
  absent = [n for n in names if n not in available]
  if absent:
    raise CheckpointError(f'{len(absent)} variable(s) not in {prefix}: '
                          f'{absent[:5]}.')
  return {n: np.asarray(reader.get_tensor(n)) for n in names}


def tf_variable_names(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every variable in a TF checkpoint (reads no values)."""
  tf = _import_tf()
  reader = tf.train.load_checkpoint(resolve_tf_checkpoint(path))
  return {n: tuple(s) for n, s in reader.get_variable_to_shape_map().items()}


@dataclasses.dataclass(frozen=True)
class VariableSelection:
  """Which TF checkpoint variables make up the model.

  Attributes:
    sources: model variable name -> checkpoint variable to read it from (the
      name itself, or its `/ExponentialMovingAverage` shadow).
    skipped: checkpoint variable -> why it is not part of the model.
    used_ema: whether moving-average shadows were used.
  """
  sources: dict[str, str]
  skipped: dict[str, str]
  used_ema: bool


def select_model_variables(names: Iterable[str], family: str, *,
                           ema: bool | None = None) -> VariableSelection:
  """Separates model variables from what training added to a TF checkpoint.

  The reference's checkpoints also hold `global_step`, optimizer slots
  (`<var>/Momentum`) and, for ImageNet, `tf.train.ExponentialMovingAverage`
  shadows (`<var>/ExponentialMovingAverage`, decay 0.9999) of every model
  variable, BN statistics included; its ImageNet evaluator restores the
  shadows in place of the raw values.

  Args:
    names: every variable name in the checkpoint.
    family: 'cifar' or 'imagenet' (fixes the model's top scope).
    ema: True: take every model variable from its moving-average shadow;
      False: take the raw values; None: shadows if the checkpoint has any,
      as the reference's evaluator does.

  Returns:
    A `VariableSelection`.

  Raises:
    CheckpointError: shadows were asked for (or found) but some model
      variables have none.
  """
  if family not in _TF_SCOPES:
    raise ValueError(f'family must be one of {sorted(_TF_SCOPES)}, got '
                     f'{family!r}.')
  prefix = _TF_SCOPES[family] + '/'
  raw, shadows, skipped = set(), {}, {}
  for name in names:
    base, _, last = name.rpartition('/')
    if not name.startswith(prefix):
      skipped[name] = f'outside the model scope {prefix[:-1]!r}'
    elif last == _EMA_SUFFIX:
      shadows[base] = name
    elif last in _SLOT_SUFFIXES:
      skipped[name] = f'optimizer slot ({last})'
    else:
      raw.add(name)
  use_ema = bool(shadows) if ema is None else ema
  if use_ema and not shadows:
    raise CheckpointError(
        'Moving-average weights were asked for, but the checkpoint has no '
        f'{_EMA_SUFFIX} variables under {prefix[:-1]!r}.')
  if not use_ema:
    for shadow in shadows.values():
      skipped[shadow] = 'moving-average shadow (raw values used)'
    return VariableSelection({n: n for n in sorted(raw)}, skipped, False)
  no_shadow = sorted(raw - set(shadows))
  if no_shadow:
    raise CheckpointError(
        f'{len(no_shadow)} of {len(raw)} model variables have no '
        f'{_EMA_SUFFIX} shadow (e.g. {no_shadow[:3]}); convert the raw '
        'values with ema=False (--ema=no).')
  for name in raw:
    skipped[name] = 'raw value (moving-average shadow used)'
  return VariableSelection(dict(sorted(shadows.items())), skipped, True)


@dataclasses.dataclass(frozen=True)
class Conversion:
  """Result of `convert_tf_checkpoint`."""
  model: nnx.Module
  spec: ModelSpec
  source: str
  output: pathlib.Path
  selection: VariableSelection


def convert_tf_checkpoint(tf_checkpoint: str | os.PathLike,
                          output: str | os.PathLike, spec: ModelSpec, *,
                          ema: bool | None = None,
                          overwrite: bool = False) -> Conversion:
  """Converts a reference TF checkpoint into a sact_jax model checkpoint.

  Args:
    tf_checkpoint: checkpoint prefix, `.index` file, or a directory with a
      `checkpoint` state file.
    output: model checkpoint directory to write.
    spec: the architecture the TF checkpoint was trained with.
    ema: see `select_model_variables`.
    overwrite: replace an existing model checkpoint at `output`.

  Returns:
    A `Conversion` with the model (eval mode) and what was skipped.

  Raises:
    TensorFlowMissingError: TensorFlow is not installed.
    FileNotFoundError: no TF checkpoint at `tf_checkpoint`.
    FileExistsError: `output` exists (see `save_model`).
    CheckpointError: EMA shadows incomplete (see `select_model_variables`).
    reference.ReferenceMismatchError: the variables do not fit `spec`.
  """
  # Fail before the slow part (TF import, reading) if output is taken.
  check_output_directory(output, overwrite=overwrite)
  _import_tf()
  prefix = resolve_tf_checkpoint(tf_checkpoint)
  selection = select_model_variables(tf_variable_names(prefix), spec.family,
                                     ema=ema)
  values = read_tf_checkpoint(prefix, selection.sources.values())
  params = {name: values[src] for name, src in selection.sources.items()}
  model = reference.load_reference_model(
      params, family=spec.family, units=spec.units,
      model_type=spec.model_type, num_classes=spec.num_classes,
      base_channels=spec.base_channels, eps=spec.eps)
  path = save_model(output, model, spec, overwrite=overwrite, metadata={
      'converted_from': os.path.abspath(prefix),
      'moving_average_weights': selection.used_ema,
  })
  return Conversion(model=model, spec=spec, source=prefix, output=path,
                    selection=selection)


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


def saved_run_spec(workdir: str) -> ModelSpec | None:
  """The model spec of the latest run checkpoint in `workdir`, if any."""
  if not os.path.isdir(os.path.join(workdir, RUN_DIR)):
    return None
  with run_manager(workdir, read_only=True) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    meta = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
  return ModelSpec.from_dict(meta['model_spec'])


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
                              'config': dict(config)})), force=True)
  logging.info('Saving the step-%d checkpoint to %s.', step, manager.directory)


def restore_run(manager: ocp.CheckpointManager, step: int,
                template: Mapping[str, Any],
                iterator: grain.DatasetIterator) -> dict[str, Any]:
  """Restores `save_run`'s state into `template`'s structure and shardings.

  `template` has the same keys as the saved state, with nnx.States of
  `jax.ShapeDtypeStruct`s (carrying the target shardings); `iterator` is
  moved to the saved data position.
  """
  target = to_pure(dict(template))
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
  over all devices.

  Args:
    workdir: a training run's workdir.
    spec: the architecture expected; the checkpoint's must be the same.
    **options: runtime options of `ModelSpec.create` (`remat`, `unroll`).

  Raises:
    CheckpointError: `workdir` holds no training checkpoint, or one of
      another model.
  """
  saved = saved_run_spec(workdir)
  if saved is None:
    raise CheckpointError(
        f'No training checkpoint in {os.path.join(workdir, RUN_DIR)}.')
  if saved != spec:
    raise CheckpointError(
        f'The checkpoint in {workdir} holds another model '
        f'({saved.describe()}) than the config ({spec.describe()}).')
  abstract = spec.abstract_model(**options)
  graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def target_of(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nnx.to_pure_dict(state))
  target = {'params': target_of(params), 'model_state': target_of(model_state)}
  with run_manager(workdir, read_only=True) as manager:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))['state']
  nnx.replace_by_pure_dict(params, restored['params'])
  nnx.replace_by_pure_dict(model_state, restored['model_state'])
  model = nnx.merge(graphdef, params, model_state)
  model.eval()
  logging.info('Restored the step-%d model from %s.', step, workdir)
  return model
