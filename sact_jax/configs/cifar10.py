r"""CIFAR-10 ResNets of the reference (docs/method.md, section 3).

  python -m experiments.train --config=sact_jax/configs/cifar10.py:sact_32 \
      --workdir=/tmp/cifar10_sact_32

Variants: `<model_type>_<depth>` with model_type in vanilla/act/sact and
depth in 20/32/56/110 (default `sact_32`, the released SACT model), plus
`,smoke` (or `_smoke`) for a few steps of a tiny model. The schedule is the
reference's "longer" one: batch 128, momentum 0.9, lr 0.1, x0.1 after 60k,
75k and 90k steps, 100k steps, L2 2e-4. Needs `cifar10` prepared as
array_record files in the tfds data_dir (the error says how).
"""

import ml_collections

from sact_jax import configs

DEPTHS = {20: (3, 3, 3), 32: (5, 5, 5), 56: (9, 9, 9), 110: (18, 18, 18)}


def _tau(model_type: str, depth: int) -> float:
  """Ponder cost weights of the reference's models (docs/method.md, 3).

  SACT ResNet-32 (released): 0.01; ACT ResNet-110 (released): 0.001; the
  reference README trains ACT and SACT ResNet-32 with 0.01, which is used
  for the other depths too.
  """
  if model_type == 'act' and depth == 110:
    return 0.001
  return 0.01


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10 config for the variant `arg` (see the module docstring)."""
  variant = configs.parse_variant(arg, ('smoke',), DEPTHS)
  model_type = variant['model_type'] or 'sact'
  depth = variant['depth'] or 32

  config = configs.base_config()
  # CIFAR-10 from tfds: 50k train / 10k test 32x32 images, 10 classes.
  config.dataset = 'cifar10'
  config.image_size = 32
  config.family = 'cifar'
  config.units = DEPTHS[depth]
  config.model_type = model_type
  config.num_classes = 10
  config.base_channels = 16
  config.eps = 0.01
  # Vanilla models have no ponder cost; the value is then unused.
  config.tau = _tau(model_type, depth)
  # slim.l2_regularizer(0.0002) on every conv of the reference model.
  config.weight_decay = 2e-4
  config.label_smoothing = 0.0
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.lr_boundaries = (60_000, 75_000, 90_000)
  config.lr_scales = (0.1, 0.01, 0.001)
  config.batch_size = 128
  # The reference evaluated with batches of 100; 500 divides 10k as well.
  config.eval_batch_size = 500
  config.num_train_steps = 100_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3

  if variant['smoke']:
    # Seconds, not days: a tiny model of the same family for a few steps.
    config.units = (1, 1, 1)
    config.base_channels = 4
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_train_steps = 4
    config.lr_boundaries = (2,)
    config.lr_scales = (0.1,)
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.num_eval_examples = 32
    config.num_ponder_maps = 2
  return config
