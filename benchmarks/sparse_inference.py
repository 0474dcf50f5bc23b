r"""Wall-clock speed of sparse SACT inference (`sact_jax.sparse`) on this CPU.

For CIFAR ResNet-110 (32x32) and ImageNet ResNet-101 (224x224) SACT models
whose halting is tuned to several FLOP fractions of the vanilla network,
times in one process, interleaved: the dense vanilla network of the same
depth (scanned and unrolled; the faster is the baseline), the dense SACT
model (compute everything, then mask, as the reference) and the sparse path.
Reports FLOP fraction, time ratio and efficiency =
(t_vanilla / t_sparse) / (flops_vanilla / flops_sparse), the split of the
sparse time into its phases, each block of the sparse path beside the same
block of the vanilla model (FLOP fraction, time ratio and efficiency per
block, where the blocks run as calls of their own), and a gather / matmul /
scatter breakdown of a representative unit.

Halting is tuned on a randomly initialised model: every head's local conv
becomes a 3x3 box filter over the mean of its input channels (so the
halting logit follows the smooth content of the feature maps, as trained
ponder maps do), scaled per block to a spatial standard deviation of
`--sigma` logits; a bias shared by all heads is then bisected until the
batch's FLOPs reach the target fraction. Inputs are scikit-image's bundled
photographs (random crops and flips for larger batches).

  python -m benchmarks.sparse_inference --families=imagenet --batch_sizes=1
  python -m benchmarks.sparse_inference --families=cifar,imagenet \
      --batch_sizes=1,32 --fractions=0.3,0.5,0.7 \
      --out=/tmp/sparse_inference.json

Other engineers share the 2 cores: the load average is recorded beside each
measurement, and the minimum over repetitions is reported with the median.
"""

import functools
import json
import os
import platform
import time
from typing import Callable

from absl import app
from absl import flags
import numpy as np

os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')

# pylint: disable=g-import-not-at-top
from flax import nnx
import jax
import jax.numpy as jnp

import benchmarks
from sact_jax import act as act_lib
from sact_jax import conv
from sact_jax import evaluate
from sact_jax import flops as flops_lib
from sact_jax import models
from sact_jax import sparse
from sact_jax.models import create_model
from sact_jax.sparse import rows as rows_lib
from sact_jax.sparse import stages
# pylint: enable=g-import-not-at-top

_FAMILIES = flags.DEFINE_list('families', ['cifar', 'imagenet'],
                              'Families to measure.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes.')
_FRACTIONS = flags.DEFINE_list('fractions', ['0.3', '0.5', '0.7'],
                               'Target FLOP fractions of vanilla.')
_REPS = flags.DEFINE_integer('reps', 7, 'Timed repetitions (batch 1).')
_REPS_LARGE = flags.DEFINE_integer(
    'reps_large', 3, 'Timed repetitions when batch * pixels is large '
    '(ImageNet batch 32).')
_SIGMA = flags.DEFINE_float('sigma', 1.5,
                            'Spatial std of the halting logit per block.')
_RESIDUAL_SCALE = flags.DEFINE_float(
    'residual_scale', 0.2,
    'Factor on the last conv of every residual branch of units 2..L (see '
    'module docstring).')
_BREAKDOWN = flags.DEFINE_bool('breakdown', True,
                               'Also time the phases of the sparse path.')
_BLOCK_BREAKDOWN = flags.DEFINE_bool(
    'block_breakdown', True, 'Also time every block of the vanilla model '
    'alone and set it beside the same block of the sparse path (its FLOP '
    'fraction, time ratio and efficiency per block).')
_UNIT_BREAKDOWN = flags.DEFINE_integer(
    'unit_breakdown_block', 2,
    'Block whose unit is split into gathers / matmuls / scatters (at 50%% '
    'active positions, once per batch size); -1 to skip.')
_UNROLLED = flags.DEFINE_bool('unrolled', True,
                              'Also time the unrolled dense vanilla model.')
_SPARSE_OPTIONS = flags.DEFINE_string(
    'sparse_options', '{}', 'JSON dict of sparse.SparseOptions fields.')
_CACHE, _REUSE = benchmarks.define_process_flags()
_SERVE = flags.DEFINE_bool(
    'serve', False, 'Serve the one --families / --batch_sizes / --fractions '
    'workload to benchmarks/vs_original.py --lockstep instead of measuring '
    '(benchmarks/lockstep.py).')
