"""Detector evaluation: COCO metrics, extractor FLOPs and ponder cost.

The paper's detection table reports, per model, mAP@[.5:.95] and the
feature extractor's FLOPs (mean +- std over images, as % of the vanilla
extractor of the same depth); the ponder maps of SACT's extractor should
concentrate on objects. `evaluate_detector` measures all of that on the
eval split: detections of every image go to pycocotools (`coco_eval.py`),
FLOPs and ponder costs come from the extractor's aux, and where the data
has object masks (`sact_detection`) the ponder cost inside objects is
compared with the cost outside.
"""

import functools
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from sact_jax import conv
from sact_jax import evaluate as classification_eval
from sact_jax import parallel
from sact_jax import visualize
from sact_jax.data import detection as detection_data
from sact_jax.detection import coco_eval
from sact_jax.detection import faster_rcnn
from sact_jax.detection import visualize as detection_visualize


def total_ponder_map(ponder_costs: list[jax.Array], shape: tuple[int, int]
                     ) -> jax.Array:
  """The extractor's ponder cost per position `[B, *shape]`.

  The sum over blocks of each block's map, nearest-upsampled to `shape`
  (SACT); ACT's per-image costs are constant maps; vanilla gives zeros.
  """
  total = None
  for cost in ponder_costs:
    if cost.ndim == 1:
      cost = cost[:, None, None]
    batch = cost.shape[0]
    up = jax.image.resize(cost, (batch, *shape), 'nearest')
    total = up if total is None else total + up
  return total


@functools.partial(conv.jit, static_argnums=(0, 2))
def _detect_step(graphdef, state, detector, images_BxSxSx3, mask_BxSxS):
  model = nnx.merge(graphdef, state)
  detections, aux = faster_rcnn.detect(model, images_BxSxSx3, detector)
  batch = images_BxSxSx3.shape[0]
  stats = {'flops': aux['flops'],
           'ponder_cost': sum((jnp.mean(c.reshape(batch, -1), axis=1)
                               for c in aux['ponder_cost']),
                              jnp.zeros((batch,), jnp.float32))}
  if aux['num_units']:
    # [B, blocks]: the mean number of units each block ran per position.
    stats['units'] = jnp.stack(
        [jnp.mean(u.reshape(batch, -1).astype(jnp.float32), axis=1)
         for u in aux['num_units']], axis=1)
  if aux['ponder_cost'] and mask_BxSxS is not None:
    cost = total_ponder_map(aux['ponder_cost'], mask_BxSxS.shape[1:])
    inside, outside = mask_BxSxS, 1.0 - mask_BxSxS
    stats['ponder_inside'] = (jnp.sum(cost * inside, (1, 2))
                              / jnp.maximum(jnp.sum(inside, (1, 2)), 1.0))
    stats['ponder_outside'] = (jnp.sum(cost * outside, (1, 2))
                               / jnp.maximum(jnp.sum(outside, (1, 2)), 1.0))
  return detections, stats


def _eval_split(config: ml_collections.ConfigDict,
                info: detection_data.DetectionInfo) -> str:
  limit = config.get('num_eval_examples')
  return info.eval_split if limit is None else f'{info.eval_split}[:{limit}]'


def _fetch_valid(tree: Any, valid_B: jax.Array) -> Any:
  """All hosts' real rows of global batch arrays, as numpy (as
  `sact_jax.evaluate` fetches its per-image numbers)."""
  tree, valid_B = multihost_utils.process_allgather((tree, valid_B),
                                                    tiled=True)
  valid_B = np.asarray(valid_B)
  return jax.tree.map(lambda x: np.asarray(x)[valid_B], tree)


