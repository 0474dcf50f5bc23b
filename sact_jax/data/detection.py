"""Object-detection input pipelines: tfds array_record sources read by grain.

`make_detection_dataset` returns a grain dataset of dict batches of numpy
arrays, built like `pipeline.make_dataset` (same sharding, shuffling,
seeding, batching and iterator state), for:

* `sact_detection` (generated locally, see `detection_shapes.py`): images as
  stored, per-image standardised as `sact_shapes` (so that classifiers
  trained on `sact_shapes` transfer), with the mask of all objects.
* `coco/2017`: each image resized, keeping its aspect ratio, so that its
  longer side is `image_size` (default 640), then zero-padded at the bottom
  and right to a square, and scaled to [-1, 1] as ImageNet.

Boxes are (ymin, xmin, ymax, xmax) divided by the side of the square model
input, so they are in its frame, padding included. Training flips each image
(and its boxes and mask) horizontally with probability 1/2, as a function of
(seed, batch position).
"""

# The pipeline's private helpers are shared with this sibling module.
# pylint: disable=protected-access

import dataclasses
import functools

import grain
import numpy as np

from sact_jax.data import detection_shapes
from sact_jax.data import pipeline

DETECTION_DATASETS = ('sact_detection', 'coco/2017')


@dataclasses.dataclass(frozen=True)
class DetectionInfo:
  """What a detector and its training loop need to know about a dataset.

  Attributes:
    num_classes: number of object classes (no background class).
    class_names: name of each class.
    image_size: default side of the square model input.
    max_boxes: default number of box rows per image (padding included).
    num_train_examples: size of `train_split`.
    num_eval_examples: size of `eval_split`.
    train_split: tfds split to train on.
    eval_split: tfds split to evaluate on.
  """

  num_classes: int
  class_names: tuple[str, ...]
  image_size: int
  max_boxes: int
  num_train_examples: int
  num_eval_examples: int
  train_split: str
  eval_split: str


# The names of tfds's `coco/2017` labels 0..79 (COCO category ids 1..90,
# less the 10 unused ones), which tfds only knows once the data is prepared.
_COCO_CLASS_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag',
    'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
    'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot',
    'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush')
_COCO_INFO = DetectionInfo(
    num_classes=len(_COCO_CLASS_NAMES), class_names=_COCO_CLASS_NAMES,
    image_size=640, max_boxes=100, num_train_examples=118_287,
    num_eval_examples=5_000, train_split='train', eval_split='validation')


def detection_info(name: str) -> DetectionInfo:
  """Returns the static metadata of `name` (e.g. 'sact_detection/tiny').

  Raises:
    ValueError: `name` is not a dataset of `DETECTION_DATASETS` (with one of
      its configs, for `sact_detection`).
  """
  base, _, config = name.partition('/')
  if base == 'sact_detection':
    configs = detection_shapes.SactDetection.builder_configs
    if (config or 'default') not in configs:
      raise ValueError(f'Unknown config {name!r}; sact_detection configs: '
                       f'{", ".join(configs)}.')
    builder_config = configs[config or 'default']
    return DetectionInfo(
        num_classes=detection_shapes.NUM_CLASSES,
        class_names=detection_shapes.CLASS_NAMES,
        image_size=builder_config.image_size,
        max_boxes=detection_shapes.MAX_OBJECTS,
        num_train_examples=builder_config.num_train,
        num_eval_examples=builder_config.num_test, train_split='train',
        eval_split='test')
  if name == 'coco/2017':
    return _COCO_INFO
  raise ValueError(f'Unknown detection dataset {name!r}; supported: '
                   f'{", ".join(DETECTION_DATASETS)}.')


def check_image_size(name: str, image_size: int | None) -> int:
  """The model input side for `name`: `image_size`, or the dataset's own.

  Raises:
    ValueError: a size `name` cannot have: `sact_detection` is stored at
      one size (None stands for it), the others are resized to any.
  """
  info = detection_info(name)
  if name.partition('/')[0] == 'sact_detection' and image_size not in (
      None, info.image_size):
    raise ValueError(f'image_size={image_size} does not match {name}, whose '
                     f'images are {info.image_size}x{info.image_size}; '
                     'leave it unset.')
  return info.image_size if image_size is None else int(image_size)


