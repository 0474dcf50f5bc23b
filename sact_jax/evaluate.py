"""Evaluation: accuracy, FLOPs and ponder costs of a model on a dataset split.

Two layers, so that the numbers are easy to test:

* `per_image_stats` (jnp, runs inside jit) reduces one batch of model outputs
  to a few numbers per image; `summarize` (numpy, float64, host) turns the
  per-image numbers of a whole split into the reported metrics;
  `compute_metrics` chains the two for arrays in memory.
* `evaluate_model` streams the eval split through a jitted forward pass
  (or, with `sparse=True`, through `sact_jax.sparse`, which computes only
  what the halting decisions keep and reports its own wall time), keeps the
  per-image numbers of real (not padding) examples, summarizes them, logs a
  table and writes `eval.json`.

Ponder cost inside vs outside the object (datasets with a `mask`, SACT
models): the image-resolution mask is area-averaged to each block's
resolution (a cell's weight is the fraction of it the object covers) and, per
block, `inside = sum(rho * m) / sum(m)` and `outside = sum(rho * (1 - m)) /
sum(1 - m)`, pooled over all positions of all images (so images with bigger
objects weigh more, and no image needs a non-empty mask). The summary is the
sum over blocks, like the total ponder cost: in the reference architectures a
residual unit costs the same FLOPs over a whole block's map in every block
(channels double as each side halves), so the sum over blocks of a position's
ponder cost is proportional to the residual-unit FLOPs spent per unit of
image area there; the inside/outside ratio of the sums is then a ratio of
FLOP densities.
"""

import functools
import json
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from sact_jax import checkpoint as checkpoint_lib
from sact_jax import conv
from sact_jax import data as data_lib
from sact_jax import models
from sact_jax.models import base as model_base
from sact_jax import parallel

TOP_K = 5
# Seconds between progress log lines of a long evaluation.
_LOG_EVERY_SECONDS = 10.0

# Keys of `per_image_stats`; the last four exist only with masks and SACT.
_MASK_KEYS = ('inside_sum', 'inside_area', 'outside_sum', 'outside_area')


class EvaluationError(ValueError):
  """The model, config or data cannot be evaluated together; one line."""


def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Area-averaging weights [size_out, size_in]: output cells tile the input.

  Output cell i covers input interval [i s, (i + 1) s) with s = size_in /
  size_out; its weight on input pixel j is the overlap length over s, so rows
  sum to 1 (a box filter for integer factors).
  """
  scale = size_in / size_out
  lo_O = np.arange(size_out)[:, None] * scale
  pixel_I = np.arange(size_in)[None, :]
  overlap_OxI = np.clip(np.minimum(lo_O + scale, pixel_I + 1)
                        - np.maximum(lo_O, pixel_I), 0, None)
  return (overlap_OxI / scale).astype(np.float32)


def resize_mask(mask_BxHxW: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Fraction of each cell of a `shape` grid that the mask covers.

  Args:
    mask_BxHxW: masks in [0, 1] at image resolution.
    shape: (h, w) of a block's ponder map.

  Returns:
    `[B, h, w]` float32 in [0, 1].
  """
  rows_hxH = _area_matrix(mask_BxHxW.shape[1], shape[0])
  cols_wxW = _area_matrix(mask_BxHxW.shape[2], shape[1])
  return jnp.einsum('yi,bij,xj->byx', rows_hxH,
                    jnp.asarray(mask_BxHxW, jnp.float32), cols_wxW,
                    precision=jax.lax.Precision.HIGHEST)


