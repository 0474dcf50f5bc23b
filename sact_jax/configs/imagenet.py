r"""ImageNet ResNet-v2 bottleneck models of the reference (docs/method.md, 3).

  # A vanilla ResNet-101 from scratch:
  python -m experiments.train \
      --config=sact_jax/configs/imagenet.py:vanilla_101 \
      --workdir=/tmp/imagenet_vanilla_101
  # SACT fine-tuned from it (as the reference trained its ACT/SACT models):
  python -m experiments.train \
      --config=sact_jax/configs/imagenet.py:sact_101_finetune \
      --config.init_from=/tmp/vanilla_101_model --workdir=/tmp/imagenet_sact

Variants: `<model_type>_<depth>[_finetune][,smoke]` with model_type in
vanilla/act/sact and depth 50/101 (default `sact_101`). `finetune` restores
everything but the new halting heads from `--config.init_from` (a model
checkpoint, e.g. converted from the reference's released vanilla ResNet-101
with `experiments.convert_checkpoint`, or exported from a training run).

Hyper-parameters: momentum 0.9, lr 0.05 decayed x0.1 every 30 epochs
(staircase, as the reference), label smoothing 0.1, weight decay 1e-4, 1001
classes (background class 0, as the released checkpoints), tau 0.005. The
reference ran asynchronous replicas with 32 images each; here one
synchronous global batch of 32 x 8 = 256 is the default (set
`--config.batch_size` to 32 x your device count; a larger batch usually
wants a larger learning rate). The reference did not fix a length; 90
epochs is used. The decay and training steps follow the batch size given
on the command line. As the reference, evaluation uses the moving
average of the weights (decay 0.9999, `ema_decay`). Needs `imagenet2012`
prepared as array_record files.
"""

import ml_collections

from sact_jax import configs

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Size of the imagenet2012 train split.
_NUM_TRAIN_EXAMPLES = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ImageNet config for the variant `arg` (see the module docstring)."""
  variant = configs.parse_variant(arg, ('smoke', 'finetune'), DEPTHS)
  model_type = variant['model_type'] or 'sact'
  depth = variant['depth'] or 101

  config = configs.base_config()
  config.dataset = 'imagenet2012'
  # Inception preprocessing (sact_jax/data/inception.py) to this side.
  config.image_size = 224
  # Preprocessing (JPEG decoding, resizing) is heavy: use worker processes.
  config.data_workers = 8
  config.family = 'imagenet'
  config.units = DEPTHS[depth]
  config.model_type = model_type
  # 1000 classes plus the background class 0 of the released checkpoints.
  config.num_classes = 1001
  config.base_channels = 64
  config.eps = 0.01
  # The released SACT ResNet-101 used 0.005; unused by vanilla models.
  config.tau = 0.005
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  config.momentum = 0.9
  config.learning_rate = 0.05
  # Global batch: 32 per replica x 8 replicas.
  config.batch_size = 256
  config.eval_batch_size = 256
  # Decay x0.1 every 30 epochs, for 90 epochs: as the reference's
  # exponential_decay(staircase=True) with decay_steps int(examples / batch
  # * 30). Computed from whatever batch_size is in the end, so that
  # --config.batch_size=64 still decays every 30 epochs.
  batch_size = config.get_ref('batch_size')
  config.lr_schedule = 'staircase'
  config.lr_decay_steps = (30 * _NUM_TRAIN_EXAMPLES) // batch_size
  config.lr_decay_factor = 0.1
  config.num_train_steps = (90 * _NUM_TRAIN_EXAMPLES) // batch_size
  # The reference's imagenet_eval.py restores these averages.
  config.ema_decay = 0.9999
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 3
  # Activations of 100+ units at 224x224 do not fit otherwise on most GPUs;
  # None: the backend's default (blocks.Block).
  config.remat = True if depth > 50 else None
  if variant['finetune']:
    config.init_from = configs.REQUIRED_INIT_FROM

  if variant['smoke']:
    # A tiny bottleneck network on small crops for a few steps.
    config.units = (1, 1, 1, 1)
    config.base_channels = 4
    config.image_size = 64
    config.data_workers = 0
    config.remat = False
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 4
    config.lr_decay_steps = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.num_eval_examples = 16
    config.num_ponder_maps = 2
  return config
