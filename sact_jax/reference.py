"""Loading weights of the reference TF implementation (mfigurnov/sact).

The reference names variables by TF scope, e.g.
`resnet_residual/block_2/unit_1/residual/conv1/BatchNorm/moving_mean` or
`resnet_v2/block3/unit_2/halting_proba/local_conv/weights`. Here units 2..L
of a block are stacked along a leading axis for `nnx.scan`, and the halting
head of unit k lives in scan step k+1 (see `blocks.py`), so one NNX variable
gathers several TF variables.
"""

import os
from typing import Mapping, Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from sact_jax.models import factory

_SCOPES = {
    # family: (prefix, block scope format, unit scope, stem, head norm)
    'cifar': ('resnet_residual', 'block_{}', 'residual', 'Conv', 'BatchNorm'),
    'imagenet': ('resnet_v2', 'block{}', 'bottleneck_v2', 'conv1',
                 'postnorm'),
}
_MODULES = {'conv1_bn': 'conv1/BatchNorm', 'conv2_bn': 'conv2/BatchNorm'}
_BN_LEAVES = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean',
              'var': 'moving_variance'}
_CONV_LEAVES = {'kernel': 'weights', 'bias': 'biases'}
_NORMS = ('preact', 'conv1_bn', 'conv2_bn', 'local_bn', 'global_bn',
          'head_bn', 'postnorm')


class ReferenceMismatchError(ValueError):
  """The reference variables do not fit the requested architecture."""


def top_scope(family: str) -> str:
  """The TF scope that holds all of a family's model variables."""
  if family not in _SCOPES:
    raise ValueError(f'family must be one of {sorted(_SCOPES)}, got '
                     f'{family!r}.')
  return _SCOPES[family][0]


def _leaf(module: str, leaf: str) -> str:
  table = _BN_LEAVES if module in _NORMS else _CONV_LEAVES
  return table[leaf]


def reference_names(model_state: nnx.State, family: str
                    ) -> dict[tuple, str | list[str]]:
  """Maps each NNX variable path to its TF name (a list if stacked)."""
  prefix, block_fmt, unit_scope, stem, head_norm = _SCOPES[family]
  names = {}
  for path, _ in nnx.to_flat_state(model_state):
    path = tuple(path)
    if path[0] == 'stem_conv':
      names[path] = f'{prefix}/{stem}/{_leaf("stem", path[1])}'
    elif path[0] in ('head_bn', 'postnorm'):
      names[path] = f'{prefix}/{head_norm}/{_leaf(path[0], path[1])}'
    elif path[0] == 'logits':
      names[path] = f'{prefix}/logits/{_leaf("logits", path[1])}'
    elif path[0] == 'blocks':
      block = f'{prefix}/{block_fmt.format(path[1] + 1)}'
      part = path[2]
      module, leaf = path[-2], path[-1]
      scope = f'{_MODULES.get(module, module)}/{_leaf(module, leaf)}'
      if part == 'first':
        names[path] = f'{block}/unit_1/{unit_scope}/{scope}'
      elif part == 'steps':
        # Filled with one name per stacked unit once the count is known.
        names[path] = (block, path[3], unit_scope, scope)
      else:
        raise ReferenceMismatchError(f'Unexpected variable path {path}.')
    else:
      raise ReferenceMismatchError(f'Unexpected variable path {path}.')
  return names


def _stacked_names(spec: tuple, count: int) -> list[str]:
  block, kind, unit_scope, scope = spec
  if kind == 'unit':  # Step k holds unit k + 2 (1-based).
    return [f'{block}/unit_{k + 2}/{unit_scope}/{scope}'
            for k in range(count)]
  # Step k holds the halting head of unit k + 1.
  return [f'{block}/unit_{k + 1}/halting_proba/{scope}' for k in range(count)]


def _fit(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if value.shape != shape:
    # 1x1 convs of the reference are dense layers here: [1, 1, C, K] -> [C, K].
    if value.shape[:2] == (1, 1) and value.shape[2:] == shape:
      return value.reshape(shape)
    raise ReferenceMismatchError(
        f'Variable {name} has shape {value.shape}, the model expects '
        f'{shape}.')
  return value


def load_reference_model(params: Mapping[str, np.ndarray], *, family: str,
                         units: int | Sequence[int], model_type: str,
                         num_classes: int, base_channels: int | None = None,
                         **kwargs) -> nnx.Module:
  """Builds the model holding the reference's weights, in eval mode.

  Args:
    params: TF variable name (without `:0`) -> array, e.g. the contents of a
      reference `params.npz` or of a converted checkpoint.
    family, units, model_type, num_classes, base_channels: as for
      `models.create_model`.
    **kwargs: further `create_model` options (`eps`, `remat`, ...).

  Returns:
    The NNX model in eval mode.

  Raises:
    ReferenceMismatchError: a variable is missing, unexpected or mis-shaped.
    TypeError: `params` is a path, not a mapping.
  """
  if isinstance(params, (str, bytes, os.PathLike)):
    # `in` on a string tests substrings: every variable would be "missing".
    raise TypeError(
        'params must be a mapping of TF names to arrays (e.g. '
        f'dict(np.load(path))), got the path {os.fspath(params)!r}.')
  abstract = nnx.eval_shape(lambda: factory.create_model(
      family, units, model_type, num_classes=num_classes,
      base_channels=base_channels, rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(abstract)
  names = reference_names(state, family)
  flat = dict(nnx.to_flat_state(state))
  used = set()
  missing = []
  for path, spec in names.items():
    variable = flat[path]
    shape = tuple(variable.shape)
    if isinstance(spec, tuple):
      tf_names = _stacked_names(spec, shape[0])
      absent = [n for n in tf_names if n not in params]
      if absent:
        missing.extend(absent)
        continue
      value = np.stack([_fit(n, params[n], shape[1:]) for n in tf_names])
      used.update(tf_names)
    else:
      if spec not in params:
        missing.append(spec)
        continue
      value = _fit(spec, params[spec], shape)
      used.add(spec)
    variable.set_value(jnp.asarray(value))
  if missing:
    # TF's tensor names end in ':0'; variable names do not.
    hint = (" (the weights' names end in ':0': drop that suffix)"
            if any(f'{name}:0' in params for name in missing) else '')
    raise ReferenceMismatchError(
        f'{len(missing)} variable(s) missing from the reference weights, '
        f'e.g. {sorted(missing)[:5]}{hint}.')
  unexpected = sorted(set(params) - used)
  if unexpected:
    raise ReferenceMismatchError(
        f'{len(unexpected)} reference variable(s) have no place in a '
        f'{family} {model_type} model with units {units}: '
        f'{unexpected[:5]}.')
  model = nnx.merge(graphdef, state)
  model.eval()
  return model
