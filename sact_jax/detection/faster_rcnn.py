"""Faster R-CNN over a (S)ACT ResNet, in the SACT paper's arrangement.

The paper (section 5.2) used the TF Object Detection API's Faster R-CNN
with ResNet-101: the stem and blocks 1-3 extract a stride-16 feature map;
a region proposal network (RPN: a 3x3 conv, then per anchor an objectness
logit and box codes) proposes boxes, kept by NMS; each proposal's features
are cropped bilinearly to 14x14 and max-pooled to 7x7, block 4 and a global
average pool turn them into a vector, and two dense layers give class
logits (background + K classes) and K class-specific box codes. Both stages
train jointly from sampled targets (`targets.py`, `losses.py`); detections
are the per-class NMS of the decoded boxes (`postprocess.py`).

Everything has static shapes (fixed numbers of anchors, proposals, sampled
regions and detections, with validity masks), so training and detection
are single jitted programs, batched with `vmap` and data parallel like
classification. The extractor's ponder maps and FLOPs come from the
backbone (`backbone.py`), so SACT's FLOPs savings are counted as in
classification.
"""

import dataclasses
import functools
import math
import numbers
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from sact_jax import flops as flops_lib
from sact_jax import models
from sact_jax import units as units_lib
from sact_jax.detection import anchors as anchors_lib
from sact_jax.detection import backbone as backbone_lib
from sact_jax.detection import boxes as boxes_lib
from sact_jax.detection import losses as losses_lib
from sact_jax.detection import nms as nms_lib
from sact_jax.detection import postprocess
from sact_jax.detection import roi
from sact_jax.detection import targets as targets_lib
from sact_jax.layers import LayerFactory

# The ImageNet stem (7x7/2 conv, 3x3/2 max pool) and every block after the
# first halve the resolution.
_STEM_STRIDE = 4