def per_image_stats(logits_BxK: jax.Array, labels_B: jax.Array,
                    flops_B: jax.Array, ponder_costs: Sequence[jax.Array],
                    mask_BxHxW: jax.Array | None = None
                    ) -> dict[str, jax.Array]:
  """Reduces one batch of model outputs to a few float32 numbers per image.

  Args:
    logits_BxK: model logits.
    labels_B: int labels in [0, K).
    flops_B: FLOPs per image (`aux['flops']`).
    ponder_costs: `aux['ponder_cost']`: per block `[B]` (ACT) or `[B, h, w]`
      (SACT); empty for vanilla.
    mask_BxHxW: optional object masks in [0, 1] at image resolution; used
      only when every ponder cost is a map (SACT).

  Returns:
    `correct_top1`, `correct_top5` and `flops`, `[B]`; `ponder_cost`
    `[B, num_blocks]` (spatial mean per block); with masks and SACT also
    `inside_sum`, `inside_area`, `outside_sum`, `outside_area`, `[B,
    num_blocks]` (sums of ponder cost and of mask area, inside and outside).
  """
  batch = logits_BxK.shape[0]
  labels_B = jnp.asarray(labels_B, jnp.int32)
  label_logit_B = jnp.take_along_axis(logits_BxK, labels_B[:, None], axis=1)
  # As the reference: top-1 is the argmax's (the first of tied classes,
  # as `tf.argmax` for slim's streaming accuracy); top-5 as tf.nn.in_top_k
  # (classes tied with the label's logit count for it). A label outside
  # [0, K) or a row with a non-finite logit is never correct (a model that
  # diverged to NaN scores 0%, not 100%).
  valid_B = ((labels_B >= 0) & (labels_B < logits_BxK.shape[1])
             & jnp.all(jnp.isfinite(logits_BxK), axis=1))
  rank_B = jnp.sum(logits_BxK > label_logit_B, axis=1)
  top1_B = jnp.argmax(logits_BxK, axis=1) == labels_B
  stats = {
      'correct_top1': (valid_B & top1_B).astype(jnp.float32),
      'correct_top5': (valid_B & (rank_B < TOP_K)).astype(jnp.float32),
      'flops': jnp.asarray(flops_B, jnp.float32),
  }
  means = [jnp.mean(p.reshape(batch, -1).astype(jnp.float32), axis=1)
           for p in ponder_costs]
  stats['ponder_cost'] = (jnp.stack(means, axis=1) if means
                          else jnp.zeros((batch, 0), jnp.float32))
  if (mask_BxHxW is not None and ponder_costs
      and all(p.ndim == 3 for p in ponder_costs)):
    sums = {k: [] for k in _MASK_KEYS}
    for ponder_Bxhxw in ponder_costs:
      inside_Bxhxw = resize_mask(mask_BxHxW, ponder_Bxhxw.shape[1:])
      outside_Bxhxw = 1.0 - inside_Bxhxw
      sums['inside_sum'].append(jnp.sum(ponder_Bxhxw * inside_Bxhxw, (1, 2)))
      sums['inside_area'].append(jnp.sum(inside_Bxhxw, (1, 2)))
      sums['outside_sum'].append(jnp.sum(ponder_Bxhxw * outside_Bxhxw,
                                         (1, 2)))
      sums['outside_area'].append(jnp.sum(outside_Bxhxw, (1, 2)))
    stats.update({k: jnp.stack(v, axis=1) for k, v in sums.items()})
  return stats


def _ratio(numerator: float, denominator: float) -> float | None:
  """numerator / denominator, None (JSON null) when undefined."""
  return float(numerator / denominator) if denominator > 0 else None


