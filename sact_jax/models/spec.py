"""`ModelSpec`: the architecture of a model, as data.

Configs, checkpoints and evaluation all name a model by the same few
`create_model` arguments; the spec holds them, builds the model, reads them
back from a built model, and prices the model's vanilla twin (the
denominator of every "FLOPs relative to vanilla" figure).
"""

import dataclasses
from typing import Any, Mapping, Sequence

from flax import nnx

from sact_jax import act as act_lib
from sact_jax import blocks as blocks_lib
from sact_jax import flops as flops_lib
from sact_jax.models import cifar
from sact_jax.models import factory
from sact_jax.models import imagenet

# The keys `ModelSpec.from_config` reads (and `base_channels`, optional).
_CONFIG_KEYS = ('family', 'units', 'model_type', 'num_classes', 'eps')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What `models.create_model` needs to rebuild a model's weights.

  Runtime options that do not change the weights (`remat`, `unroll`,
  `fast_conv_backward`) are not part of the spec; pass them to `create` or
  `checkpoint.restore_model`.

  Attributes:
    family: 'cifar' or 'imagenet'.
    units: units per block; a preset depth (e.g. 110) is resolved on
      construction.
    model_type: 'vanilla', 'act' or 'sact'.
    num_classes: size of the logits.
    base_channels: the width of the first block (CIFAR) or of its
      bottleneck (ImageNet); None becomes the family default (16 / 64), so
      that specs of the same weights are equal.
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
    object.__setattr__(self, 'num_classes', factory.positive_int(
        'num_classes', self.num_classes))
    object.__setattr__(self, 'base_channels', factory.positive_int(
        'base_channels', factory.default_base_channels(self.family)
        if self.base_channels is None else self.base_channels))
    if isinstance(self.eps, (str, bytes)):
      # As `create_model`: a number, not its text.
      raise TypeError(f'eps must be a number in (0, 1), got {self.eps!r}.')
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
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing:
      raise ValueError(
          f'config lacks {", ".join(repr(k) for k in missing)} '
          f'(ModelSpec.from_config needs {", ".join(_CONFIG_KEYS)}).')
    # One value is a depth: `--config.units=3` arrives as (3,).
    units = factory.depth_or_units(config['units'])
    return cls(family=config['family'], units=units,
               model_type=config['model_type'],
               num_classes=config['num_classes'],
               base_channels=config.get('base_channels'), eps=config['eps'])

  @classmethod
  def from_model(cls, model: nnx.Module) -> 'ModelSpec':
    """The architecture of a built (or abstract) model, read from it.

    Read from the model itself, so that what is reported about a restored
    model never depends on a config that might disagree with it.

    Raises:
      TypeError: `model` is not a `CifarResNet` or `ImageNetResNet`.
    """
    if isinstance(model, cifar.CifarResNet):
      family, base_channels = 'cifar', model.stem_conv.out_features
    elif isinstance(model, imagenet.ImageNetResNet):
      family = 'imagenet'
      base_channels = model.blocks[0].first.conv1.out_features
    else:
      raise TypeError(f'Expected a CifarResNet or ImageNetResNet, got '
                      f'{type(model).__name__}.')
    return cls(family=family, units=tuple(model.units),
               model_type=model.model_type,
               num_classes=model.logits.out_features,
               base_channels=base_channels, eps=model.blocks[0].eps)

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

  def vanilla_flops(self, image_shape: Sequence[int]) -> int:
    """FLOPs per image of the vanilla network of this depth and width.

    Computed without weights or convolutions (see `flops.vanilla_flops`).

    Args:
      image_shape: `(H, W, 3)` of the input images.
    """
    if not all(factory.is_integer(d) for d in image_shape):
      # int() would truncate a size of 32.5 to 32, silently.
      raise ValueError(f'image_shape must hold integers, got '
                       f'{tuple(image_shape)}.')
    vanilla = dataclasses.replace(self, model_type='vanilla')
    return flops_lib.vanilla_flops(lambda: vanilla.create(nnx.Rngs(0)),
                                   tuple(int(d) for d in image_shape))