_SHARD = flags.DEFINE_string(
    'shard', '0/1', 'With --serve, K/N: serve the K-th of N equal parts of '
    'the batch (halting tuned on the whole batch\'s first images, as '
    'without it), for a side of N pinned servers (lockstep.ShardedClient).')
_OUT = flags.DEFINE_string(
    'out', benchmarks.default_out('sparse_inference.json'),
    'Where to write the results as JSON (not with --serve).')
_OVERWRITE = benchmarks.define_overwrite_flag()
# `--help` lists the flags defined in benchmarks/__init__.py too.
flags.adopt_module_key_flags(benchmarks)

_CONFIGS = benchmarks.MODELS


def _load() -> float:
  return os.getloadavg()[0]


def _images(batch: int, size: int, seed: int = 0) -> jax.Array:
  """Bundled photographs, random crops and flips, per-image standardised."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  import skimage.transform  # pylint: disable=g-import-not-at-top
  names = ['astronaut', 'coffee', 'chelsea', 'rocket',
           'immunohistochemistry', 'cat']
  rng = np.random.default_rng(seed)
  out = []
  for i in range(batch):
    image = getattr(skimage.data, names[i % len(names)])()
    h, w = image.shape[:2]
    side = int(min(h, w) * (1.0 if i < len(names) else rng.uniform(0.6, 1)))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = image[top:top + side, left:left + side]
    if i >= len(names) and rng.random() < 0.5:
      crop = crop[:, ::-1]
    crop = skimage.transform.resize(crop, (size, size), anti_aliasing=True)
    crop = (crop - crop.mean()) / max(crop.std(), 1e-3)
    out.append(crop.astype(np.float32))
  return jnp.asarray(np.stack(out))


class _Dense:
  """The jitted dense model; `refresh()` after changing its weights.

  Jitted as the library jits its own dense inference (`conv.jit`: the
  compiler options under which its convolutions run best), so that the
  baseline is the fastest dense model sact_jax has.
  """

  def __init__(self, model):
    self.model = model
    graphdef, self.state = nnx.split(model)
    self.fn = conv.jit(lambda s, images: nnx.merge(graphdef, s)(images))

  def refresh(self):
    self.state = nnx.state(self.model)

  def __call__(self, images):
    return self.fn(self.state, images)


def _block_inputs(model, images):
  """x^1 of every block (output of its first unit), via the model's layers.

  Blocks after the first get the dense SACT block output of the previous
  block, which is what their first unit sees.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    m = nnx.merge(graphdef, state)
    counter = flops_lib.FlopCounter()
    x = m.stem(images, counter)
    firsts = []
    for block in m.blocks:
      firsts.append(block.first(x))
      x, _ = block(x, counter)
    return firsts
  return run(state, images)


def scale_residuals(model, factor: float):
  """Scales the last conv of the residual branch of units 2..L.

  A randomly initialised pre-activation ResNet in eval mode (BatchNorm
  statistics at their initial values) adds residuals as large as its trunk,
  so features, and halting logits with them, drift from unit to unit; in a
  trained ResNet the branches are small next to the trunk and ponder maps
  follow stable image content. Scaling the branches reproduces that. The
  dense and sparse paths run the same weights, so timings are unaffected.
  """
  for block in model.blocks:
    if block.steps is None:
      continue
    unit = block.steps.unit
    last = unit.conv3 if hasattr(unit, 'conv3') else unit.conv2
    last.kernel.set_value(last.kernel.get_value() * factor)
    if last.bias is not None:
      last.bias.set_value(last.bias.get_value() * factor)