def summarize(stats: Mapping[str, np.ndarray], *,
              vanilla_flops: float | None = None) -> dict[str, Any]:
  """Metrics of a split from the per-image numbers of all its examples.

  Args:
    stats: `per_image_stats` outputs of every example, concatenated.
    vanilla_flops: FLOPs per image of the vanilla network of the same depth
      (for the relative FLOPs); None to leave those out.

  Returns:
    A JSON-compatible dict: `num_examples`, `top1_accuracy` and
    `top5_accuracy` (fractions), `flops_mean`, `flops_std` (population std
    over all images; the original averaged the std of each batch of 100,
    which runs slightly lower), `vanilla_flops`, `flops_percent_of_vanilla`,
    `flops_std_percent_of_vanilla`, `ponder_cost_per_block`,
    `ponder_cost_total` (sum of block means), and `ponder_inside_per_block`,
    `ponder_outside_per_block`, `ponder_inside_total`,
    `ponder_outside_total`, `ponder_inside_outside_ratio` (None when the
    stats have no masks; see the module docstring).
  """
  stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  num_examples = stats['flops'].shape[0]
  if num_examples == 0:
    raise ValueError('No examples to summarize: the split is empty.')
  flops_N = stats['flops']
  metrics = {
      'num_examples': int(num_examples),
      'top1_accuracy': float(stats['correct_top1'].mean()),
      'top5_accuracy': float(stats['correct_top5'].mean()),
      'flops_mean': float(flops_N.mean()),
      'flops_std': float(flops_N.std()),
      'vanilla_flops': None,
      'flops_percent_of_vanilla': None,
      'flops_std_percent_of_vanilla': None,
  }
  if vanilla_flops:
    metrics['vanilla_flops'] = int(vanilla_flops)
    metrics['flops_percent_of_vanilla'] = float(
        100 * flops_N.mean() / vanilla_flops)
    metrics['flops_std_percent_of_vanilla'] = float(
        100 * flops_N.std() / vanilla_flops)
  per_block = stats['ponder_cost'].mean(axis=0)
  metrics['ponder_cost_per_block'] = [float(p) for p in per_block]
  metrics['ponder_cost_total'] = float(per_block.sum())

  inside = outside = None
  if 'inside_sum' in stats:
    totals = {k: stats[k].sum(axis=0) for k in _MASK_KEYS}
    inside = [_ratio(s, a) for s, a in zip(totals['inside_sum'],
                                           totals['inside_area'])]
    outside = [_ratio(s, a) for s, a in zip(totals['outside_sum'],
                                            totals['outside_area'])]
  metrics['ponder_inside_per_block'] = inside
  metrics['ponder_outside_per_block'] = outside
  inside_total = (None if inside is None or None in inside
                  else float(sum(inside)))
  outside_total = (None if outside is None or None in outside
                   else float(sum(outside)))
  metrics['ponder_inside_total'] = inside_total
  metrics['ponder_outside_total'] = outside_total
  metrics['ponder_inside_outside_ratio'] = (
      None if inside_total is None or outside_total is None
      else _ratio(inside_total, outside_total))
  return metrics


def compute_metrics(logits_NxK, labels_N, flops_N, ponder_costs,
                    mask_NxHxW=None, *,
                    vanilla_flops: float | None = None) -> dict[str, Any]:
  """`summarize(per_image_stats(...))` for outputs already in memory."""
  stats = per_image_stats(jnp.asarray(logits_NxK), jnp.asarray(labels_N),
                          jnp.asarray(flops_N),
                          [jnp.asarray(p) for p in ponder_costs],
                          None if mask_NxHxW is None
                          else jnp.asarray(mask_NxHxW))
  return summarize(jax.device_get(stats), vanilla_flops=vanilla_flops)


@functools.partial(conv.jit, static_argnums=0)
def _apply(graphdef, state, images_BxHxWx3):
  return nnx.merge(graphdef, state)(images_BxHxWx3)


def eval_split_model(model: nnx.Module) -> tuple[Any, Any]:
  """`(graphdef, state)` of `model` in eval mode; `model` is left as it was."""
  graphdef, state = nnx.split(model)
  eval_model = nnx.merge(graphdef, state)
  eval_model.eval()
  return nnx.split(eval_model)


