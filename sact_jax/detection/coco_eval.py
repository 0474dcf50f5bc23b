"""COCO box metrics by pycocotools' COCOeval, on in-memory numpy arrays.

The SACT paper reports COCO's own numbers (AP@[.5:.95] etc. as the TF
Object Detection API computes them through pycocotools), so the metrics
here are the library's, not a re-implementation: the batched arrays of the
detector become a COCO ground-truth set and a results list in memory (no
JSON files), and `COCOeval` does the matching, the 101-point interpolated
precision and the averaging.

Boxes are `(ymin, xmin, ymax, xmax)` in pixels, the detector's convention;
COCO's `[x, y, width, height]` and 1-based category ids exist only inside
this module. Pixels matter: COCO's small / medium / large ranges are areas
of 32^2 and 96^2 pixels, so boxes should be in the original image's pixels.
"""

import contextlib
import io
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

# The keys of `coco_metrics`' summary: the first 9 of COCOeval.stats, in
# its order (AR by object size, stats[9:], is left out).
SUMMARY_KEYS = ('mAP', 'mAP@0.5', 'mAP@0.75', 'mAP_small', 'mAP_medium',
                'mAP_large', 'AR@1', 'AR@10', 'AR@100')


def pixel_boxes(boxes_normalised: np.ndarray, height, width) -> np.ndarray:
  """Boxes `[..., 4]` with coordinates in [0, 1] scaled to pixels.

  Args:
    boxes_normalised: `(ymin, xmin, ymax, xmax)` as fractions of the image.
    height: image height(s) in pixels: a scalar, or one per image `[N]` for
      boxes `[N, ..., 4]` (images of a batch differ in size before padding).
    width: the same for widths.

  Returns:
    float64 boxes of the same shape, in pixels.
  """
  boxes = np.asarray(boxes_normalised, np.float64)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'Boxes need a last axis of 4, got shape {boxes.shape}.')
  height, width = np.broadcast_arrays(np.asarray(height, np.float64),
                                      np.asarray(width, np.float64))
  if height.ndim > boxes.ndim - 1 or (
      height.shape != boxes.shape[:height.ndim]):
    raise ValueError(f'Sizes of shape {height.shape} do not match the '
                     f'leading axes of boxes {boxes.shape}.')
  scale = np.stack([height, width, height, width], axis=-1)
  scale = scale.reshape(height.shape + (1,) * (boxes.ndim - 1 - height.ndim)
                        + (4,))
  return boxes * scale


def _get(arrays: Mapping[str, Any], key: str, what: str) -> np.ndarray:
  if key not in arrays:
    raise ValueError(f'{what} has no {key!r} (has {sorted(arrays)}).')
  return np.asarray(arrays[key])


def _check_shape(array: np.ndarray, shape: tuple[int, ...], name: str):
  if array.shape != shape:
    raise ValueError(f'{name} should have shape {shape}, got {array.shape}.')


