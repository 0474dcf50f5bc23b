"""`create_model`: one entry point for every family, depth and model type."""

import collections.abc
import inspect
import numbers
from typing import Sequence

from flax import nnx

from sact_jax import blocks as blocks_lib
from sact_jax.models import base
from sact_jax.models import cifar
from sact_jax.models import imagenet

FAMILIES = ('cifar', 'imagenet')


def is_integer(value) -> bool:
  """An integer, not a bool (which Python counts as one) nor a float."""
  return (isinstance(value, numbers.Integral)
          and not isinstance(value, bool))


def positive_int(name: str, value) -> int:
  """`value` as an int, or one clear error if it is not an integer >= 1.

  Floats are refused rather than truncated: `num_classes=2.7` is a mistake,
  not a request for 2 classes.
  """
  if not is_integer(value) or value < 1:
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
  return int(value)


def resolve_units(family: str, units: int | Sequence[int]) -> tuple[int, ...]:
  """A preset depth (e.g. 110, 101) or an explicit units-per-block list."""
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}.')
  presets = (cifar.CIFAR_PRESETS if family == 'cifar'
             else imagenet.IMAGENET_PRESETS)
  if is_integer(units):
    if units not in presets:
      num_blocks = len(next(iter(presets.values())))
      example = ', '.join([str(max(int(units), 1))] * num_blocks)
      raise ValueError(
          f'units={units} is not a known {family} depth '
          f'({", ".join(str(d) for d in sorted(presets))}); give units per '
          f'block, e.g. ({example}).')
    return presets[int(units)]
  if (isinstance(units, (str, bytes))
      or not isinstance(units, collections.abc.Iterable)):
    raise ValueError(f'units must be a {family} depth or a sequence of '
                     f'units per block, got {units!r}.')
  units = tuple(units)
  if not units or not all(is_integer(u) and u >= 1 for u in units):
    raise ValueError(f'units per block must be integers >= 1, got {units}.')
  return tuple(int(u) for u in units)


def resnet_depth(family: str, units: Sequence[int]) -> int:
  """The depth a units-per-block list makes: layers with weights.

  The convention of the ResNet papers (and of the presets): the stem
  convolution, two (CIFAR basic) or three (ImageNet bottleneck) per unit,
  and the classifier; e.g. CIFAR (18, 18, 18) is ResNet-110 and ImageNet
  (3, 4, 23, 3) ResNet-101.
  """
  units = resolve_units(family, units)
  return (2 if family == 'cifar' else 3) * sum(units) + 2


def depth_or_units(units: int | Sequence[int]) -> int | tuple[int, ...]:
  """Units as configs and flags give them: a single value is a depth.

  A command line cannot tell a scalar from a one-element tuple
  (ml_collections turns `--config.units=3` into `(3,)`), so one value from
  there is read as a preset depth, which `resolve_units` checks: 3 is
  refused rather than silently building a one-block model. One-block models
  are made by passing `(n,)` to `create_model` or `ModelSpec` directly.

  Args:
    units: a config's or flag's units.

  Returns:
    The depth (one value) or the units per block (a tuple).

  Raises:
    ValueError: a value is not an integer.
  """
  iterable = (isinstance(units, collections.abc.Iterable)
              and not isinstance(units, str))
  values = tuple(units) if iterable else (units,)
  if not all(is_integer(v) for v in values):
    raise ValueError(f'units must be integers, got {units!r}.')
  values = tuple(int(v) for v in values)
  return values[0] if len(values) == 1 else values


def default_base_channels(family: str) -> int:
  """The family's `base_channels` when none is given (its model's default)."""
  cls = cifar.CifarResNet if family == 'cifar' else imagenet.ImageNetResNet
  return inspect.signature(cls.__init__).parameters['base_channels'].default


def create_model(family: str, units: int | Sequence[int], model_type: str, *,
                 num_classes: int, base_channels: int | None = None,
                 rngs: nnx.Rngs, **kwargs) -> base.AdaptiveResNet:
  """Builds a CIFAR or ImageNet ResNet.

  Args:
    family: 'cifar' or 'imagenet'.
    units: units per block, or a preset depth (CIFAR 20/32/56/110, ImageNet
      50/101/152/200).
    model_type: 'vanilla', 'act' or 'sact'.
    num_classes: size of the logits.
    base_channels: width of the first block (CIFAR default 16) or its
      bottleneck (ImageNet default 64).
    rngs: initialisation randomness.
    **kwargs: `eps`, `remat`, `unroll`, `fast_conv_backward`, `unit_cls`,
      `head_cls` (`CifarResNet`, `ImageNetResNet`).

  Returns:
    The model, called as `logits, aux = model(images_BxHxWx3)`.
  """
  units = resolve_units(family, units)
  if not isinstance(rngs, nnx.Rngs):
    # A seed or a key would fail deep inside Flax's initialisers.
    raise TypeError(f'rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got '
                    f'{type(rngs).__name__}.')
  if model_type not in blocks_lib.MODEL_TYPES:
    raise ValueError(f'model_type must be one of {blocks_lib.MODEL_TYPES}, '
                     f'got {model_type!r}.')
  cls = cifar.CifarResNet if family == 'cifar' else imagenet.ImageNetResNet
  num_classes = positive_int('num_classes', num_classes)
  if base_channels is not None:
    kwargs['base_channels'] = positive_int('base_channels', base_channels)
  return cls(units, model_type, num_classes=num_classes, rngs=rngs, **kwargs)