def evaluate_detector(model: faster_rcnn.FasterRCNN,
                      config: ml_collections.ConfigDict, *,
                      verbose: bool = True) -> dict[str, Any]:
  """COCO metrics, extractor FLOPs and ponder costs on the eval split.

  Returns:
    pycocotools' metrics (`mAP` = AP@[.5:.95], `mAP@0.5`, `mAP@0.75`, per
    size, recalls, `AP/<class>`; None where the split has no ground truth
    of that size or class), `extractor_flops_mean` / `_std` per image,
    `vanilla_extractor_flops`, `extractor_flops_percent` / `_std` (of
    vanilla), `ponder_cost` (the extractor's sum over blocks of the mean
    cost, per image), `units_per_block` ((S)ACT: the mean number of units
    each extractor block ran per position; the depth halting left),
    `ponder_inside_outside_ratio` (SACT on data with masks),
    `num_examples`, `image_size`.
  """
  detector = faster_rcnn.DetectorConfig.from_config(config)
  info = detection_data.detection_info(config.dataset)
  size = detection_data.check_image_size(config.dataset,
                                        config.get('image_size'))
  # Rounded up so that every device gets the same number of rows.
  num_devices = jax.device_count()
  local_batch = (-(-config.eval_batch_size // num_devices) * num_devices
                 // jax.process_count())
  dataset = detection_data.make_detection_dataset(
      config.dataset, _eval_split(config, info), batch_size=local_batch,
      train=False, data_dir=config.get('data_dir'),
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      image_size=config.get('image_size'), max_boxes=config.get('max_boxes'))
  mesh = parallel.make_mesh()
  graphdef, state = classification_eval.eval_split_model(model)
  ground_truth, detections, stats = [], [], []
  iterator, template = iter(dataset), None
  while True:
    batch = next(iterator, None)
    # All hosts step together: a host whose shard is used up runs empty
    # batches until every shard is.
    if not classification_eval.any_host(batch is not None):
      break
    if batch is None:
      if template is None:
        raise ValueError(f'Host {jax.process_index()} has no examples of '
                         f'{config.dataset}: use fewer hosts.')
      batch = {k: v[:0] for k, v in template.items()}
    template = batch
    padded = classification_eval.pad_batch(batch, local_batch)
    on_mesh = {k: parallel.to_global(mesh, v) for k, v in padded.items()}
    dets, batch_stats = _detect_step(graphdef, state, detector,
                                     on_mesh['image'], on_mesh.get('mask'))
    truth = {'image_id': on_mesh['image_id'], 'boxes': on_mesh['boxes'],
             'labels': on_mesh['labels'], 'crowd': on_mesh['crowd']}
    dets, batch_stats, truth = _fetch_valid((dets, batch_stats, truth),
                                            on_mesh['valid'])
    truth['boxes'] = truth['boxes'] * size
    detections.append(dets)
    stats.append(batch_stats)
    ground_truth.append(truth)
    if verbose:
      logging.info('Evaluated %d images.', sum(
          len(d['scores']) for d in detections))

  def cat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  ground_truth, detections, stats = (cat(ground_truth), cat(detections),
                                     cat(stats))
  metrics = coco_eval.coco_metrics(ground_truth, detections,
                                   num_classes=info.num_classes,
                                   class_names=info.class_names)
  vanilla = faster_rcnn.vanilla_extractor_flops(detector, size)
  flops = stats['flops'].astype(np.float64)
  metrics.update({
      'extractor_flops_mean': float(flops.mean()),
      'extractor_flops_std': float(flops.std()),
      'vanilla_extractor_flops': int(vanilla),
      'extractor_flops_percent': float(100 * flops.mean() / vanilla),
      'extractor_flops_percent_std': float(100 * flops.std() / vanilla),
      'ponder_cost': float(stats['ponder_cost'].mean()),
      'num_examples': int(flops.shape[0]),
      'image_size': int(size),
  })
  if 'units' in stats:
    metrics['units_per_block'] = stats['units'].mean(axis=0).tolist()
  if 'ponder_inside' in stats:
    metrics['ponder_inside_outside_ratio'] = float(
        stats['ponder_inside'].mean() / stats['ponder_outside'].mean())
  # COCO's "no ground truth in this range" (NaN) as None: JSON has no NaN.
  metrics = {k: None if isinstance(v, float) and np.isnan(v) else v
             for k, v in metrics.items()}
  if verbose:
    logging.info('%s', summary_line(metrics))
  return metrics


def summary_line(metrics: Mapping[str, Any]) -> str:
  """One line: mAP, mAP@0.5, extractor FLOPs and ponder cost."""
  line = (f'mAP@[.5:.95] {metrics["mAP"]:.3f} | mAP@.5 '
          f'{metrics["mAP@0.5"]:.3f} | extractor FLOPs '
          f'{metrics["extractor_flops_percent"]:.1f}% +- '
          f'{metrics["extractor_flops_percent_std"]:.1f}% of vanilla | '
          f'ponder {metrics["ponder_cost"]:.3f}')
  ratio = metrics.get('ponder_inside_outside_ratio')
  return line if ratio is None else f'{line} | inside/outside {ratio:.3f}'


def check_num_images(config: ml_collections.ConfigDict,
                     num_images: int) -> None:
  """Raises ValueError if the eval split has fewer than `num_images` images.

  Up front: tfds refuses the slice only once the images are read, after
  the evaluation.
  """
  info = detection_data.detection_info(config.dataset)
  if num_images > info.num_eval_examples:
    raise ValueError(
        f'{num_images} images asked for, but the {info.eval_split} split of '
        f'{config.dataset} has {info.num_eval_examples}.')


def detection_examples(model: faster_rcnn.FasterRCNN,
                       config: ml_collections.ConfigDict, num_images: int
                       ) -> dict[str, np.ndarray]:
  """The first eval images with their detections and ponder maps (numpy).

  Returns:
    `images` (for display, [0, 1]), `detections` (pixels), `ground_truth`
    (pixels), `ponder_maps` `[N, h, w]` (the extractor's total cost at
    block 1's resolution; None for vanilla).
  """
  check_num_images(config, num_images)
  detector = faster_rcnn.DetectorConfig.from_config(config)
  info = detection_data.detection_info(config.dataset)
  size = detection_data.check_image_size(config.dataset,
                                        config.get('image_size'))
  batch = next(iter(detection_data.make_detection_dataset(
      config.dataset, f'{info.eval_split}[:{num_images}]',
      batch_size=num_images, train=False, data_dir=config.get('data_dir'),
      image_size=config.get('image_size'),
      max_boxes=config.get('max_boxes'))))
  graphdef, state = classification_eval.eval_split_model(model)
  images = jnp.asarray(batch['image'])
  detections, aux = conv.jit(
      lambda s, x: faster_rcnn.detect(nnx.merge(graphdef, s), x, detector))(
          state, images)
  maps = None
  if aux['ponder_cost']:
    finest = max((c.shape[1:] for c in aux['ponder_cost'] if c.ndim == 3),
                 default=(1, 1))
    maps = np.asarray(total_ponder_map(aux['ponder_cost'], tuple(finest)))
  return {
      'images': np.stack([visualize.display_image(x)
                          for x in batch['image']]),
      'detections': jax.tree.map(np.asarray, detections),
      'ground_truth': {'boxes': batch['boxes'] * size,
                       'labels': batch['labels']},
      'ponder_maps': maps,
      'class_names': info.class_names,
  }


def save_detection_pictures(model: faster_rcnn.FasterRCNN,
                            config: ml_collections.ConfigDict, path: str, *,
                            num_images: int = 8) -> str:
  """The paper's first figure for the first eval images, as a PNG."""
  examples = detection_examples(model, config, num_images)
  fig = detection_visualize.detection_figure(
      examples['images'], examples['detections'],
      class_names=examples['class_names'],
      ponder_maps_Nxhxw=examples['ponder_maps'],
      ground_truth=examples['ground_truth'], max_images=num_images)
  return visualize.save_figure(fig, path)


def _read_json_object(workdir: str, name: str) -> dict[str, Any]:
  """`workdir/name`, a JSON object; ValueError (one line) otherwise."""
  path = os.path.join(workdir, name)
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'{workdir} has no {name}.') from None
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read {path}: {e}') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not an '
                     'object.')
  return value