def check_ground_truth(ground_truth: Mapping[str, Any], num_classes: int
                       ) -> dict[str, np.ndarray]:
  """Validated numpy ground truth; `crowd` is filled in (all False).

  Raises:
    ValueError: on missing keys, shapes that disagree, duplicate image ids,
      no images, or labels outside [-1, num_classes).
  """
  image_id = _get(ground_truth, 'image_id', 'ground_truth')
  boxes = _get(ground_truth, 'boxes', 'ground_truth').astype(np.float64)
  labels = _get(ground_truth, 'labels', 'ground_truth')
  if image_id.ndim != 1:
    raise ValueError(f'ground_truth image_id should be [N], got shape '
                     f'{image_id.shape}.')
  num_images = image_id.shape[0]
  if num_images == 0:
    raise ValueError('COCO metrics need at least one image; got N = 0.')
  if not np.issubdtype(image_id.dtype, np.integer):
    raise ValueError(f'image_id must be integers, got {image_id.dtype}.')
  if len(np.unique(image_id)) != num_images:
    raise ValueError('ground_truth image_id has duplicates; COCO needs one '
                     'id per image.')
  if boxes.ndim != 3:
    raise ValueError(f'ground_truth boxes should be [N, M, 4], got shape '
                     f'{boxes.shape}.')
  _check_shape(boxes, (num_images, boxes.shape[1], 4), 'ground_truth boxes')
  _check_shape(labels, boxes.shape[:2], 'ground_truth labels')
  crowd = np.asarray(ground_truth.get('crowd', np.zeros(labels.shape, bool)))
  _check_shape(crowd, labels.shape, 'ground_truth crowd')
  if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
    raise ValueError(f'ground_truth labels must lie in [-1, {num_classes}) '
                     f'(-1 = padding), got [{labels.min()}, {labels.max()}].')
  real = labels >= 0
  if not np.all(np.isfinite(boxes[real])):
    raise ValueError('ground_truth has non-finite boxes.')
  return {'image_id': image_id.astype(np.int64), 'boxes': boxes,
          'labels': labels.astype(np.int64), 'crowd': crowd.astype(bool)}


def check_detections(detections: Mapping[str, Any], num_images: int,
                     num_classes: int | None = None
                     ) -> dict[str, np.ndarray]:
  """Validated numpy detections of `num_images` images.

  Raises:
    ValueError: on missing keys, shapes that disagree with each other or
      with `num_images`, and (for valid detections only) classes outside
      [0, num_classes) or non-finite boxes and scores.
  """
  boxes = _get(detections, 'boxes', 'detections').astype(np.float64)
  scores = _get(detections, 'scores', 'detections').astype(np.float64)
  classes = _get(detections, 'classes', 'detections')
  valid = _get(detections, 'valid', 'detections').astype(bool)
  if boxes.ndim != 3:
    raise ValueError(f'detections boxes should be [N, K, 4], got shape '
                     f'{boxes.shape}.')
  _check_shape(boxes, (num_images, boxes.shape[1], 4), 'detections boxes')
  for name, array in (('scores', scores), ('classes', classes),
                      ('valid', valid)):
    _check_shape(array, boxes.shape[:2], f'detections {name}')
  if valid.any():
    used = classes[valid]
    if num_classes is not None and (used.min() < 0
                                    or used.max() >= num_classes):
      raise ValueError(f'Valid detections need classes in [0, '
                       f'{num_classes}), got [{used.min()}, {used.max()}].')
    if not (np.all(np.isfinite(boxes[valid]))
            and np.all(np.isfinite(scores[valid]))):
      raise ValueError('Valid detections have non-finite boxes or scores.')
  return {'boxes': boxes, 'scores': scores, 'classes': classes.astype(np.int64),
          'valid': valid}


def _xywh(box: np.ndarray) -> list[float]:
  """COCO's `[x, y, width, height]` of one `(ymin, xmin, ymax, xmax)` box."""
  ymin, xmin, ymax, xmax = (float(v) for v in box)
  return [xmin, ymin, xmax - xmin, ymax - ymin]


def _coco_sets(ground_truth: dict[str, np.ndarray],
               detections: dict[str, np.ndarray], num_classes: int
               ) -> tuple[coco_lib.COCO, coco_lib.COCO]:
  """The ground truth and the results as in-memory COCO objects."""
  images, annotations, results = [], [], []
  for i, image_id in enumerate(ground_truth['image_id'].tolist()):
    images.append({'id': image_id})  # COCOeval's boxes need no sizes.
    for box, label, crowd in zip(ground_truth['boxes'][i],
                                 ground_truth['labels'][i],
                                 ground_truth['crowd'][i]):
      if label < 0:
        continue
      bbox = _xywh(box)
      # Ids from 1: COCOeval takes a matched id of 0 for "unmatched".
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': int(label) + 1, 'bbox': bbox,
                          'area': max(bbox[2], 0.0) * max(bbox[3], 0.0),
                          'iscrowd': int(crowd)})
    for box, score, cls, ok in zip(detections['boxes'][i],
                                   detections['scores'][i],
                                   detections['classes'][i],
                                   detections['valid'][i]):
      if ok:
        results.append({'image_id': image_id, 'category_id': int(cls) + 1,
                        'bbox': _xywh(box), 'score': float(score)})
  categories = [{'id': c + 1, 'name': str(c)} for c in range(num_classes)]
  gt = coco_lib.COCO()
  gt.dataset = {'images': images, 'annotations': annotations,
                'categories': categories}
  gt.createIndex()
  if results:
    dt = gt.loadRes(results)
  else:  # loadRes reads its first entry; an empty set is built directly.
    dt = coco_lib.COCO()
    dt.dataset = {'images': list(images), 'annotations': [],
                  'categories': categories}
    dt.createIndex()
  return gt, dt