def make_detection_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    data_dir: str | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    image_size: int | None = None,
    max_boxes: int | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
  """Returns a grain dataset of preprocessed detection batches of one shard.

  Batches are dicts of numpy arrays, with S = `image_size` and M =
  `max_boxes`: `image` float32 [B, S, S, 3]; `boxes` float32 [B, M, 4],
  (ymin, xmin, ymax, xmax) in [0, 1] in the frame of `image`, zero rows as
  padding; `labels` int32 [B, M], class in [0, num_classes), -1 on padding;
  `crowd` bool [B, M] (COCO's is_crowd; False for `sact_detection`);
  `image_id` int64 [B] (COCO's image id; for `sact_detection`, the index in
  its split as generated); and, for `sact_detection` only, `mask` float32
  [B, S, S], 1 on any object. Of images with more than M boxes, the M
  largest are kept.

  Args:
    name: one of `DETECTION_DATASETS`, optionally with a config
      ('sact_detection/tiny').
    split: tfds split, slicing allowed ('train', 'validation[:10%]').
    batch_size: examples per batch on this host.
    train: whether to shuffle, flip and drop the last partial batch.
    seed: seed of shuffling and flips, in [0, 2**32).
    data_dir: tfds data directory; None for the tfds default.
    shard_index: this host's shard, usually `jax.process_index()`.
    shard_count: number of shards, usually `jax.process_count()`.
    num_epochs: passes over the data; None repeats forever when training and
      makes one pass otherwise (see `pipeline.make_dataset`).
    image_size: side S of the model input; None for the dataset's default
      (`DetectionInfo.image_size`). `sact_detection` accepts only its own.
    max_boxes: box rows per image; None for `DetectionInfo.max_boxes`.
    worker_count: preprocessing processes; 0 preprocesses in this process (in
      threads). Workers need parsed absl flags (as under `absl.app.run`).

  Returns:
    A `grain.IterDataset` of batches.

  Raises:
    ValueError: unknown dataset or bad arguments.
    DatasetNotFoundError: the dataset is not prepared in `data_dir` (except
      `sact_detection`, which is generated there if needed).
  """
  info = detection_info(name)
  base = name.partition('/')[0]
  pipeline._check_shard(shard_index, shard_count)
  pipeline._check_batching(batch_size=batch_size, train=train, seed=seed)
  image_size = check_image_size(name, image_size)
  max_boxes = info.max_boxes if max_boxes is None else int(max_boxes)
  if image_size < 1 or max_boxes < 1:
    raise ValueError(f'Need image_size >= 1 and max_boxes >= 1, got '
                     f'{image_size} and {max_boxes}.')

  source = pipeline._data_source(name, split, data_dir)
  load = functools.partial(
      pipeline._load_batch, source=source,
      preprocess=functools.partial(_PREPROCESSORS[base], max_boxes=max_boxes),
      normalize=_NORMALIZERS[base], train=train, image_size=image_size)
  return pipeline._batched_dataset(
      len(source), load, batch_size=batch_size, train=train, seed=seed,
      shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs, worker_count=worker_count)


def _preprocess_sact(examples: list[pipeline.Example],
                     rng: np.random.Generator | None, *, train: bool,
                     image_size: int, max_boxes: int) -> pipeline.Example:
  """sact_detection: maybe flips each image with its boxes and mask."""
  del image_size  # Checked to be the stored size.
  flip_B = _flips(len(examples), rng, train)
  image_BxSxSx3 = pipeline._stack(examples, 'image')
  mask_BxSxS = pipeline._stack(examples, 'mask')
  image_BxSxSx3[flip_B] = image_BxSxSx3[flip_B, :, ::-1]
  mask_BxSxS[flip_B] = mask_BxSxS[flip_B, :, ::-1]
  rows = []
  for example, flip in zip(examples, flip_B):
    valid_K = example['labels'] >= 0
    labels_K, boxes_Kx4 = example['labels'][valid_K], example['boxes'][valid_K]
    if flip:
      boxes_Kx4 = _flip_boxes(boxes_Kx4, 1.0)
    rows.append(_fit_boxes(boxes_Kx4, labels_K, np.zeros(len(labels_K), bool),
                           max_boxes))
  batch = _stack_boxes(examples, rows)
  batch.update(image=image_BxSxSx3, mask=mask_BxSxS.astype(np.float32))
  return batch


def _preprocess_coco(examples: list[pipeline.Example],
                     rng: np.random.Generator | None, *, train: bool,
                     image_size: int, max_boxes: int) -> pipeline.Example:
  """COCO: letterboxes each image (maybe flipped) and its boxes."""
  flip_B = _flips(len(examples), rng, train)
  images, rows = [], []
  for example, flip in zip(examples, flip_B):
    objects = example['objects']
    # Real examples have one entry per object in each field; those of
    # `tfds.testing.mock_data` have random lengths.
    k = min(len(objects['bbox']), len(objects['label']),
            len(objects['is_crowd']))
    image_SxSx3, boxes_Kx4 = _letterbox(
        example['image'], np.asarray(objects['bbox'][:k], np.float32),
        image_size=image_size, flip=flip)
    images.append(image_SxSx3)
    rows.append(_fit_boxes(boxes_Kx4, objects['label'][:k],
                           objects['is_crowd'][:k], max_boxes))
  batch = _stack_boxes(examples, rows)
  batch['image'] = np.stack(images)
  return batch