def tune_halting(model, dense: '_Dense', images, fraction: float,
                 vanilla: float, sigma: float) -> dict:
  """Sets every SACT head so that the batch uses `fraction` of `vanilla`."""
  # Box filter over the channel mean, normalised per block on x^1.
  for block in model.blocks:
    if block.steps is None:
      continue
    head = block.steps.head
    kernel = head.local_conv.kernel.get_value()
    channels = kernel.shape[-2]
    head.local_conv.kernel.set_value(
        jnp.full(kernel.shape, 1.0 / (9 * channels), kernel.dtype))
    head.local_conv.bias.set_value(
        jnp.zeros_like(head.local_conv.bias.get_value()))
    head.global_conv.kernel.set_value(
        jnp.zeros_like(head.global_conv.kernel.get_value()))
  firsts = _block_inputs(model, images)
  scales = []
  for block, x1 in zip(model.blocks, firsts):
    if block.steps is None:
      scales.append(None)
      continue
    head0 = nnx.merge(*_first_head(block))
    local = head0.local_conv(head0.activation(head0.local_bn(x1)))[..., 0]
    mean, std = float(jnp.mean(local)), float(jnp.std(local))
    scales.append((sigma / max(std, 1e-6), mean))

  def set_bias(bias):
    for block, scale in zip(model.blocks, scales):
      if scale is None:
        continue
      s, mean = scale
      head = block.steps.head
      kernel = head.local_conv.kernel.get_value()
      channels = kernel.shape[-2]
      head.local_conv.kernel.set_value(
          jnp.full(kernel.shape, s / (9 * channels), kernel.dtype))
      head.local_conv.bias.set_value(jnp.full(
          head.local_conv.bias.get_value().shape, bias - s * mean))

  lo, hi = -12.0, 12.0
  achieved = None
  for _ in range(18):
    mid = 0.5 * (lo + hi)
    set_bias(mid)
    dense.refresh()
    _, aux = dense(images)
    achieved = float(jnp.mean(aux['flops'])) / vanilla
    if abs(achieved - fraction) < 0.004:
      break
    if achieved > fraction:
      lo = mid  # Higher bias halts earlier.
    else:
      hi = mid
  return {'bias': mid, 'achieved_fraction': achieved}


def _first_head(block):
  graphdef, state = nnx.split(block.steps.head)
  return graphdef, jax.tree.map(lambda a: a[0], nnx.to_pure_dict(state))


def _blocks_alone(model, images) -> list[tuple[Callable, jax.Array]]:
  """Each block of `model` jitted alone, with its input (the model's own
  previous blocks' output): `fn(x)` returns the block output and its FLOPs
  per image `[B]` as the model counts them."""
  graphdef, state = nnx.split(model)

  def stem(state, images):
    return nnx.merge(graphdef, state).stem(images, flops_lib.FlopCounter())

  def block(state, x, index):
    counter = flops_lib.FlopCounter()
    x, _ = nnx.merge(graphdef, state).run_blocks(x, counter, index,
                                                 index + 1)
    return x, counter.per_image(x.shape[0])

  x = conv.jit(stem)(state, images)
  out = []
  for index in range(len(model.blocks)):
    fn = functools.partial(conv.jit(functools.partial(block, index=index)),
                           state)
    out.append((fn, x))
    x, _ = fn(x)
  return out


def block_breakdown(vanilla, sact, images, sparse_s: dict, reps: int
                    ) -> list[dict]:
  """Per block: the vanilla block alone and the sparse path's block.

  Args:
    vanilla, sact: the models.
    images: the batch.
    sparse_s: the sparse path's seconds per block (`SparseRunner`'s
      `timings` under `sparse.BLOCK_TIMINGS`), by index.
    reps: timed repetitions of each vanilla block.

  Returns:
    One dict per block: its input shape, vanilla seconds (min over `reps`),
    sparse seconds, FLOPs per image of the vanilla and SACT blocks (the
    latter as the model counts them, halting heads included), their ratio
    (FLOP fraction), the time ratio and the efficiency
    (`(t_vanilla / t_sparse) * flop_fraction`).
  """
  rows = []
  for index, ((vanilla_fn, x), (sact_fn, x_sact)) in enumerate(zip(
      _blocks_alone(vanilla, images), _blocks_alone(sact, images))):
    vanilla_flops = float(jnp.mean(vanilla_fn(x)[1]))
    sact_flops = float(jnp.mean(sact_fn(x_sact)[1]))
    timing = _time({'vanilla': lambda: vanilla_fn(x)}, reps)
    seconds = timing['vanilla']['wall_min']
    fraction = sact_flops / vanilla_flops
    row = {'block': index, 'input_shape': list(x.shape),
           'vanilla_s': seconds, 'vanilla_flops': vanilla_flops,
           'flops': sact_flops, 'flop_fraction': fraction}
    if index in sparse_s:
      row.update(sparse_s=sparse_s[index],
                 time_ratio=sparse_s[index] / seconds,
                 efficiency=seconds / sparse_s[index] * fraction)
    rows.append(row)
  return rows