def _is_real(value) -> bool:
  """A real number: not a bool, a string or an array."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


# DetectorConfig fields that a training config sets at its top level.
_TOP_LEVEL_FIELDS = frozenset(
    {'backbone', 'num_classes', 'tau', 'tau_warmup_steps'})


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """The static settings of a detector (hashable: jit's static argument).

  Defaults are the TF Object Detection API's Faster R-CNN ResNet-101 COCO
  config, which the SACT paper used, except where a comment says why.

  Attributes:
    backbone: the classification model whose blocks the detector uses;
      ImageNet family (bottleneck units, stride 16 after block 3).
    num_classes: object classes K (no background).
    feature_blocks: blocks of the extractor; the rest classify regions.
    anchor_base_size: anchor side at scale 1, aspect 1, in pixels.
    anchor_scales: anchor scales.
    anchor_ratios: anchor aspect ratios (width / height).
    rpn_channels: width of the RPN's 3x3 conv.
    rpn_batch_size: anchors sampled per image for the RPN loss.
    rpn_positive_fraction: at most this fraction of them positive.
    rpn_positive_iou: anchors at or above this IoU are objects...
    rpn_negative_iou: ... and below this, background.
    rpn_nms_iou: NMS threshold of the proposals.
    pre_nms_top_k: best-scoring anchors that enter the proposal NMS.
    train_proposals: proposals per image when training...
    eval_proposals: ... and when detecting.
    box_batch_size: regions sampled per image for the box classifier.
    box_positive_fraction: at most this fraction of them positive.
    box_positive_iou: regions at or above this IoU are their box's class.
    crop_size: side of the bilinear crops, max-pooled by 2.
    score_threshold: detections score above this.
    detection_nms_iou: per-class NMS threshold of the detections.
    max_detections_per_class: detections kept per class...
    max_detections: ... and in all, per image.
    loss_weights: of rpn_objectness, rpn_localization, box_classification,
      box_localization.
    tau: weight of the ponder cost (extractor and box classifier).
    tau_warmup_steps: the weight grows linearly from 0 to tau over this
      many training steps (0: tau from the start), so that the detector
      adapts to its task before halting, which barely moves once learned,
      settles where the ponder cost outweighs the detection loss.
  """
  backbone: models.ModelSpec
  num_classes: int
  feature_blocks: int = backbone_lib.DEFAULT_FEATURE_BLOCKS
  anchor_base_size: float = 256.0
  anchor_scales: tuple[float, ...] = anchors_lib.DEFAULT_SCALES
  anchor_ratios: tuple[float, ...] = anchors_lib.DEFAULT_RATIOS
  rpn_channels: int = 512
  rpn_batch_size: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_positive_iou: float = 0.7
  rpn_negative_iou: float = 0.3
  rpn_nms_iou: float = 0.7
  pre_nms_top_k: int = 6000
  train_proposals: int = 300
  eval_proposals: int = 300
  box_batch_size: int = 64
  box_positive_fraction: float = 0.25
  box_positive_iou: float = 0.5
  crop_size: int = 14
  score_threshold: float = 0.0
  detection_nms_iou: float = 0.6
  max_detections_per_class: int = 100
  max_detections: int = 100
  loss_weights: tuple[float, float, float, float] = (1.0, 2.0, 1.0, 2.0)
  tau: float = 0.0
  tau_warmup_steps: int = 0

  def __post_init__(self):
    if not isinstance(self.backbone, models.ModelSpec):
      raise TypeError(
          'backbone must be a models.ModelSpec (ModelSpec.from_dict turns a '
          f'dict into one), got {type(self.backbone).__name__}.')
    if self.backbone.family != 'imagenet':
      raise ValueError(
          'A detector needs an ImageNet-family backbone (bottleneck units, '
          f'stride 16 after block 3), got family {self.backbone.family!r}.')
    # Floats or numeric strings would pass construction and fail deep in
    # JAX or Flax as shapes or indices.
    for name in ('num_classes', 'feature_blocks', 'rpn_channels',
                 'rpn_batch_size', 'pre_nms_top_k', 'train_proposals',
                 'eval_proposals', 'box_batch_size', 'crop_size',
                 'max_detections_per_class', 'max_detections'):
      models.positive_int(name, getattr(self, name))
    if not 1 <= self.feature_blocks < len(self.backbone.units):
      raise ValueError(
          f'feature_blocks must leave at least one of the backbone\'s '
          f'{len(self.backbone.units)} blocks for the box classifier, got '
          f'{self.feature_blocks}.')
    if self.crop_size % 2:
      raise ValueError(f'crop_size must be even (crops are max-pooled by 2), '
                       f'got {self.crop_size}.')
    # No anchors, or empty or flipped ones, would only show up as a head
    # with zero outputs or a loss without positives.
    if not (_is_real(self.anchor_base_size)
            and 0 < self.anchor_base_size < math.inf):
      raise ValueError(f'anchor_base_size must be > 0, got '
                       f'{self.anchor_base_size!r}.')
    for name in ('anchor_scales', 'anchor_ratios'):
      values = getattr(self, name)
      if not (isinstance(values, (tuple, list)) and values
              and all(_is_real(v) and 0 < v < math.inf for v in values)):
        raise ValueError(f'{name} must be a non-empty sequence of numbers '
                         f'> 0, got {values!r}.')
    # Out of range, these silently change training or detection: an IoU
    # never exceeds 1 (NMS at 1.5 suppresses nothing), softmax scores
    # never reach 1, a fraction of 25 is a percentage.
    for name, upper in (('rpn_positive_fraction', '1]'),
                        ('box_positive_fraction', '1]'),
                        ('rpn_positive_iou', '1]'), ('rpn_negative_iou', '1]'),
                        ('rpn_nms_iou', '1]'), ('box_positive_iou', '1]'),
                        ('detection_nms_iou', '1]'),
                        ('score_threshold', '1)')):
      value = getattr(self, name)
      if not (_is_real(value) and 0 <= value <= 1
              and (upper == '1]' or value < 1)):
        raise ValueError(f'{name} must lie in [0, {upper}, got {value!r}.')
    if not self.rpn_negative_iou <= self.rpn_positive_iou:
      raise ValueError('Need 0 <= rpn_negative_iou <= rpn_positive_iou <= 1, '
                       f'got {self.rpn_negative_iou} and '
                       f'{self.rpn_positive_iou}.')
    weights = self.loss_weights
    if not (isinstance(weights, (tuple, list)) and len(weights) == 4
            and all(_is_real(w) and 0 <= w < math.inf for w in weights)):
      raise ValueError(
          'loss_weights needs 4 finite weights >= 0 (rpn_objectness, '
          'rpn_localization, box_classification, box_localization), got '
          f'{weights!r}.')
    if not (_is_real(self.tau) and 0 <= self.tau < math.inf):
      raise ValueError(f'tau must be a finite number >= 0, got {self.tau!r}.')
    if not models.is_integer(self.tau_warmup_steps) or (
        self.tau_warmup_steps < 0):
      raise ValueError(f'tau_warmup_steps must be an integer >= 0, got '
                       f'{self.tau_warmup_steps!r}.')

  @classmethod
  def config_defaults(cls) -> dict[str, Any]:
    """The defaults of the fields a training config's `detector` holds.

    Every field but those the config states at its top level (the backbone,
    `num_detection_classes`, `tau` and `tau_warmup_steps`), so that each can
    be overridden on the command line (`--config.detector.rpn_nms_iou=0.6`).
    """
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in _TOP_LEVEL_FIELDS}

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict
                  ) -> 'DetectorConfig':
    """The detector of a detection training config (`configs/detection.py`)."""
    spec = models.ModelSpec.from_config(config)
    fields = {f.name for f in dataclasses.fields(cls)} - _TOP_LEVEL_FIELDS
    kwargs = {k: config.detector[k] for k in fields if k in config.detector}
    for k, v in kwargs.items():
      if isinstance(v, (list, tuple)):
        kwargs[k] = tuple(float(x) for x in v)
    return cls(backbone=spec, num_classes=config.num_detection_classes,
               tau=config.tau,
               tau_warmup_steps=config.tau_warmup_steps, **kwargs)

  def tau_at(self, step: jax.Array) -> jax.Array:
    """The ponder cost's weight after `step` updates (the warm-up ramp)."""
    if not self.tau_warmup_steps:
      return jnp.asarray(self.tau, jnp.float32)
    ramp = jnp.minimum(1.0, step / self.tau_warmup_steps)
    return self.tau * ramp.astype(jnp.float32)

  @property
  def stride(self) -> int:
    """Pixels per feature-map position."""
    return _STEM_STRIDE * 2**(self.feature_blocks - 1)

  @property
  def num_anchors(self) -> int:
    """Anchors per feature-map position."""
    return len(self.anchor_scales) * len(self.anchor_ratios)

  def feature_size(self, image_size: int) -> int:
    """Side of the feature map of an image (SAME padding rounds up)."""
    return math.ceil(image_size / self.stride)

  def anchors(self, image_size: int) -> jax.Array:
    """The anchors `[N, 4]` (pixels) of square images of this side."""
    side = self.feature_size(image_size)
    return anchors_lib.grid_anchors(
        (side, side), stride=self.stride, base_size=self.anchor_base_size,
        scales=self.anchor_scales, aspect_ratios=self.anchor_ratios,
        offset=self.stride / 2)


def _block_width(block) -> int:
  unit = block.first
  return unit.depth if isinstance(unit, units_lib.BottleneckUnit) else (
      unit.cout)


class FasterRCNN(nnx.Module):
  """The detector's weights: backbone, RPN head and box heads.

  The forward passes are the functions below (`loss_and_metrics`,
  `detect`), which take the module and a `DetectorConfig`.
  """

  def __init__(self, config: DetectorConfig, *, rngs: nnx.Rngs,
               **backbone_options):
    self.backbone = config.backbone.create(rngs, **backbone_options)
    factory = LayerFactory(bn_momentum=0.997, bn_epsilon=1e-5,
                           fast_conv_backward=backbone_options.get(
                               'fast_conv_backward'))
    width = _block_width(self.backbone.blocks[config.feature_blocks - 1])
    out_width = _block_width(self.backbone.blocks[-1])
    anchors = config.num_anchors
    self.rpn_conv = factory.conv(width, config.rpn_channels, 3,
                                 use_bias=True, rngs=rngs)
    self.rpn_objectness = factory.conv(config.rpn_channels, anchors, 1,
                                       use_bias=True, rngs=rngs)
    self.rpn_box_codes = factory.conv(config.rpn_channels, 4 * anchors, 1,
                                      use_bias=True, rngs=rngs)
    self.class_logits = factory.dense(out_width, config.num_classes + 1,
                                      rngs=rngs)
    self.box_codes = factory.dense(out_width, 4 * config.num_classes,
                                   rngs=rngs)


def rpn(model: FasterRCNN, features_Bxhxwxc: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
  """Objectness logits `[B, N]` and box codes `[B, N, 4]` per anchor."""
  x = jax.nn.relu(model.rpn_conv(features_Bxhxwxc))
  batch = x.shape[0]
  return (model.rpn_objectness(x).reshape(batch, -1),
          model.rpn_box_codes(x).reshape(batch, -1, 4))


def propose(objectness_N: jax.Array, codes_Nx4: jax.Array,
            anchors_Nx4: jax.Array, image_size: int, num_proposals: int,
            config: DetectorConfig) -> tuple[jax.Array, jax.Array]:
  """One image's proposals `[P, 4]` (pixels, clipped) and validity `[P]`.

  The `pre_nms_top_k` best anchors are decoded and clipped; empty boxes are
  dropped; NMS keeps up to P of the rest.
  """
  top = min(config.pre_nms_top_k, objectness_N.shape[0])
  scores_T, index_T = jax.lax.top_k(objectness_N, top)
  boxes_Tx4 = boxes_lib.clip(
      boxes_lib.decode(codes_Nx4[index_T], anchors_Nx4[index_T]),
      image_size, image_size)
  scores_T = jnp.where(boxes_lib.area(boxes_Tx4) > 0, scores_T, -jnp.inf)
  keep_P, valid_P = nms_lib.nms(boxes_Tx4, scores_T, num_proposals,
                                iou_threshold=config.rpn_nms_iou)
  return boxes_Tx4[keep_P], valid_P


def classify_boxes(model: FasterRCNN, features_Bxhxwxc: jax.Array,
                   boxes_BxRx4: jax.Array, image_size: int,
                   config: DetectorConfig
                   ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """The box classifier on regions (pixels) of each image's feature map.

  Returns:
    Class logits `[B, R, K + 1]` (0 = background), class-specific box codes
    `[B, R, K, 4]`, and the last blocks' aux over the `B * R` regions.
  """
  batch, regions = boxes_BxRx4.shape[:2]
  normalised = jax.lax.stop_gradient(boxes_BxRx4) / image_size
  size = config.crop_size
  crops = jax.vmap(roi.crop_and_resize, (0, 0, None))(
      features_Bxhxwxc, normalised, (size, size))
  crops = crops.reshape(batch * regions, size, size, crops.shape[-1])
  crops = nnx.max_pool(crops, (2, 2), strides=(2, 2))
  x, aux = backbone_lib.classify_regions(model.backbone, crops,
                                         config.feature_blocks)
  pooled = jnp.mean(jax.nn.relu(model.backbone.postnorm(x)), axis=(1, 2))
  logits = model.class_logits(pooled).reshape(batch, regions, -1)
  codes = model.box_codes(pooled).reshape(batch, regions, -1, 4)
  return logits, codes, aux


def _gt_in_pixels(batch: dict[str, jax.Array], image_size: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ground-truth boxes `[B, M, 4]` in pixels, labels, and which count."""
  boxes_BxMx4 = batch['boxes'] * image_size
  labels_BxM = batch['labels']
  valid_BxM = (labels_BxM >= 0) & (boxes_lib.area(boxes_BxMx4) > 0)
  if 'crowd' in batch:
    valid_BxM &= ~batch['crowd']
  return boxes_BxMx4, labels_BxM, valid_BxM


def _box_targets(proposals_Px4, proposals_valid_P, gt_boxes_Mx4, gt_labels_M,
                 gt_valid_M, key, config: DetectorConfig):
  """One image's sampled regions: boxes, classes, target codes, sampled.

  The ground-truth boxes join the proposals as candidates (so that the box
  classifier sees positives from the first step), as in the TF Object
  Detection API.
  """
  candidates = jnp.concatenate([proposals_Px4, gt_boxes_Mx4])
  candidates_valid = jnp.concatenate([proposals_valid_P, gt_valid_M])
  matched, labels = targets_lib.match(
      candidates, gt_boxes_Mx4, gt_valid_M,
      positive_iou=config.box_positive_iou,
      negative_iou=config.box_positive_iou)
  labels = jnp.where(candidates_valid, labels, targets_lib.IGNORED)
  selected = targets_lib.sample(
      labels, key, batch_size=config.box_batch_size,
      positive_fraction=config.box_positive_fraction)
  # The selected candidates first (at most box_batch_size of them).
  order = jnp.argsort(~selected, stable=True)[:config.box_batch_size]
  boxes_Rx4 = candidates[order]
  positive_R = labels[order] == targets_lib.POSITIVE
  classes_R = jnp.where(positive_R, gt_labels_M[matched[order]] + 1, 0)
  codes_Rx4 = boxes_lib.encode(gt_boxes_Mx4[matched[order]], boxes_Rx4)
  return boxes_Rx4, classes_R, codes_Rx4, selected[order]


def loss_and_metrics(model: FasterRCNN, batch: dict[str, jax.Array],
                     key: jax.Array, config: DetectorConfig,
                     step: jax.Array | int | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The detection loss of a batch (without weight decay) and its parts.

  Args:
    model: the detector, training mode.
    batch: `image` `[B, S, S, 3]`, `boxes` `[B, M, 4]` (normalised, ymin
      xmin ymax xmax), `labels` `[B, M]` (0-based, -1 padding), optionally
      `crowd` `[B, M]` (never matched).
    key: randomness of the minibatch sampling.
    config: the detector's settings.
    step: training step, for `config.tau_at`; None: `config.tau`.

  Returns:
    `(loss, metrics)`: metrics has each loss term, `ponder_loss`, `tau`,
    `flops` (`[B]`, the extractor's) and `box_classifier_flops` (per
    region).
  """
  images = batch['image']
  size = images.shape[1]
  gt_boxes, gt_labels, gt_valid = _gt_in_pixels(batch, size)
  features, extractor_aux = backbone_lib.extract_features(
      model.backbone, images, config.feature_blocks)
  objectness, codes = rpn(model, features)
  anchors = config.anchors(size)
  if anchors.shape[0] != objectness.shape[1]:
    raise ValueError(f'Images of {size}x{size} give {objectness.shape[1]} '
                     f'anchor outputs, expected {anchors.shape[0]}.')
  batch_size = images.shape[0]
  rpn_key, box_key = jax.random.split(key)

  def rpn_targets(gt, valid, key):
    matched, labels = targets_lib.match(
        anchors, gt, valid, positive_iou=config.rpn_positive_iou,
        negative_iou=config.rpn_negative_iou, force_match=True)
    sampled = targets_lib.sample(
        labels, key, batch_size=config.rpn_batch_size,
        positive_fraction=config.rpn_positive_fraction)
    return (boxes_lib.encode(gt[matched], anchors),
            labels == targets_lib.POSITIVE, sampled)

  target_codes, positive, sampled = jax.vmap(rpn_targets)(
      gt_boxes, gt_valid, jax.random.split(rpn_key, batch_size))
  rpn_losses = losses_lib.rpn_loss(objectness, codes, target_codes, positive,
                                   sampled)

  proposals, proposals_valid = jax.vmap(
      lambda o, c: propose(o, c, anchors, size, config.train_proposals,
                           config))(jax.lax.stop_gradient(objectness),
                                    jax.lax.stop_gradient(codes))
  regions, classes, region_codes, region_sampled = jax.vmap(
      lambda p, v, g, l, gv, k: _box_targets(p, v, g, l, gv, k, config))(
          proposals, proposals_valid, gt_boxes, gt_labels, gt_valid,
          jax.random.split(box_key, batch_size))
  logits, box_codes, region_aux = classify_boxes(model, features, regions,
                                                 size, config)
  box_losses = losses_lib.box_classifier_loss(
      logits, box_codes, classes, region_codes, region_sampled)

  terms = {**rpn_losses, **box_losses}
  detection_loss = sum(w * terms[k] for w, k in zip(
      config.loss_weights, ('rpn_objectness', 'rpn_localization',
                            'box_classification', 'box_localization')))
  ponder_loss = extractor_aux['ponder_loss'] + region_aux['ponder_loss']
  tau = (jnp.asarray(config.tau, jnp.float32) if step is None
         else config.tau_at(step))
  loss = detection_loss + tau * ponder_loss
  metrics = {**terms, 'detection_loss': detection_loss,
             'ponder_loss': ponder_loss, 'tau': tau,
             'flops': extractor_aux['flops'],
             'box_classifier_flops': jnp.mean(region_aux['flops']),
             'rpn_positives': jnp.mean(jnp.sum(positive & sampled, -1)),
             'box_positives': jnp.mean(jnp.sum(
                 (classes > 0) & region_sampled, -1))}
  for i, ponder_cost in enumerate(extractor_aux['ponder_cost']):
    metrics[f'ponder_cost/block_{i}'] = jnp.mean(ponder_cost)
  return loss, metrics


def detect(model: FasterRCNN, images_BxSxSx3: jax.Array,
           config: DetectorConfig
           ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Detections of a batch of square images, and the extractor's aux.

  Returns:
    `detections`: `boxes` `[B, D, 4]` (pixels, ymin xmin ymax xmax),
    `scores` `[B, D]`, `classes` `[B, D]` (0-based), `valid` `[B, D]`,
    best first, D = `max_detections`; and the extractor's aux (`flops`
    `[B]`, per-block `ponder_cost` and `num_units`, `ponder_loss`).
  """
  size = images_BxSxSx3.shape[1]
  features, aux = backbone_lib.extract_features(
      model.backbone, images_BxSxSx3, config.feature_blocks)
  objectness, codes = rpn(model, features)
  anchors = config.anchors(size)
  proposals, valid = jax.vmap(
      lambda o, c: propose(o, c, anchors, size, config.eval_proposals,
                           config))(objectness, codes)
  logits, box_codes, _ = classify_boxes(model, features, proposals, size,
                                        config)
  scores_BxRxK = jax.nn.softmax(logits, axis=-1)[..., 1:]
  boxes_BxRxKx4 = boxes_lib.clip(
      boxes_lib.decode(box_codes, proposals[:, :, None, :]), size, size)
  detections = jax.vmap(functools.partial(
      postprocess.per_class_nms, score_threshold=config.score_threshold,
      iou_threshold=config.detection_nms_iou,
      max_per_class=config.max_detections_per_class,
      max_total=config.max_detections))(boxes_BxRxKx4, scores_BxRxK, valid)
  return detections, aux


@functools.lru_cache(maxsize=None)
def vanilla_extractor_flops(config: DetectorConfig, image_size: int) -> int:
  """FLOPs per image of the vanilla twin's extractor at `image_size`.

  The denominator of the extractor's "% of vanilla" (the paper's table);
  cached: training logs it from the start and every evaluation reports it,
  and each call traces a model.
  """
  vanilla = dataclasses.replace(config.backbone, model_type='vanilla')
  return flops_lib.vanilla_flops(
      lambda: vanilla.create(nnx.Rngs(0)), (image_size, image_size, 3),
      apply=lambda model, images, counter: backbone_lib.extract_features(
          model, images, config.feature_blocks, counter=counter))


def create(config: DetectorConfig, seed: int = 0, **backbone_options
           ) -> FasterRCNN:
  """A freshly initialised detector."""
  return FasterRCNN(config, rngs=nnx.Rngs(seed), **backbone_options)