def _flips(batch_size: int, rng: np.random.Generator | None,
           train: bool) -> np.ndarray:
  """Which images of a batch to flip horizontally, bool [B]."""
  if not train:
    return np.zeros(batch_size, bool)
  return rng.random(batch_size) < 0.5


def _flip_boxes(boxes_Kx4: np.ndarray, width: float) -> np.ndarray:
  """Boxes of an image `width` wide (in box units) flipped horizontally."""
  ymin, xmin, ymax, xmax = np.moveaxis(boxes_Kx4, -1, 0)
  return np.stack([ymin, width - xmax, ymax, width - xmin], axis=-1)


def _letterbox(image: np.ndarray | bytes, boxes_Kx4: np.ndarray, *,
               image_size: int, flip: bool
               ) -> tuple[np.ndarray, np.ndarray]:
  """Fits an image into an SxS square, longer side first, zero-padded.

  Args:
    image: uint8 [H, W, 3], or its encoded bytes.
    boxes_Kx4: (ymin, xmin, ymax, xmax) divided by the image's height and
      width (tfds `BBoxFeature`).
    image_size: side S of the square.
    flip: whether to flip the image (and boxes) horizontally.

  Returns:
    The image uint8 [S, S, 3], its top-left part resized from the input with
    the aspect ratio kept, and the boxes divided by S, in its frame.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = pipeline._decode_rgb(image)
  height, width = image.shape[:2]
  scale = image_size / max(height, width)
  new_height = max(1, min(image_size, round(height * scale)))
  new_width = max(1, min(image_size, round(width * scale)))
  if (new_height, new_width) != (height, width):
    image = np.asarray(Image.fromarray(image).resize(
        (new_width, new_height), Image.BILINEAR))
  if flip:
    image = image[:, ::-1]
  out_SxSx3 = np.zeros((image_size, image_size, 3), np.uint8)
  out_SxSx3[:new_height, :new_width] = image
  frame_4 = np.array([new_height, new_width] * 2, np.float32) / image_size
  boxes_Kx4 = np.clip(boxes_Kx4, 0, 1) * frame_4
  if flip:
    boxes_Kx4 = _flip_boxes(boxes_Kx4, frame_4[1])
  return out_SxSx3, boxes_Kx4


def _fit_boxes(boxes_Kx4: np.ndarray, labels_K: np.ndarray,
               crowd_K: np.ndarray, max_boxes: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Drops empty boxes, keeps the `max_boxes` largest, pads to that many.

  Args:
    boxes_Kx4: (ymin, xmin, ymax, xmax).
    labels_K: classes.
    crowd_K: COCO's is_crowd.
    max_boxes: rows of the output M.

  Returns:
    Boxes float32 [M, 4], labels int32 [M] and crowd bool [M], the kept
    boxes in their input order, then zero boxes, label -1, not crowd.
  """
  boxes_Kx4 = np.asarray(boxes_Kx4, np.float32).reshape(-1, 4)
  height_K = boxes_Kx4[:, 2] - boxes_Kx4[:, 0]
  width_K = boxes_Kx4[:, 3] - boxes_Kx4[:, 1]
  keep_K = np.flatnonzero((height_K > 0) & (width_K > 0))
  if len(keep_K) > max_boxes:
    largest = np.argsort(-(height_K * width_K)[keep_K], kind='stable')
    keep_K = np.sort(keep_K[largest[:max_boxes]])
  n = len(keep_K)
  boxes_Mx4 = np.zeros((max_boxes, 4), np.float32)
  labels_M = np.full(max_boxes, -1, np.int32)
  crowd_M = np.zeros(max_boxes, bool)
  boxes_Mx4[:n] = boxes_Kx4[keep_K]
  labels_M[:n] = np.asarray(labels_K)[keep_K]
  crowd_M[:n] = np.asarray(crowd_K)[keep_K]
  return boxes_Mx4, labels_M, crowd_M


def _stack_boxes(examples: list[pipeline.Example],
                 rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> pipeline.Example:
  """The batch's boxes, labels, crowd flags and image ids."""
  boxes, labels, crowd = (np.stack(column) for column in zip(*rows))
  image_id = np.array([int(example['image/id']) for example in examples],
                      np.int64)
  return {'boxes': boxes, 'labels': labels, 'crowd': crowd,
          'image_id': image_id}


# Per dataset: the geometry (resizing, flips; boxes and masks move along) ...
_PREPROCESSORS = {
    'sact_detection': _preprocess_sact,
    'coco': _preprocess_coco,
}
# ... then the per-image normalisation of the pixel values.
_NORMALIZERS = {
    'sact_detection': pipeline._standardize,
    'coco': pipeline._to_unit_range,
}