def _number(value: Any, spec: str, what: str, scale: float = 1.0) -> str:
  """`value / scale` formatted; '-' for None (what COCO could not compute).

  Raises:
    ValueError: `value` is neither None nor a number.
  """
  if value is None:
    return '-'
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'{what} is {value!r}, not a number.')
  return format(value / scale, spec)


def _metric(metrics: Mapping[str, Any], key: str, spec: str, scale: float = 1.0,
            *, where: str) -> str:
  """`_number` of `metrics[key]`; ValueError if it is missing."""
  if key not in metrics:
    raise ValueError(f'{where} has no {key!r}.')
  return _number(metrics[key], spec, f'{key!r} in {where}', scale)


def results_table(workdirs: Sequence[str]) -> str:
  """The paper's detection table (markdown) of finished detection runs.

  One row per workdir (`config.json` and `eval.json` as the detection main
  job writes them): model, tau (and its warm-up steps), the classifier it
  started from (the last part of `init_from`), training steps, extractor
  FLOPs (mean +- std, % of the vanilla extractor), mAP@[.5:.95], mAP@.5,
  mAP@.75 (localisation), ponder cost, units each extractor block ran per
  position ((S)ACT) and (SACT) the ponder cost inside objects over outside.
  Metrics that COCO could not compute (None in `eval.json`) show as '-'.

  Raises:
    ValueError: a workdir is not a directory, or lacks a readable
      `config.json` or `eval.json` with the fields the table shows.
  """
  rows = ['| model | tau | init from | steps | extractor FLOPs (% of '
          'vanilla) | mAP@[.5:.95] | mAP@.5 | mAP@.75 | ponder cost | '
          'units run | inside/outside |',
          '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      raise ValueError(f'{workdir} is not a directory.')
    config = _read_json_object(workdir, 'config.json')
    metrics = _read_json_object(workdir, 'eval.json')
    eval_file = os.path.join(workdir, 'eval.json')
    try:
      adaptive = config['model_type'] != 'vanilla'
      model = f'{config["model_type"]} units {tuple(config["units"])}'
      tau = str(config['tau']) if adaptive else '-'
      if adaptive and config.get('tau_warmup_steps'):
        tau += f' (warm-up {config["tau_warmup_steps"]})'
      steps = config['num_train_steps']
    except (KeyError, TypeError) as e:
      raise ValueError(
          f'{os.path.join(workdir, "config.json")} is not a detection '
          f'config ({type(e).__name__}: {e}).') from None
    cell = functools.partial(_metric, metrics, where=eval_file)
    units = metrics.get('units_per_block')
    if units is not None and not isinstance(units, list):
      raise ValueError(f"'units_per_block' in {eval_file} is {units!r}, not "
                       'a list.')
    units = '-' if units is None else ' / '.join(
        _number(u, '.2f', f"'units_per_block' in {eval_file}")
        for u in units)
    ratio = _number(metrics.get('ponder_inside_outside_ratio'), '.3f',
                    f"'ponder_inside_outside_ratio' in {eval_file}")
    rows.append(
        f'| {model} | {tau} | '
        f'{os.path.basename(str(config.get("init_from") or "-"))} | '
        f'{steps} | {cell("extractor_flops_percent", ".1f")} +- '
        f'{cell("extractor_flops_percent_std", ".1f")} '
        f'({cell("extractor_flops_mean", ".1f", 1e6)}M) | '
        f'{cell("mAP", ".3f")} | {cell("mAP@0.5", ".3f")} | '
        f'{cell("mAP@0.75", ".3f")} | {cell("ponder_cost", ".2f")} | '
        f'{units} | {ratio} |')
  return '\n'.join(rows)
