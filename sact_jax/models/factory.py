"""`create_model`: one entry point for every family, depth and model type."""

from typing import Sequence

from flax import nnx

from sact_jax import blocks as blocks_lib
from sact_jax.models import base
from sact_jax.models import cifar
from sact_jax.models import imagenet

FAMILIES = ('cifar', 'imagenet')


def resolve_units(family: str, units: int | Sequence[int]) -> tuple[int, ...]:
  """A preset depth (e.g. 110, 101) or an explicit units-per-block list."""
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}.')
  presets = (cifar.CIFAR_PRESETS if family == 'cifar'
             else imagenet.IMAGENET_PRESETS)
  if isinstance(units, int):
    if units not in presets:
      raise ValueError(
          f'No {family} preset of depth {units}; presets: '
          f'{sorted(presets)}. Pass a list of units per block instead.')
    return presets[units]
  units = tuple(int(u) for u in units)
  if not units or any(u < 1 for u in units):
    raise ValueError(f'units per block must be >= 1, got {units}.')
  return units


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
    **kwargs: `eps`, `remat`, `unroll`, `fast_conv_backward`.

  Returns:
    The model, called as `logits, aux = model(images_BxHxWx3)`.
  """
  units = resolve_units(family, units)
  if model_type not in blocks_lib.MODEL_TYPES:
    raise ValueError(f'model_type must be one of {blocks_lib.MODEL_TYPES}, '
                     f'got {model_type!r}.')
  cls = cifar.CifarResNet if family == 'cifar' else imagenet.ImageNetResNet
  if base_channels is not None:
    kwargs['base_channels'] = base_channels
  return cls(units, model_type, num_classes=num_classes, rngs=rngs, **kwargs)
