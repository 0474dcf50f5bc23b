"""Reading the reference's TF checkpoints, and converting them.

The reference saved name-based TF checkpoints (`model.ckpt-N.index`,
`.data-*`) holding the model variables next to what training added
(`global_step`, optimizer slots, moving-average shadows).
`convert_tf_checkpoint` picks the model variables, maps them onto the NNX
model (`reference.py` knows the names) and writes a sact_jax model
checkpoint.

TensorFlow is imported lazily, only when a TF checkpoint is read: without
it everything else of sact_jax works, and these functions raise
`TensorFlowMissingError` with the line that installs it.
"""

import dataclasses
import os
import pathlib
import re
from typing import Iterable

from flax import nnx
import numpy as np

from sact_jax import checkpoint as checkpoint_lib
from sact_jax import models
from sact_jax import reference

TF_MISSING_MESSAGE = (
    'Reading TF checkpoints needs TensorFlow, which is not installed: '
    'pip install -e .[tf]')

# Last name component of variables that TF optimizers and
# `tf.train.ExponentialMovingAverage` add next to each model variable.
_EMA_SUFFIX = 'ExponentialMovingAverage'
_SLOT_SUFFIXES = frozenset({
    'Momentum', 'RMSProp', 'RMSProp_1', 'Adam', 'Adam_1', 'Adagrad',
    'AdagradDA', 'Ftrl', 'Ftrl_1', 'Adadelta', 'Adadelta_1', _EMA_SUFFIX})


class TensorFlowMissingError(ImportError):
  """Reading a TF checkpoint was asked for, but TensorFlow is absent."""


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
    TypeError: `names` is one string (it would be read per character).
  """
  if isinstance(names, str):
    raise TypeError(f'names must be a list of variable names, got the '
                    f'single {names!r}; pass [{names!r}].')
  tf = _import_tf()
  prefix = resolve_tf_checkpoint(path)
  with checkpoint_lib.reading(f'the TF checkpoint {prefix}'):
    reader = tf.train.load_checkpoint(prefix)
    available = reader.get_variable_to_shape_map()
    names = sorted(available) if names is None else list(names)
    absent = [n for n in names if n not in available]
    if absent:
      raise checkpoint_lib.CheckpointError(
          f'{len(absent)} variable(s) not in {prefix}: {absent[:5]}.')
    return {n: np.asarray(reader.get_tensor(n)) for n in names}


def tf_variable_names(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every variable in a TF checkpoint (reads no values)."""
  tf = _import_tf()
  prefix = resolve_tf_checkpoint(path)
  with checkpoint_lib.reading(f'the TF checkpoint {prefix}'):
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
  return {n: tuple(s) for n, s in shapes.items()}


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


def _check_ema(ema):
  """`ema='no'` (the converter's flag spelling) is truthy: refused."""
  if ema is not None and not isinstance(ema, (bool, np.bool_)):
    raise TypeError(f'ema must be True, False or None, got {ema!r}.')


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
    TypeError: `ema` is not True, False or None.
  """
  _check_ema(ema)
  prefix = reference.top_scope(family) + '/'
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
  use_ema = bool(shadows) if ema is None else bool(ema)
  if use_ema and not shadows:
    raise checkpoint_lib.CheckpointError(
        'Moving-average weights were asked for, but the checkpoint has no '
        f'{_EMA_SUFFIX} variables under {prefix[:-1]!r}.')
  if not use_ema:
    for shadow in shadows.values():
      skipped[shadow] = 'moving-average shadow (raw values used)'
    return VariableSelection({n: n for n in sorted(raw)}, skipped, False)
  no_shadow = sorted(raw - set(shadows))
  if no_shadow:
    raise checkpoint_lib.CheckpointError(
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
  spec: models.ModelSpec
  source: str
  output: pathlib.Path
  selection: VariableSelection


def convert_tf_checkpoint(tf_checkpoint: str | os.PathLike,
                          output: str | os.PathLike,
                          spec: models.ModelSpec, *, ema: bool | None = None,
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
    FileExistsError: `output` exists (see `checkpoint.save_model`).
    CheckpointError: EMA shadows incomplete (see `select_model_variables`).
    TypeError: `spec` is not a ModelSpec, or `ema` not True, False or None.
    reference.ReferenceMismatchError: the variables do not fit `spec`.
  """
  if not isinstance(spec, models.ModelSpec):
    raise TypeError('spec must be a models.ModelSpec (ModelSpec.from_dict '
                    f'turns a dict into one), got {type(spec).__name__}.')
  _check_ema(ema)
  # Fail before the slow part (TF import, reading) if output is taken.
  checkpoint_lib.check_output_directory(output, overwrite=overwrite)
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
  path = checkpoint_lib.save_model(
      output, model, spec, overwrite=overwrite, metadata={
          'converted_from': os.path.abspath(prefix),
          'moving_average_weights': selection.used_ema,
      })
  return Conversion(model=model, spec=spec, source=prefix, output=path,
                    selection=selection)