def predict(model: nnx.Module, images_BxHxWx3) -> tuple[jax.Array, dict]:
  """Jitted eval-mode forward pass: `(logits, aux)`.

  Compiled once per architecture and image shape, and shared by evaluation
  and the ponder-map pictures.
  """
  if not hasattr(images_BxHxWx3, 'dtype'):  # E.g. nested lists.
    images_BxHxWx3 = np.asarray(images_BxHxWx3)
  # Checked before the cast, which would hide integer (unnormalised) images.
  model_base.check_image_dtype(images_BxHxWx3.dtype)
  graphdef, state = eval_split_model(model)
  return _apply(graphdef, state, jnp.asarray(images_BxHxWx3, jnp.float32))


@functools.partial(conv.jit, static_argnums=0)
def _eval_step(graphdef, state, images_BxHxWx3, labels_B, mask_BxHxW):
  logits_BxK, aux = nnx.merge(graphdef, state)(images_BxHxWx3)
  return per_image_stats(logits_BxK, labels_B, aux['flops'],
                         aux['ponder_cost'], mask_BxHxW)


_stats_step = jax.jit(per_image_stats)


class _SparseStep:
  """`_eval_step` through `sact_jax.sparse`, timing the model alone."""

  def __init__(self, model: nnx.Module):
    from sact_jax import sparse  # pylint: disable=g-import-not-at-top
    self.model = nnx.merge(*eval_split_model(model))
    self.apply = functools.partial(sparse.apply, self.model)
    self.seconds = 0.0
    self.flops_overhead = 0.0

  def __call__(self, images_BxHxWx3, labels_B, mask_BxHxW):
    start = time.perf_counter()
    logits_BxK, aux = jax.block_until_ready(self.apply(images_BxHxWx3))
    self.seconds += time.perf_counter() - start
    self.flops_overhead += float(aux['flops_overhead'])
    return _stats_step(logits_BxK, labels_B, aux['flops'],
                       aux['ponder_cost'], mask_BxHxW)


def pad_batch(batch: Mapping[str, np.ndarray], size: int
              ) -> dict[str, np.ndarray]:
  """Zero-pads every array of `batch` to `size` rows; adds `valid` [size].

  A last, partial eval batch padded to the others' size runs the same
  compiled program; `valid` says which rows are real.
  """
  count = batch['image'].shape[0]
  padded = {}
  for key, value in batch.items():
    value = np.asarray(value)
    padding = [(0, size - count)] + [(0, 0)] * (value.ndim - 1)
    padded[key] = np.pad(value, padding)
  padded['valid'] = np.arange(size) < count
  return padded


