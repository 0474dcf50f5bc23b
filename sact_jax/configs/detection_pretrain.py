r"""The detectors' backbones as classifiers on `sact_shapes` (pretraining).

  python -m experiments.train \
      --config=sact_jax/configs/detection_pretrain.py:sact \
      --workdir=/tmp/shapes_classifier_sact

The SACT paper fine-tuned its detectors from ImageNet classifiers; here the
backbone of `configs/detection.py` (ImageNet-style bottleneck units 2-2-3-1
at width 16) first learns the 6 classes of the same objects in 32x32
`sact_shapes` images, and `--config.init_from=<that workdir>` starts a
detector from it. Variants: `vanilla`, `act`, `sact` (default), `,smoke`.
"""

import ml_collections

from sact_jax import configs
from sact_jax.configs import default
from sact_jax.configs import detection


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pretraining config of variant `arg`."""
  variant = configs.parse_variant(arg, ('smoke',))
  # The main job's data, schedule and cadence ...
  config = default.get_config('smoke' if variant['smoke'] else None)
  # ... with the detector's backbone.
  backbone = detection.get_config(arg)
  for field in ('family', 'units', 'model_type', 'num_classes',
                'base_channels', 'eps', 'tau'):
    config[field] = backbone[field]
  if not variant['smoke']:
    # The bottleneck network's 7x7/2 stem and max pool leave 8x8 maps of a
    # 32x32 image: it learns slower than the main job's CIFAR network
    # (79% top-1 after 2000 steps, still rising), so it trains 5000.
    config.num_train_steps = 5000
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    # Halting heads that already save computation, for the SACT detectors
    # to inherit (the paper's fine-tuning from SACT classifiers).
    config.tau = 0.02 if config.model_type != 'vanilla' else config.tau
  config.num_ponder_maps = 8
  return config