def _time(fns: dict, reps: int) -> dict:
  """Interleaved repetitions; min and median wall and process-CPU seconds."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  samples = {k: [] for k in fns}
  loads = []
  for _ in range(reps):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      samples[name].append((time.perf_counter() - wall,
                            time.process_time() - cpu))
    loads.append(_load())
  out = {}
  for name, values in samples.items():
    values = np.array(values)
    out[name] = {'wall_min': float(values[:, 0].min()),
                 'wall_median': float(np.median(values[:, 0])),
                 'cpu_min': float(values[:, 1].min()),
                 'cpu_median': float(np.median(values[:, 1]))}
  out['load_avg_1min'] = float(np.mean(loads))
  return out


def _clustered_mask(batch: int, height: int, width: int, fraction: float,
                    seed: int = 0) -> jax.Array:
  """A blob-like mask: smoothed noise above its (1 - fraction) quantile."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  noise = np.random.default_rng(seed).normal(size=(batch, height, width))
  field = scipy.ndimage.gaussian_filter(noise, (0, height / 5, width / 5))
  return jnp.asarray(field > np.quantile(field, 1 - fraction), jnp.float32)


def _time_piece(fn: Callable, args, reps: int, donate: int | None) -> float:
  """Min wall time of `jit(fn)(*args)`, jitted as the runner's phases are
  (`conv.jit`: the library's compiler options).

  `donate`: index of a map updated in place, as in the runner (a fresh copy
  per call, made outside the timing).
  """
  if donate is None:
    jitted = conv.jit(fn)
    return _time({'piece': lambda: jitted(*args)}, reps)['piece']['wall_min']
  jitted = conv.jit(fn, donate_argnums=donate)
  copy = jax.jit(lambda a: a + 0)
  best = float('inf')
  for _ in range(reps + 1):
    fresh = list(args)
    fresh[donate] = jax.block_until_ready(copy(args[donate]))
    start = time.perf_counter()
    jax.block_until_ready(jitted(*fresh))
    best = min(best, time.perf_counter() - start)
  return best


def _planned_rows(mask_BxHxW: jax.Array, chunk: int, buckets: int
                  ) -> jax.Array:
  """The indices of `mask`'s rows that the runner's plan computes."""
  num_rows = mask_BxHxW.size
  plan = rows_lib.plan_rows(int(mask_BxHxW.sum()), chunk,
                            rows_lib.granule_for(num_rows, chunk, buckets))
  idx = rows_lib.indices(mask_BxHxW.reshape(-1),
                         rows_lib.padded_length(num_rows, chunk))
  return idx[:plan.rows]