def any_host(flag: bool) -> bool:
  """Whether `flag` holds on any host (all hosts must step together)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.any(flags))


def _eval_split_name(config, info: data_lib.DatasetInfo) -> str:
  split = info.split_to_evaluate(config.get('eval_split', None))
  limit = config.get('num_eval_examples', None)
  if limit is not None:
    if '[' in split:
      raise EvaluationError(f'num_eval_examples={limit} cannot be combined '
                            f'with the sliced split {split!r}.')
    if limit < 1:
      raise EvaluationError(f'num_eval_examples must be >= 1 or None, got '
                            f'{limit}.')
    split = f'{split}[:{limit}]'
  return split


def _expected_count(config, info: data_lib.DatasetInfo) -> int | None:
  """Size of the evaluated split when the metadata knows it."""
  size = info.eval_size(config.get('eval_split', None))
  limit = config.get('num_eval_examples', None)
  return size if size is None or limit is None else min(limit, size)


def _fetch_valid(stats: dict[str, jax.Array], valid_B: jax.Array
                 ) -> dict[str, np.ndarray]:
  """All hosts' per-image numbers of one batch, padding rows dropped.

  Args:
    stats: `per_image_stats` of a global batch.
    valid_B: global bool array, sharded like the batch: real rows.
  """
  stats, valid_B = multihost_utils.process_allgather((stats, valid_B),
                                                     tiled=True)
  valid_B = np.asarray(valid_B)
  return {k: np.asarray(v)[valid_B] for k, v in stats.items()}


def evaluate_model(model: nnx.Module, config, *,
                   workdir: str | None = None,
                   sparse: bool = False,
                   verbose: bool = True) -> dict[str, Any]:
  """Evaluates `model` on the eval split of `config.dataset`.

  Every example of the split (or of its first `config.num_eval_examples`) is
  counted exactly once: the last partial batch is zero-padded to the
  compiled batch size and its padding dropped. Batches are sharded over all
  devices (each host reads its own shard of the split); the model runs in
  eval mode (BatchNorm moving statistics) without changing `model`.

  Args:
    model: a CIFAR or ImageNet ResNet from `sact_jax.models`.
    config: ConfigDict with `dataset`, `data_dir`, `eval_batch_size`,
      `num_eval_examples` (None: the whole split) and optionally
      `eval_split` and `image_size` (ImageNet).
    workdir: where to write `eval.json` (process 0 only); None to skip.
    verbose: log the metrics table at the end (`log_table`).
    sparse: run the model through `sact_jax.sparse` (one process, its
      default device, batches of `eval_batch_size`): the same metrics, plus
      `model_seconds` (wall time of the model calls alone, the first batch
      size's compilations included) and `flops_overhead_per_image` (FLOPs
      computed beyond the count: bucket padding, units run densely).

  Returns:
    The metrics of `summarize`, plus `model` (`ModelSpec.from_model` as a
    dict),
    `dataset`, `split`, `image_shape`, `num_devices`, `seconds` and
    `inference` ('dense' or 'sparse').
  """
  start = time.time()
  batch_size = config.eval_batch_size
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
      batch_size < 1):
    raise EvaluationError(
        f'eval_batch_size must be a positive integer, got {batch_size!r}.')
  if sparse and jax.process_count() > 1:
    raise EvaluationError('Sparse evaluation runs on one process; got '
                          f'{jax.process_count()}.')
  # Read from the model, so that the numbers never depend on a config that
  # might disagree with a restored checkpoint.
  spec = models.ModelSpec.from_model(model)
  try:
    info = data_lib.dataset_info(config.dataset)
  except (ValueError, KeyError) as e:  # E.g. a detection run's config.
    raise EvaluationError(f'Cannot evaluate a classifier on '
                          f'{config.dataset!r}: {e}') from None
  split = _eval_split_name(config, info)
  try:
    label_offset = data_lib.label_offset(config.dataset, spec.num_classes)
  except ValueError as e:
    raise EvaluationError(str(e)) from None

  num_devices, num_hosts = jax.device_count(), jax.process_count()
  if sparse:
    num_devices = 1
  # Round up so that every device gets the same number of rows.
  global_batch = -(-config.eval_batch_size // num_devices) * num_devices
  local_batch = global_batch // num_hosts
  try:
    dataset = data_lib.make_dataset(
        config.dataset, split, batch_size=local_batch, train=False,
        data_dir=config.get('data_dir', None),
        shard_index=jax.process_index(), shard_count=num_hosts,
        image_size=config.get('image_size', None))
  except ValueError as e:  # An image_size the dataset cannot have.
    raise EvaluationError(str(e)) from None

  # The trainer's mesh: its replicated weights then need no copy.
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  if sparse:
    step = _SparseStep(model)
  else:
    graphdef, state = eval_split_model(model)
    state = jax.device_put(state, parallel.replicated(mesh))
    step = functools.partial(_eval_step, graphdef, state)
  sact = spec.model_type == 'sact'

  iterator = iter(dataset)
  chunks = []
  num_seen, image_shape, vanilla, template = 0, None, None, None
  pending = None
  # Examples this host will see, for the progress lines (None: unknown).
  expected = _expected_count(config, info)
  if expected is not None:
    expected = len(range(jax.process_index(), expected, num_hosts))
  last_log = time.time()
  while True:
    batch = next(iterator, None)
    if not any_host(batch is not None):
      break
    if batch is None:  # This host's shard is used up; others' are not.
      if template is None:
        raise EvaluationError(
            f'Host {jax.process_index()} has no examples of '
            f'{config.dataset}:{split}: use fewer hosts or a bigger split.')
      batch = {k: v[:0] for k, v in template.items()}
    template = batch
    if image_shape is None:
      image_shape = tuple(int(d) for d in batch['image'].shape[1:])
      vanilla = spec.vanilla_flops(image_shape)
    labels = np.asarray(batch['label']) + label_offset
    if labels.size and (labels.min() < 0
                        or labels.max() >= spec.num_classes):
      raise EvaluationError(f'Labels outside [0, {spec.num_classes}) in '
                            f'{config.dataset}.')
    # Sparse inference takes any batch size (a new one compiles once): its
    # last batch is not padded, so neither its time nor `flops_overhead`
    # counts rows that are not images.
    padded = pad_batch(
        {'image': batch['image'], 'label': labels,
         'mask': batch.get('mask', np.zeros((labels.size, 1, 1), np.float32))},
        labels.size if sparse else local_batch)
    use_mask = sact and 'mask' in batch
    stats = step(
        parallel.to_global(mesh, padded['image']),
        parallel.to_global(mesh, padded['label']),
        parallel.to_global(mesh, padded['mask']) if use_mask else None)
    # Fetch the previous batch's numbers only now, so that the device works
    # on this batch meanwhile.
    if pending is not None:
      chunks.append(_fetch_valid(*pending))
    pending = (stats, parallel.to_global(mesh, padded['valid']))
    num_seen += int(padded['valid'].sum())
    if time.time() - last_log >= _LOG_EVERY_SECONDS:
      elapsed = time.time() - start
      logging.info('eval: %d%s images of %s:%s (%.1f images/s per host)',
                   num_seen, f'/{expected}' if expected else '',
                   config.dataset, split, num_seen / elapsed)
      last_log = time.time()
  if pending is not None:
    chunks.append(_fetch_valid(*pending))

  if not chunks:
    raise EvaluationError(f'The split {config.dataset}:{split} is empty.')
  stats = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  metrics = summarize(stats, vanilla_flops=vanilla)
  metrics.update({
      'model': spec.to_dict(),
      'dataset': config.dataset,
      'split': split,
      'image_shape': list(image_shape),
      'num_devices': num_devices,
      'seconds': time.time() - start,
      'inference': 'sparse' if sparse else 'dense',
  })
  if sparse:
    metrics['model_seconds'] = step.seconds
    metrics['flops_overhead_per_image'] = (step.flops_overhead
                                           / metrics['num_examples'])
  if verbose:
    log_table(metrics)
  if workdir is not None and jax.process_index() == 0:
    save_json(metrics, os.path.join(workdir, 'eval.json'))
  return metrics


def check_model_source(workdir: str | None, checkpoint: str | None) -> None:
  """Raises ValueError unless exactly one model source is given."""
  if (workdir is None) == (checkpoint is None):
    raise ValueError(
        'Give exactly one of --workdir (a training run) and --checkpoint (a '
        'model-only checkpoint), got '
        + ('both.' if workdir is not None else 'neither.'))
  if '' in (workdir, checkpoint):
    raise ValueError('--workdir or --checkpoint is an empty path.')


def load_model(config, *, workdir: str | None = None,
               checkpoint: str | None = None) -> nnx.Module:
  """The model of a training run (`workdir`) or of a model-only checkpoint.

  Args:
    config: the run's ConfigDict (needed with `workdir`).
    workdir: a training workdir; its latest checkpoint is restored.
    checkpoint: a model-only checkpoint directory (`sact_jax.checkpoint`).

  Returns:
    The model, in eval mode.

  Raises:
    ValueError: not exactly one of `workdir` and `checkpoint` is given.
  """
  check_model_source(workdir, checkpoint)
  if workdir is not None:
    if config is None:
      raise EvaluationError(
          '--workdir needs the --config of the training run.')
    try:
      spec = models.ModelSpec.from_config(config)
      return checkpoint_lib.restore_latest_model(
          workdir, spec, remat=config.get('remat'),
          unroll=config.get('unroll', False))
    except (ValueError, TypeError) as e:
      raise EvaluationError(str(e)) from None
  model, spec = checkpoint_lib.restore_model(checkpoint)
  logging.info('Restored %s from %s.', spec, checkpoint)
  model.eval()
  return model


def save_json(metrics: Mapping[str, Any], path: str, indent: int = 2
              ) -> None:
  """Writes `metrics` to `path` atomically (a reader never sees half a file).

  NaN is refused (`ValueError`): it is not JSON.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Same directory (so the rename is atomic), and made by open() so that it
  # gets the umask's permissions (mkstemp's are 0600).
  tmp_path = os.path.join(os.path.dirname(path),
                          f'.{os.path.basename(path)}.{os.getpid()}.tmp')
  try:
    with open(tmp_path, 'w') as f:
      json.dump(metrics, f, indent=indent, allow_nan=False)
      f.write('\n')
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.unlink(tmp_path)
    raise


