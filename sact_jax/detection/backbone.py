"""A classification ResNet as a detection backbone and box classifier.

The SACT paper's Faster R-CNN splits an ImageNet ResNet in two: the stem
and blocks 1-3 extract a stride-16 feature map from the whole image (where
SACT's ponder maps concentrate on objects), and block 4 runs on each
region's cropped features as the box classifier. Both halves are the
classifier's own modules and weights (`AdaptiveResNet.run_blocks`), so a
classification checkpoint initialises them, halting heads included, and
their ponder costs and FLOPs follow the classifier's conventions.
"""

import jax

from sact_jax import flops as flops_lib
from sact_jax.models import base

DEFAULT_FEATURE_BLOCKS = 3


def _check_split(model: base.AdaptiveResNet, num_blocks: int):
  if not 1 <= num_blocks <= len(model.blocks):
    raise ValueError(f'num_blocks must lie in [1, {len(model.blocks)}] for '
                     f'a model of {len(model.blocks)} blocks, got '
                     f'{num_blocks}.')


def extract_features(model: base.AdaptiveResNet, images_BxHxWx3: jax.Array,
                     num_blocks: int = DEFAULT_FEATURE_BLOCKS, *,
                     counter: flops_lib.FlopCounter | None = None
                     ) -> tuple[jax.Array, dict]:
  """The stem and blocks 1..num_blocks: `(features_BxhxwxC, aux)`.

  Any input size (SAME padding, as the classifier). `aux` holds the
  blocks' `ponder_cost` and `num_units` (ponder maps for SACT),
  `ponder_loss`, and `flops` `[B]`: what the extractor ran, in the
  reference convention.
  """
  base.check_images(images_BxHxWx3)
  _check_split(model, num_blocks)
  counter = flops_lib.FlopCounter() if counter is None else counter
  x = model.stem(images_BxHxWx3, counter)
  features, aux = model.run_blocks(x, counter, 0, num_blocks)
  return features, {'flops': counter.per_image(images_BxHxWx3.shape[0]),
                    **aux}


def classify_regions(model: base.AdaptiveResNet, regions_RxhxwxC: jax.Array,
                     num_feature_blocks: int = DEFAULT_FEATURE_BLOCKS
                     ) -> tuple[jax.Array, dict]:
  """The blocks after the extractor's on region features: `(out, aux)`.

  `regions_RxhxwxC` are crops of `extract_features`' map (e.g.
  `roi.crop_and_resize`); `aux` as `extract_features`', per region.
  """
  _check_split(model, num_feature_blocks)
  counter = flops_lib.FlopCounter()
  out, aux = model.run_blocks(regions_RxhxwxC, counter, num_feature_blocks)
  return out, {'flops': counter.per_image(regions_RxhxwxC.shape[0]), **aux}