def unit_breakdown(runner, block_index: int, x_BxHxWxC: jax.Array,
                   fraction: float, reps: int) -> dict:
  """Where one unit's time goes: gathers, matmuls, scatters, bookkeeping.

  Times, apart and in the same process, the pieces of the sparse unit of
  block `block_index` (its first stacked unit and the head after it; the
  block needs 3 units or more) at a clustered mask of `fraction` active
  positions, and the dense vanilla unit `x + f(x)`. Uses the runner's
  public pieces (`sact_block`, `stage_modules`), so the math is the one the
  runner's `stage_dilated` and `stage_active` run.
  """
  block = runner.sact_block(block_index)
  unit, head = runner.stage_modules(block_index, 0)
  if head is None:
    raise ValueError('unit_breakdown needs a block of 3 units or more.')
  costs = block.costs
  chunk_d, chunk_a = costs.chunk_dilated, costs.chunk_active
  batch, height, width, channels = x_BxHxWxC.shape
  num_rows, hw = batch * height * width, height * width
  mask = _clustered_mask(batch, height, width, fraction)
  dilated = act_lib.dilate_mask(mask)
  n_d, n_a = int(dilated.sum()), int(mask.sum())
  sel_d = _planned_rows(dilated, chunk_d, runner.options.buckets)
  sel_a = _planned_rows(mask, chunk_a, runner.options.buckets)
  rows_d, rows_a = sel_d.shape[0], sel_a.shape[0]
  x = x_BxHxWxC.reshape(num_rows, channels)
  y = jnp.zeros((num_rows + 1, block.dilated_channels))
  taps = jnp.zeros((num_rows + 1, 9))
  pieces = {}

  def timed(name, fn, *args, donate=None):
    pieces[name] = _time_piece(fn, args, reps, donate)

  def gather_d(x, idx):
    return rows_lib.patches(x, idx, unit.dilated_kernel_size, height=height,
                            width=width, num_rows=num_rows)
  patches_d, valid_d = jax.jit(gather_d)(x, sel_d)
  timed('dilated: gather patches', gather_d, x, sel_d)
  timed('dilated: unit rows (conv1 matmul, BN, act)', unit.dilated_rows,
        patches_d, valid_d)
  timed('dilated: scatter into y',
        lambda y, i, r: rows_lib.scatter_set(y, i, r), y, sel_d,
        jnp.ones((rows_d, block.dilated_channels)), donate=0)
  timed('dilated: head taps (matmul + scatter)',
        lambda t, i, r: rows_lib.scatter_set(t, i, head.local_taps(r)),
        taps, sel_d, rows_lib.gather(x, sel_d), donate=0)

  def im2col(y, idx):
    return rows_lib.patches(y, idx, 3, height=height, width=width,
                            num_rows=num_rows)[0]
  cols = jax.jit(im2col)(y, sel_a)
  timed('active: im2col gather', im2col, y, sel_a)
  timed('active: unit rows (conv matmuls, BN, act)', unit.active_rows, cols)
  res = jnp.ones((rows_a, channels))
  timed('active: gather + scatter x', lambda x, i, r: rows_lib.scatter_set(
      x, i, rows_lib.gather(x, i) + r), x, sel_a, res, donate=0)
  timed('active: scatter-add out, xsum', lambda out, xsum, i, r: (
      rows_lib.scatter_add(out, i, 0.5 * r),
      rows_lib.scatter_add(xsum, i // hw, r)), x + 0,
        jnp.zeros((batch, channels)), sel_a, res, donate=0)
  timed('active: head taps + local sums',
        lambda t, i, r: stages.head_local(head, rows_lib.scatter_set(
            t, i, head.local_taps(r)), i, height=height, width=width),
        taps, sel_a, res, donate=0)

  state = act_lib.init_state(jnp.zeros((batch, height, width, 1)),
                             (batch, height, width))
  def step_and_sets(state, halting):
    carry, sizes = block.halting_step(head, halting, state,
                                      jnp.zeros((batch,)))
    return (carry, sizes, block.index_rows(state, dilated=True),
            block.index_rows(state, dilated=False))
  timed('halting step + index sets', step_and_sets,
        state._replace(running=mask), 0.1 * mask)
  vanilla_unit = conv.jit(lambda x: x + unit.residual(x))
  whole = {}
  whole['vanilla unit (dense)'] = _time(
      {'v': lambda: vanilla_unit(x_BxHxWxC)}, reps)['v']['wall_min']
  flop_fraction = ((n_d * costs.dilated_cost + n_a * costs.active_cost)
                   / (num_rows * (costs.dilated_cost + costs.active_cost)))
  return {'block': block_index, 'shape': [batch, height, width, channels],
          'active': n_a / num_rows, 'dilated': n_d / num_rows,
          'unit_flop_fraction': flop_fraction, 'rows_dilated': rows_d,
          'rows_active': rows_a, 'pieces_s': pieces, 'whole_s': whole}


def _build_models(family: str, unrolled: bool):
  """Eval-mode vanilla, SACT and (or None) unrolled vanilla models, scaled
  residuals (`scale_residuals`), and the vanilla FLOPs per image."""
  cfg = _CONFIGS[family]
  start = time.time()
  built = []
  for model_type, seed, unroll in (('vanilla', 0, False), ('sact', 1, False),
                                   ('vanilla', 0, True)):
    if unroll and not unrolled:
      built.append(None)
      continue
    model = create_model(family, cfg['depth'], model_type,
                         num_classes=cfg['num_classes'], rngs=nnx.Rngs(seed),
                         unroll=unroll)
    model.eval()
    scale_residuals(model, _RESIDUAL_SCALE.value)
    built.append(model)
  print(f'[{family}] models built in {time.time() - start:.0f} s')
  size = cfg['size']
  vanilla_flops = models.ModelSpec.from_model(built[1]).vanilla_flops(
      (size, size, 3))
  return (*built, vanilla_flops)


def parse_shard(shard: str, batch: int) -> tuple[int, int]:
  """`--shard`'s K/N as (K, N), checked against the batch size."""
  try:
    k, n = (int(v) for v in shard.split('/'))
  except ValueError:
    raise ValueError(f'--shard must be K/N, got {shard!r}.') from None
  if not 0 <= k < n or batch % n:
    raise ValueError(f'--shard={shard}: need 0 <= K < N and N dividing the '
                     f'batch size {batch}.')
  return k, n


def serve(family: str, batch: int, fraction: float, options: dict,
          shard: tuple[int, int] = (0, 1)) -> None:
  """One workload as a lockstep server (benchmarks/lockstep.py).

  Workloads `dense` (the dense vanilla model) and `sparse` (`sparse.apply`
  at `fraction` of its FLOPs), as `measure_family` builds and tunes them;
  for benchmarks/vs_original.py's `--lockstep` claim rows. With `shard`
  (K, N) from `parse_shard`, on the K-th of N equal parts of the batch.
  """
  from benchmarks import lockstep  # pylint: disable=g-import-not-at-top
  k, n = shard
  vanilla, sact, _, vanilla_flops = _build_models(family, False)
  images = _images(batch, _CONFIGS[family]['size'])
  sact_fn = _Dense(sact)
  tune_halting(sact, sact_fn, images[:4], fraction, vanilla_flops,
               _SIGMA.value)
  part = batch // n
  images = images[k * part:(k + 1) * part]
  runner = sparse.SparseRunner(sact, **options)
  vanilla_fn = _Dense(vanilla)
  _, aux = runner(images)
  lockstep.serve(
      {'dense': lambda: jax.block_until_ready(vanilla_fn(images)),
       'sparse': lambda: jax.block_until_ready(runner(images))},
      {'impl': 'jax',
       'flop_fraction': float(jnp.mean(aux['flops'])) / vanilla_flops})


def measure_family(family: str, batch_sizes, fractions, options,
                   results: list, on_row: Callable[[], None]) -> None:
  """Appends one row per (batch, fraction) to `results`, calling `on_row`."""
  cfg = _CONFIGS[family]
  size = cfg['size']
  vanilla, sact, unrolled, vanilla_flops = _build_models(family,
                                                         _UNROLLED.value)
  vanilla_fn = _Dense(vanilla)
  unrolled_fn = _Dense(unrolled) if unrolled is not None else None
  sact_fn = _Dense(sact)
  for batch in batch_sizes:
    images = _images(batch, size)
    large = batch * size * size > 32 * 32 * 32 * 4
    reps = _REPS_LARGE.value if large else _REPS.value
    for fraction in fractions:
      # Tuned on (at most) the first 4 images: bisection runs the dense
      # model ~15 times; the fraction reported is the whole batch's.
      tuned = tune_halting(sact, sact_fn, images[:4], fraction,
                           vanilla_flops, _SIGMA.value)
      runner = sparse.SparseRunner(sact, **options)
      logits_dense, aux_dense = sact_fn(images)
      logits, aux = runner(images)
      scale = float(jnp.max(jnp.abs(logits_dense)))
      err = float(jnp.max(jnp.abs(logits - logits_dense))) / scale
      fns = {'vanilla': lambda: vanilla_fn(images),
             'sact_dense': lambda: sact_fn(images),
             'sparse': lambda: runner(images)}
      if unrolled_fn is not None:
        fns['vanilla_unrolled'] = lambda: unrolled_fn(images)
      t0 = time.time()
      timing = _time(fns, reps)
      flops_sparse = float(jnp.mean(aux['flops']))
      overhead = float(aux['flops_overhead']) / batch
      units = [{k: (int(v) if isinstance(v, jax.Array) else v)
                for k, v in u.items()} for u in runner.last_units]
      active = sum(u.get('active', 0) for u in units)
      dilated = sum(u.get('dilated', 0) for u in units)
      phases = {}
      if _BREAKDOWN.value:
        for _ in range(2):
          trial = {}
          runner(images, timings=trial)
          phases = {k: min(v, phases.get(k, v)) for k, v in trial.items()}
      blocks = []
      if _BLOCK_BREAKDOWN.value:
        prefix = sparse.BLOCK_TIMINGS
        blocks = block_breakdown(
            vanilla, sact, images,
            {int(k[len(prefix):]): v for k, v in phases.items()
             if k.startswith(prefix)}, reps)
      base = min(timing['vanilla']['wall_min'],
                 timing.get('vanilla_unrolled', timing['vanilla'])['wall_min'])
      speedup = base / timing['sparse']['wall_min']
      flop_ratio = flops_sparse / vanilla_flops
      row = {
          'family': family, 'depth': cfg['depth'], 'image_size': size,
          'batch': batch, 'target_fraction': fraction,
          'flop_fraction': flop_ratio,
          'padding_overhead_fraction': overhead / vanilla_flops,
          'dilated_over_active': dilated / max(active, 1),
          'dense_units': sum(1 for u in units if u.get('dense')),
          'device_loop_blocks': sum(1 for u in units if 'steps' in u),
          'sparse_units': sum(1 for u in units if 'dense' in u and
                              not u['dense']),
          'logits_rel_err': err,
          'tuning': tuned,
          'timing': timing,
          'baseline_s': base,
          'speedup': speedup,
          'efficiency': speedup * flop_ratio,
          'sparse_vs_sact_dense': (timing['sact_dense']['wall_min']
                                   / timing['sparse']['wall_min']),
          'phases_s': phases,
          'blocks': blocks,
          'units': units,
          'seconds_measuring': time.time() - t0,
      }
      results.append(row)
      on_row()
      _print_row(row)
    if _UNIT_BREAKDOWN.value >= 0:
      index = _UNIT_BREAKDOWN.value
      channels = sact.blocks[index].steps.unit.cin
      side = size // 4 // 2**index if family == 'imagenet' else size // 2**index
      x = jnp.asarray(np.random.default_rng(0).normal(
          size=(batch, side, side, channels)), jnp.float32)
      breakdown = unit_breakdown(runner, index, x, 0.5, reps)
      breakdown.update(family=family, batch=batch)
      results.append({'unit_breakdown': breakdown})
      on_row()
      _print_breakdown(breakdown)


def _print_breakdown(b):
  pieces = b['pieces_s']
  total = sum(pieces.values())
  print(f"   unit of block {b['block']} {tuple(b['shape'])}, "
        f"{b['active']:.2f} active / {b['dilated']:.2f} dilated "
        f"(unit FLOP fraction {b['unit_flop_fraction']:.2f}; rows "
        f"{b['rows_dilated']}, {b['rows_active']}); pieces timed apart:")
  for name, seconds in pieces.items():
    print(f'     {name:44s} {seconds * 1e3:7.2f} ms  '
          f'{100 * seconds / total:4.0f}%')
  vanilla = b['whole_s']['vanilla unit (dense)']
  print(f'     {"sum of pieces":44s} {total * 1e3:7.2f} ms;'
        f' vanilla unit {vanilla * 1e3:.2f} ms (ratio '
        f'{total / vanilla:.2f} at FLOP fraction '
        f"{b['unit_flop_fraction']:.2f})", flush=True)


def _describe(unit: dict) -> str:
  if 'active' in unit:
    return f"{unit['active'] / unit['rows']:.2f}" + ('D' if unit['dense']
                                                      else '')
  if 'units_skipped' in unit:
    return f"skip{unit['units_skipped']}"
  if 'steps' in unit:
    return f"device_loop({unit['steps']} units)"
  return str(unit)


def _print_row(row):
  t = row['timing']
  print(f"{row['family']:8s} b{row['batch']:<3d} "
        f"flops {row['flop_fraction']:.3f}"
        f" vanilla {t['vanilla']['wall_min'] * 1e3:8.1f}"
        + (f" unrolled {t['vanilla_unrolled']['wall_min'] * 1e3:8.1f}"
           if 'vanilla_unrolled' in t else '')
        + f" sact_dense {t['sact_dense']['wall_min'] * 1e3:8.1f}"
        f" sparse {t['sparse']['wall_min'] * 1e3:8.1f} ms"
        f"  speedup {row['speedup']:.2f} eff {row['efficiency']:.2f}"
        f"  load {t['load_avg_1min']:.1f}", flush=True)
  print('   units (active fraction, D = run densely): ' + ' '.join(
      _describe(u) for u in row['units']), flush=True)
  phases = {k: v for k, v in row['phases_s'].items()
            if not k.startswith(sparse.BLOCK_TIMINGS)}
  if phases:
    total = sum(phases.values())
    print('   phases: ' + ', '.join(
        f'{k} {v * 1e3:.1f}' for k, v in sorted(
            phases.items(), key=lambda kv: -kv[1]))
          + f' (sum {total * 1e3:.1f} ms)', flush=True)
  if row['blocks']:
    print('   block  input shape         vanilla ms sparse ms  FLOP fraction'
          '  time ratio  efficiency')
  for b in row['blocks']:
    shape = 'x'.join(str(d) for d in b['input_shape'])
    line = f"   {b['block']:5d}  {shape:18s} {b['vanilla_s'] * 1e3:10.1f}"
    if 'sparse_s' in b:
      line += (f" {b['sparse_s'] * 1e3:9.1f}  {b['flop_fraction']:13.3f}"
               f"  {b['time_ratio']:10.2f}  {b['efficiency']:10.2f}")
    else:  # The blocks ran as one program (`whole_model`).
      line += f" {'-':>9s}  {b['flop_fraction']:13.3f}"
    print(line, flush=True)


def _numbers(flag, kind, valid, what: str) -> list:
  """A list flag's values as numbers, or a one-line UsageError."""
  try:
    values = [kind(v) for v in flag.value]
  except ValueError:
    values = []
  if not values or not all(valid(v) for v in values):
    raise app.UsageError(f'--{flag.name}={",".join(flag.value)}: each must '
                         f'be {what}.')
  return values


def _units_per_block(family: str) -> tuple[int, ...]:
  presets = (models.CIFAR_PRESETS if family == 'cifar'
             else models.IMAGENET_PRESETS)
  return presets[_CONFIGS[family]['depth']]


def check_flags() -> dict:
  """The flags checked before any model is built (a typo would fail
  minutes in, or not at all); returns the sparse options."""
  benchmarks.check_choices(_FAMILIES, _CONFIGS)
  benchmarks.check_positive_ints(_BATCH_SIZES)
  _numbers(_FRACTIONS, float, lambda f: 0.0 < f <= 1.0, 'in (0, 1]')
  benchmarks.check_at_least(1, _REPS, _REPS_LARGE)
  # The breakdown runs after the family's rows: a bad block failed there.
  block = _UNIT_BREAKDOWN.value
  for family in _FAMILIES.value:
    units = _units_per_block(family)
    if block != -1 and not (0 <= block < len(units) and units[block] >= 3):
      usable = [str(i) for i, n in enumerate(units) if n >= 3]
      raise app.UsageError(
          f'--unit_breakdown_block={block}: {family} has blocks '
          f'{", ".join(usable)} of 3 units or more (or -1: none).')
  try:
    options = json.loads(_SPARSE_OPTIONS.value)
  except json.JSONDecodeError as e:
    raise app.UsageError(f'--sparse_options is not JSON: {e}') from None
  if not isinstance(options, dict):
    raise app.UsageError('--sparse_options is not a JSON object.')
  try:
    sparse.SparseOptions(**options)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f'--sparse_options: {e}') from None
  return options


def main(argv):
  del argv
  options = check_flags()
  if _SHARD.value != '0/1' and not _SERVE.value:
    raise app.UsageError('--shard needs --serve.')
  if _SERVE.value:
    if len(_FAMILIES.value) * len(_BATCH_SIZES.value) * len(
        _FRACTIONS.value) != 1:
      raise app.UsageError('--serve takes one family, batch size and '
                           'fraction.')
    try:
      shard = parse_shard(_SHARD.value, int(_BATCH_SIZES.value[0]))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  else:
    out = benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)
  benchmarks.start_process(_REUSE.value, _CACHE.value)
  results = []
  device = jax.devices()[0]
  header = {'machine': platform.machine(), 'cpus': os.cpu_count(),
            'backend': jax.default_backend(),
            'device': getattr(device, 'device_kind', str(device)),
            'jax': jax.__version__, 'options': options}

  def write():
    # Rewritten after each row, so that a run cut short keeps its rows.
    evaluate.save_json(dict(header, results=results), out)

  print(f"backend {header['backend']} ({header['device']}), jax "
        f'{jax.__version__}', flush=True)
  if _SERVE.value:
    serve(_FAMILIES.value[0], int(_BATCH_SIZES.value[0]),
          float(_FRACTIONS.value[0]), options, shard)
    return
  for family in _FAMILIES.value:
    measure_family(family, [int(b) for b in _BATCH_SIZES.value],
                   [float(f) for f in _FRACTIONS.value], options,
                   results, write)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