def human_count(value: float) -> str:
  """1234567 -> '1.23 M'."""
  for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {unit}'
  return f'{value:.0f}'


def _row(values: Sequence[float | None]) -> str:
  return '  '.join('n/a' if v is None else f'{v:.3f}' for v in values)


def log_table(metrics: Mapping[str, Any]) -> None:
  """`format_table` as INFO lines."""
  for line in format_table(metrics).splitlines():
    logging.info('%s', line)


def format_table(metrics: Mapping[str, Any]) -> str:
  """The metrics as a plain-text table."""
  spec = metrics.get('model')
  lines = []
  if spec:
    lines.append(
        f'{spec["family"]} ResNet {tuple(spec["units"])} '
        f'{spec["model_type"]} on {metrics.get("dataset")}:'
        f'{metrics.get("split")} ({metrics["num_examples"]} images)')
  rows = [
      ('top-1 accuracy', f'{100 * metrics["top1_accuracy"]:.2f}%'),
      ('top-5 accuracy', f'{100 * metrics["top5_accuracy"]:.2f}%' + (
          ' (trivial: <= 5 classes)'
          if spec and spec['num_classes'] <= TOP_K else '')),
      ('FLOPs per image', f'{human_count(metrics["flops_mean"])} '
                          f'(std {human_count(metrics["flops_std"])})'),
  ]
  if metrics.get('vanilla_flops'):
    rows.append(('FLOPs vs vanilla',
                 f'{metrics["flops_percent_of_vanilla"]:.1f}% (std '
                 f'{metrics["flops_std_percent_of_vanilla"]:.1f}%) of '
                 f'{human_count(metrics["vanilla_flops"])}'))
  if metrics['ponder_cost_per_block']:
    rows.append(('ponder cost per block',
                 f'{_row(metrics["ponder_cost_per_block"])}  (total '
                 f'{metrics["ponder_cost_total"]:.3f})'))
  if metrics.get('ponder_inside_per_block') is not None:
    for where in ('inside', 'outside'):
      total = metrics[f'ponder_{where}_total']
      rows.append((f'ponder {where} objects',
                   f'{_row(metrics[f"ponder_{where}_per_block"])}  (total '
                   + ('n/a' if total is None else f'{total:.3f}') + ')'))
    ratio = metrics['ponder_inside_outside_ratio']
    rows.append(('inside / outside',
                 'n/a' if ratio is None else f'{ratio:.3f}'))
  if metrics.get('inference') == 'sparse':
    rows.append(('sparse inference',
                 f'{metrics["model_seconds"]:.2f} s in the model, '
                 f'{human_count(metrics["flops_overhead_per_image"])} '
                 'overhead FLOPs per image'))
  width = max(len(name) for name, _ in rows)
  lines.extend(f'  {name:<{width}}  {value}' for name, value in rows)
  return '\n'.join(lines)