def _nan_if_missing(value: float) -> float:
  """COCO's -1 ("no ground truth to average over") as NaN."""
  return float('nan') if value == -1 else float(value)


def coco_metrics(ground_truth: Mapping[str, Any],
                 detections: Mapping[str, Any], *, num_classes: int,
                 class_names: Sequence[str] | None = None
                 ) -> dict[str, float]:
  """COCO bbox metrics of a detector's outputs on a set of images.

  Args:
    ground_truth: `image_id` int `[N]` (unique), `boxes` float `[N, M, 4]`
      in pixels `(ymin, xmin, ymax, xmax)`, `labels` int `[N, M]` 0-based
      with -1 for padding rows, and optionally `crowd` bool `[N, M]`
      (COCO's iscrowd: detections on crowd regions are neither true nor
      false positives, and an unmatched crowd box is no miss).
    detections: `boxes` float `[N, K, 4]` (pixels, same convention),
      `scores` float `[N, K]`, `classes` int `[N, K]` 0-based and `valid`
      bool `[N, K]` (padding of the static-shape outputs is not valid).
      COCOeval keeps the best 100 detections per image and class.
    num_classes: the detector's classes (COCO category ids 1..num_classes).
    class_names: names for the per-class keys; default the class index.

  Returns:
    `SUMMARY_KEYS` (mAP = AP@[.5:.95] over classes, mAP@0.5, mAP@0.75,
    mAP by object size, AR at 1, 10 and 100 detections) and per-class
    AP@[.5:.95] as `'AP/<class name>'`. Values that COCO reports as -1
    (nothing to average: no ground truth at all, none in that size range,
    or none of that class) are NaN, so that they cannot pass for a score.

  Raises:
    ValueError: for N = 0, missing keys or shapes that disagree (see
      `check_ground_truth` and `check_detections`).
  """
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f'Got {len(class_names)} class names for '
                     f'{num_classes} classes.')
  gt_arrays = check_ground_truth(ground_truth, num_classes)
  det_arrays = check_detections(detections, len(gt_arrays['image_id']),
                                num_classes)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # pycocotools prints progress.
    gt, dt = _coco_sets(gt_arrays, det_arrays, num_classes)
    evaluator = cocoeval.COCOeval(gt, dt, iouType='bbox')
    evaluator.evaluate()
    evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      evaluator.summarize()
  logging.info('COCO bbox metrics of %d images, %d detections:\n%s',
               len(gt_arrays['image_id']), int(det_arrays['valid'].sum()),
               summary.getvalue().rstrip())
  metrics = {key: _nan_if_missing(value)
             for key, value in zip(SUMMARY_KEYS, evaluator.stats)}
  # precision [T, R, K, A, M]: every IoU and recall threshold of class k,
  # area range 'all', 100 detections; as summarize() averages them.
  precision = evaluator.eval['precision'][:, :, :, 0, -1]
  for k in range(num_classes):
    values = precision[:, :, k]
    name = class_names[k] if class_names is not None else str(k)
    metrics[f'AP/{name}'] = (float(values[values > -1].mean())
                             if np.any(values > -1) else float('nan'))
  return metrics
