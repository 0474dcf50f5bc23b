r"""Faster R-CNN ResNet-101 on COCO 2017, the SACT paper's detector (GPU).

  python -m experiments.train_detection \
      --config=sact_jax/configs/coco_detection.py:sact \
      --config.init_from=/ckpt/imagenet_sact_101 --config.tau=0.005 \
      --config.batch_size=16 --workdir=/runs/coco_sact_101

As the paper (section 5.2), which used the TF Object Detection API's
`faster_rcnn_resnet101_coco` config: the stem and blocks 1-3 of an
ImageNet ResNet-101 extract a stride-16 feature map; anchors of 256 px at
scales 0.25-2 and aspect ratios 0.5-2; 300 proposals (NMS 0.7); 14x14
crops max-pooled to 7x7; block 4 as the box classifier; 64 sampled regions
per image; per-class NMS 0.6, 100 detections. The detector starts from an
ImageNet classifier (`init_from`, halting heads included: fine-tune SACT
detectors from SACT classifiers, as the paper). Differences: images are
letterboxed to 640x640 (one static shape for jit; the API resizes to
600-1024 per image), synchronous batches of 16 (the API trained
asynchronously with batch 1) with the learning rate scaled as Detectron's
(0.02 for 16 images, cosine, 90k steps). Variants: `vanilla`, `act`,
`sact` (default); the paper's taus are 0.005 and 0.001.
Needs `coco/2017` prepared as array_record
(`tfds build coco/2017 --file_format=array_record`).
"""

import ml_collections

from sact_jax import configs
from sact_jax.models import imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The COCO detection config of variant `arg`."""
  variant = configs.parse_variant(arg, ())
  config = configs.detection_config()
  config.dataset = 'coco/2017'
  config.image_size = 640
  config.max_boxes = 100
  config.num_detection_classes = 80
  # The ImageNet ResNet-101 of the reference (1001 classes, background 0).
  config.units = imagenet.IMAGENET_PRESETS[101]
  config.model_type = variant['model_type'] or 'sact'
  config.num_classes = 1001
  config.base_channels = 64
  config.eps = 0.01
  config.tau = 0.005
  config.init_from = configs.REQUIRED_INIT_FROM
  # DetectorConfig's defaults are the TF Object Detection API's; only the
  # proposal NMS input is cut from 6000 (its IoU matrix would take 144 MB
  # per image) to 2000 anchors.
  config.detector.pre_nms_top_k = 2000
  config.weight_decay = 1e-4
  config.momentum = 0.9
  config.learning_rate = 0.02
  config.lr_schedule = 'cosine'
  config.warmup_steps = 500
  config.lr_boundaries = ()
  config.lr_scales = ()
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 90_000
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.data_workers = 8
  return config
