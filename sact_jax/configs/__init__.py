"""Training configs: one `get_config(arg=None)` per file, shared fields here.

Config files are loaded by path
(`--config=sact_jax/configs/cifar10.py:sact_110`) and every field can be
overridden on the command line
(`--config.tau=0.005`). `base_config()` defines every field, with its
meaning, so that all files share one schema; each file changes the values.

Variants (the part after ':') are tokens separated by ',' or '_' in any
order: a model type (`vanilla`, `act`, `sact`), a depth (`110`), and flags
such as `smoke` (a few steps of a tiny model, for a quick end-to-end run)
or `finetune` (ImageNet: start from a vanilla checkpoint).
"""

from typing import Iterable

import ml_collections

from sact_jax import blocks as blocks_lib
from sact_jax.detection import faster_rcnn

MODEL_TYPES = blocks_lib.MODEL_TYPES

# Placeholder of a field that the command line must set; validation reports
# it as a missing path, so the message says what to pass.
REQUIRED_INIT_FROM = '<set --config.init_from=VANILLA_MODEL_CHECKPOINT_DIR>'


def base_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, with neutral defaults."""
  config = ml_collections.ConfigDict()

  # --- Data ---
  # tfds name of the dataset, optionally with a builder config
  # ('sact_shapes/tiny'): one of sact_jax.data.SUPPORTED_DATASETS.
  config.dataset = 'sact_shapes'
  # tfds data_dir; None for the tfds default (~/tensorflow_datasets).
  config.data_dir = ml_collections.config_dict.placeholder(str)
  # Side of the (square) input images; must match the dataset (32 for
  # CIFAR-style data; any size for ImageNet, which is resized to it).
  config.image_size = 32
  # Preprocessing worker processes per host (0: threads in this process).
  config.data_workers = 0

  # --- Model (see sact_jax.models.ModelSpec) ---
  # 'cifar' (pre-activation basic units) or 'imagenet' (bottleneck units).
  config.family = 'cifar'
  # Residual units per block, e.g. (5, 5, 5) = CIFAR ResNet-32.
  config.units = (5, 5, 5)
  # 'vanilla', 'act' (one halting score per image) or 'sact' (per position).
  config.model_type = 'sact'
  # Size of the logits: the dataset's classes, or one more for the
  # reference's ImageNet models (background class 0; labels are shifted).
  config.num_classes = 10
  # Width of the first block (CIFAR) or of its bottleneck (ImageNet); None
  # for the family default (16 / 64).
  config.base_channels = ml_collections.config_dict.placeholder(int)
  # Halting threshold is 1 - eps; in (0, 1).
  config.eps = 0.01
  # Rematerialise each scanned residual unit in the backward pass (saves
  # activation memory for deep models at the cost of recomputation): True,
  # or 'convs' to keep the convolutions' outputs; None: on the CPU only,
  # where it also saves time (blocks.Block).
  config.remat = ml_collections.config_dict.placeholder(object)
  # Unroll the scan over each block's units 2..L: faster steps for shallow
  # blocks on CPU (no while loop), but compile time grows with depth.
  config.unroll = False

  # --- Loss and optimizer ---
  # Weight of the ponder cost in the loss (ignored by vanilla models); >= 0.
  config.tau = 0.01
  # Weight decay as the reference applies it: weight_decay * sum(w^2) / 2
  # over conv and dense kernels (slim's l2_regularizer; no BN, no biases)
  # added to the loss.
  config.weight_decay = 2e-4
  # Label smoothing of the cross-entropy, in [0, 1).
  config.label_smoothing = 0.0
  # SGD momentum (TF MomentumOptimizer / optax.sgd: v = m v + g).
  config.momentum = 0.9
  # Peak learning rate (the rate before the first boundary for 'piecewise').
  config.learning_rate = 0.1
  # 'piecewise' (the reference's): after step lr_boundaries[i] the rate is
  # learning_rate * lr_scales[i] (TF piecewise_constant: the boundary step
  # itself still uses the previous rate). 'cosine': linear warm-up from 0 over
  # warmup_steps, then cosine decay to 0 at num_train_steps; no step at which
  # the rate drops, so the result does not depend on when training takes off.
  # 'staircase' (the reference's ImageNet schedule, TF exponential_decay with
  # staircase=True): the rate of step s is
  # learning_rate * lr_decay_factor ** (s // lr_decay_steps).
  config.lr_schedule = 'piecewise'
  # Increasing; same lengths ('piecewise' only).
  config.lr_boundaries = ()
  config.lr_scales = ()
  # Steps between decays, >= 1, and the factor of each ('staircase' only).
  config.lr_decay_steps = ml_collections.config_dict.placeholder(int)
  config.lr_decay_factor = 0.1
  # Steps of linear warm-up ('cosine' only); < num_train_steps.
  config.warmup_steps = 0

  # Exponential moving average of the model variables (as TF's
  # ExponentialMovingAverage with the step as num_updates; the original
  # evaluates its ImageNet models with 0.9999); None: off. When set, the
  # averages are checkpointed and are what evaluation, pictures and restored
  # models use.
  config.ema_decay = ml_collections.config_dict.placeholder(float)

  # --- Run ---
  # Global batch size (all hosts and devices together); the device count
  # must divide it.
  config.batch_size = 128
  # Global batch size of the evaluation after training.
  config.eval_batch_size = 500
  # Number of optimizer steps.
  config.num_train_steps = 100_000
  # Seed of the initialisation, the shuffling and the augmentation.
  config.seed = 0
  # Steps between metric summaries and console lines.
  config.log_every_steps = 100
  # Steps between checkpoints (also saved at the end and on SIGTERM).
  config.checkpoint_every_steps = 1000
  # Number of most recent checkpoints kept.
  config.keep_checkpoints = 3
  # Model checkpoint directory (sact_jax.checkpoint.save_model format) to
  # start from, e.g. a vanilla model for fine-tuning ACT/SACT: everything is
  # restored but the halting heads. None: random initialisation.
  config.init_from = ml_collections.config_dict.placeholder(str)
  # Steps between evaluations on the eval split during training (top-1,
  # FLOPs, ponder cost, inside/outside as `eval/...` summaries and a console
  # line); 0: only after training.
  config.eval_every_steps = 0
  # Examples of the eval split used by every evaluation; None for the whole
  # split.
  config.num_eval_examples = ml_collections.config_dict.placeholder(int)
  # Ponder-map pictures written after training (SACT models).
  config.num_ponder_maps = 16
  # Ponder maps drawn into TensorBoard at each evaluation during training
  # (SACT models); 0: none.
  config.num_eval_ponder_maps = 4
  return config


def parse_variant(arg: str | None, known_flags: Iterable[str] = ('smoke',),
                  depths: Iterable[int] = ()) -> dict:
  """Splits a variant string like 'sact_110,smoke' into its parts.

  Args:
    arg: the text after ':' in `--config=file.py:arg`, or None.
    known_flags: flag tokens this file understands.
    depths: depth presets this file understands.

  Returns:
    Dict with `model_type` (None if absent), `depth` (None if absent) and
    one bool per known flag.

  Raises:
    ValueError: an unknown token, or two model types or depths.
  """
  known_flags, depths = tuple(known_flags), tuple(depths)
  parts = {'model_type': None, 'depth': None}
  parts.update({flag: False for flag in known_flags})
  tokens = [t for t in (arg or '').replace(',', '_').split('_') if t]
  for token in tokens:
    if token in MODEL_TYPES and parts['model_type'] is None:
      parts['model_type'] = token
    elif token.isdigit() and int(token) in depths and parts['depth'] is None:
      parts['depth'] = int(token)
    elif token in known_flags and not parts[token]:
      parts[token] = True
    else:
      raise ValueError(
          f'Unknown config variant {arg!r} (token {token!r}): use '
          f'<model_type>_<depth> with model_type in {MODEL_TYPES}'
          + (f', depth in {depths}' if depths else '')
          + (f', optionally with {", ".join(known_flags)}' if known_flags
             else '') + '.')
  return parts


def detection_config() -> ml_collections.ConfigDict:
  """`base_config()` plus the fields of detection training.

  The classification fields keep their meaning: `family`/`units`/
  `model_type`/`num_classes`/`base_channels`/`eps` describe the backbone
  classifier (whose logits the detector does not use), the optimizer and
  run fields are the same. `dataset` is a detection dataset
  (`sact_jax.data.detection.DETECTION_DATASETS`).
  """
  config = base_config()
  config.dataset = 'sact_detection'
  config.family = 'imagenet'
  # Side of the square model input; None: the dataset's default.
  config.image_size = ml_collections.config_dict.placeholder(int)
  # Ground-truth boxes per image (padding); None: the dataset's default.
  config.max_boxes = ml_collections.config_dict.placeholder(int)
  # Object classes of the dataset (no background).
  config.num_detection_classes = 6
  # Faster R-CNN settings: the fields of
  # sact_jax.detection.faster_rcnn.DetectorConfig, at its defaults (the TF
  # Object Detection API's) unless a config file changes them.
  config.detector = ml_collections.ConfigDict(
      faster_rcnn.DetectorConfig.config_defaults())
  # A classification model checkpoint (sact_jax.checkpoint.save_model) or
  # training workdir whose backbone weights start the detector (halting
  # heads too when it has them); None: random initialisation.
  config.init_from = ml_collections.config_dict.placeholder(str)
  # Training steps over which the ponder cost's weight grows linearly from
  # 0 to tau (0: tau from the first step).
  config.tau_warmup_steps = 0
  # Evaluation: COCO metrics of the eval split every eval_every_steps and
  # after training, and a picture of this many images' detections and
  # ponder maps.
  config.num_detection_pictures = 8
  return config
