r"""Faster R-CNN with a (S)ACT ResNet on the generated `sact_detection` data.

  python -m experiments.train_detection \
      --config=sact_jax/configs/detection.py:sact \
      --config.init_from=/tmp/shapes_classifier --workdir=/tmp/detection

The SACT paper's detection experiment (section 5.2) at the scale of a
2-core CPU: 96x96 images with 1-4 objects of the 6 `sact_shapes` classes on
clutter (sact_jax/data/detection_shapes.py); an ImageNet-style bottleneck
ResNet whose stem and blocks 1-3 extract a stride-16 feature map (6x6) and
whose block 4 classifies each region. Variants: `vanilla`, `act` or `sact`
(default), optionally `,smoke` (a few steps on the tiny builder config).
`init_from` (optional) is a classifier of the same architecture trained on
`sact_shapes` (`sact_jax/configs/detection_pretrain.py`), as the paper
fine-tuned its detectors from ImageNet classifiers. Start SACT detectors
from the *vanilla* classifier: its fresh halting heads halt nowhere at
first and learn where detection can stop early, while a SACT classifier's
halting (made for classification) barely moves in fine-tuning (BUILD.md,
"Object detection").
"""

import ml_collections

from sact_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The embedded-data detection config of variant `arg`."""
  variant = configs.parse_variant(arg, ('smoke',))
  if variant['depth'] is not None:
    raise ValueError(f'Unknown config variant {arg!r}: detection.py has no '
                     'depths; set --config.units.')
  config = configs.detection_config()
  config.dataset = 'sact_detection'
  config.num_detection_classes = 6
  # The backbone: units per block 2-2-3-1 at bottleneck width 16 (block
  # widths 64/128/256/512). The detector uses blocks 1-3 (stride 16) and
  # block 4 on each region; the logits of its 6 sact_shapes classes only
  # serve the pretraining.
  config.units = (2, 2, 3, 1)
  config.model_type = variant['model_type'] or 'sact'
  config.num_classes = 6
  config.base_channels = 16
  config.eps = 0.01
  config.tau = 0.01
  # The ponder cost ramps up over the first third of the fine-tuning: at
  # tau 0.05 this kept 0.586 mAP at 74% of the extractor FLOPs, against
  # 0.465 at 71% without (BUILD.md, "Object detection").
  config.tau_warmup_steps = 1000

  detector = config.detector
  # Objects are 10-32 pixels across: anchors of 16, 32 and 64 pixels
  # (base 32 at scales 0.5-2), three aspect ratios, on the 6x6 map.
  detector.anchor_base_size = 32.0
  detector.anchor_scales = (0.5, 1.0, 2.0)
  detector.anchor_ratios = (0.5, 1.0, 2.0)
  detector.rpn_channels = 128
  # The 6x6 map is cropped to 8x8 (max-pooled to 4x4), not 14x14: the
  # crops of COCO-sized maps, which are 7x larger, would only interpolate.
  detector.crop_size = 8
  # 324 anchors per image: a smaller RPN minibatch than COCO's 256 of
  # ~20,000, and fewer proposals and regions for at most 4 objects.
  detector.rpn_batch_size = 64
  detector.pre_nms_top_k = 324
  detector.train_proposals = 32
  detector.eval_proposals = 32
  detector.box_batch_size = 16
  detector.max_detections_per_class = 8
  detector.max_detections = 16

  config.weight_decay = 1e-4
  config.momentum = 0.9
  config.learning_rate = 0.02
  config.lr_schedule = 'cosine'
  config.warmup_steps = 100
  config.lr_boundaries = ()
  config.lr_scales = ()
  config.batch_size = 16
  config.eval_batch_size = 50
  # The vanilla detector reached mAP@.5 0.81 in 2000 steps from a 2000-step
  # classifier; 3000 steps (about 12 min on 2 cores) leave a margin.
  config.num_train_steps = 3000
  config.log_every_steps = 50
  config.eval_every_steps = 1500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.num_detection_pictures = 8

  if variant['smoke']:
    config.dataset = 'sact_detection/tiny'
    config.units = (1, 1, 2, 1)
    config.base_channels = 4
    detector.rpn_channels = 16
    config.batch_size = 4
    config.eval_batch_size = 8
    config.num_train_steps = 4
    config.warmup_steps = 1
    config.tau_warmup_steps = 0
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.num_detection_pictures = 2
  return config
