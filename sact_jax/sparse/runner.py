"""Inference that performs only the computation ACT and SACT keep.

The dense models compute every unit at every position and multiply by the
halting mask, as the reference does. `SparseRunner` runs the same weights so
that the saved FLOPs become saved time:

* vanilla: the model itself;
* ACT: a unit is skipped once every image of the batch has halted (the
  reference's early stopping);
* SACT: units 2..L of a block run only at their active positions (plus the
  dilated set for the convs that feed a 3x3 conv), gathered into rows
  (`rows.py`, `stages.py`); a halting head scores only the positions still
  running (its local conv as per-row tap products on the dilated set plus a
  neighbour sum) and takes its global term from the mean of the whole map,
  kept as per-image sums updated with each unit's residuals.

A host loop drives the units: each unit is one or two calls to jitted
functions (the unit's parameters are arguments, so every unit of a block
shares one compilation), and the host reads the number of active positions
after each unit to choose the row plan of the next one. Plans depend on the
counts only through a bucketed tail size (`rows.plan_rows`), so jit compiles
a bounded number of shapes per map size, never one per input. On this CPU
the per-call dispatch and the count read-back cost tens of microseconds per
unit; one jitted program looping over chunks of few rows measured 1.5x
slower (small matmuls), and `lax.switch` over capacities was slower still
(ENVIRONMENT.md). Blocks whose units are too cheap for a host round trip
(CIFAR at small batch) run in one `lax.while_loop` instead, and each unit
runs at rows or densely, whichever a cost model of gathers favours
(`SparseOptions`).

FLOPs follow `flops.py` exactly: `aux['flops']` equals the dense model's
count (and is what the convs compute at real rows); conv FLOPs spent on
padding rows of the buckets, on units run densely, or (ACT) on images that
halted while others in the batch ran on are reported separately in
`aux['flops_overhead']` (a scalar for the whole batch).
"""

import collections
import dataclasses
import functools
import math
import time
import types
from typing import Any, Callable
import weakref

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sact_jax import act as act_lib
from sact_jax import flops as flops_lib
from sact_jax.models import base
from sact_jax.sparse import rows as rows_lib
from sact_jax.sparse import stages

ACT_LOOPS = ('host', 'device')
SACT_MODES = ('auto', 'rows', 'dense', 'device')


@dataclasses.dataclass(frozen=True)
class SparseOptions:
  """Knobs of the sparse path (defaults measured on the 2-core CPU).

  Attributes:
    buckets: tail sizes per chunk: a unit wastes at most `chunk / buckets`
      rows (or `N / buckets` when the whole map is smaller than a chunk) and
      jit compiles at most `buckets + 1` tail shapes per stage, map size and
      head/no head.
    chunk_bytes: target size of the gathered rows of one chunk; rows beyond
      it are processed in a loop (keeps im2col buffers in cache at large
      batch sizes).
    chunk_rows: fixed rows per chunk, overriding `chunk_bytes` (tests force
      tiny chunks to exercise the loop).
    sact_mode: how SACT units 2..L run. 'rows': at their active and dilated
      rows (gathered); 'dense': on the whole map, masked (a host loop that
      still stops once every position has halted); 'device': a block's
      units in one `lax.while_loop`, dense and masked, stopping once every
      position has halted (no host round trip per unit); 'auto': 'device'
      for blocks whose units are cheap (`device_flops`), else per unit
      'rows' or 'dense', whichever the cost model (`gather_cost`) favours.
    gather_cost: for 'auto', the cost of moving one float through a gather
      or scatter, in FLOPs (measured on the 2-core CPU: about 0.6 ns, at
      about 50 GFLOP/s).
    slice_cost: for 'auto', the cost of one gathered or scattered row
      segment, in FLOPs (measured: about 15 ns). Rows pay when a unit's
      convs do many FLOPs per gathered float and segment (wide channels): a
      CIFAR unit (16-64 channels, 16-float neighbour segments) needs an
      active fraction under about 0.3, an ImageNet bottleneck under about
      0.75-0.85.
    unit_cost: for 'auto', what running a unit at rows costs beyond its
      FLOPs, gathers and segments, in FLOPs: the halting head's second pass,
      index sets and extra kernels (measured: a block-3 unit of ImageNet
      ResNet-101 at batch 1 with a handful of rows takes about 0.9 ms more
      than its FLOPs). It matters only when a dense unit is cheap (small
      batches): it moves ImageNet units at batch 1 with 75-90% of their
      positions active to dense, which measured 10-15% less CPU time there.
    device_flops: under 'auto', blocks whose dense unit costs fewer FLOPs
      (for the whole batch) run in 'device' mode: per-call dispatch and
      the count read-back would cost more than the unit. None: 50e6 on the
      CPU; on other backends every block ('device' mode), since a GPU runs
      a whole unit of these networks (H200: 0.1-0.25 ms for CIFAR and
      ImageNet units up to batch 32) in less time than the gather, scatter
      and read-back kernels of the row path cost apart (each about 0.07 ms;
      benchmarks/sparse_inference.py).
    act_loop: 'host' (a jitted call per unit, the host checks whether any
      image is still running) or 'device' (one `lax.while_loop` over the
      units of a block; unit parameters are sliced on the device).
    pipeline: plan a SACT unit from the counts of the unit before it (an
      upper bound: halted positions never resume), so that the host does
      not wait for the unit it just queued, when the active count fell by
      at most this fraction of the positions at the previous unit (the
      rows that halted in between become padding); otherwise, and with 0,
      wait for the exact counts.
    compiler_options: XLA compiler options for every jitted phase, as
      `(name, value)` pairs (e.g. `(('xla_backend_optimization_level', 0),)`
      halves compile times for tests, at a large cost in speed).
  """
  buckets: int = 16
  chunk_bytes: int = 2 << 20
  chunk_rows: int | None = None
  sact_mode: str = 'auto'
  gather_cost: float = 30.0
  slice_cost: float = 750.0
  unit_cost: float = 45e6
  device_flops: float | None = None
  act_loop: str = 'host'
  pipeline: float = 0.05
  compiler_options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.buckets < 1:
      raise ValueError(f'buckets must be >= 1, got {self.buckets}.')
    if self.chunk_bytes < 1:
      raise ValueError(f'chunk_bytes must be >= 1, got {self.chunk_bytes}.')
    if self.chunk_rows is not None and self.chunk_rows < 1:
      raise ValueError(f'chunk_rows must be >= 1, got {self.chunk_rows}.')
    if self.sact_mode not in SACT_MODES:
      raise ValueError(f'sact_mode must be one of {SACT_MODES}, got '
                       f'{self.sact_mode!r}.')
    if min(self.gather_cost, self.slice_cost, self.unit_cost) < 0:
      raise ValueError('gather_cost, slice_cost and unit_cost must be >= 0, '
                       f'got {self.gather_cost}, {self.slice_cost}, '
                       f'{self.unit_cost}.')
    if self.act_loop not in ACT_LOOPS:
      raise ValueError(f'act_loop must be one of {ACT_LOOPS}, got '
                       f'{self.act_loop!r}.')


def _chunk(options: SparseOptions, floats_per_row: int) -> int:
  """Rows per chunk: a power of two near `chunk_bytes` of gathered rows."""
  if options.chunk_rows is not None:
    return options.chunk_rows
  rows = options.chunk_bytes // (4 * floats_per_row)
  return int(min(16384, max(16, 2 ** int(math.log2(max(rows, 1))))))


def _graphdef(module: nnx.Module):
  return nnx.split(module)[0]


def _pure(module: nnx.Module) -> dict:
  """The module's variables as a nested dict of arrays (cheap to pass)."""
  return nnx.to_pure_dict(nnx.split(module)[1])


@jax.jit
def _unstack(tree):
  """Per-unit slices of stacked parameters (one device call, cached)."""
  count = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(count)]


def _pick(tree, i: jax.Array):
  """Slice `i` (traced) of stacked parameters, inside a device loop."""
  return jax.tree.map(
      lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _dummy(batch_shape) -> jax.Array:
  """A `[..., 1]` stand-in for unit outputs in `act_lib.step`.

  The sparse path accumulates the halting-weighted output itself (see
  `_SactBlock`), so the state's accumulator only needs a valid shape.
  """
  return jnp.zeros((*batch_shape, 1), jnp.float32)


class _Params:
  """The model's weights as plain arrays, unit parameters pre-sliced.

  Rebuilt whenever a Variable of the model holds a new value, so a runner
  always uses the current weights.
  """

  def __init__(self, model: nnx.Module):
    self.variables = [(v, v.get_raw_value())
                      for _, v in nnx.iter_graph(model)
                      if isinstance(v, nnx.Variable)]
    self.top = {name: _pure(module)
                for name, module in _top_modules(model).items()}
    self.model = _pure(model) if model.model_type == 'vanilla' else None
    self.blocks = []
    for block in model.blocks:
      entry = types.SimpleNamespace(first=_pure(block.first), units=None,
                                    heads=None, stacked_units=None,
                                    stacked_heads=None)
      if block.steps is not None and model.model_type != 'vanilla':
        entry.stacked_units = _pure(block.steps.unit)
        entry.units = _unstack(entry.stacked_units)
        entry.stacked_heads = _pure(block.steps.head)
        entry.heads = _unstack(entry.stacked_heads)
      self.blocks.append(entry)

  def current(self) -> bool:
    return all(v.get_raw_value() is value for v, value in self.variables)


def _top_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """The layers outside the blocks (stem, head), by attribute name."""
  return {name: module for name, module in vars(model).items()
          if isinstance(module, nnx.Module) and name != 'blocks'}


def _check_eval(model: nnx.Module):
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
      raise ValueError('sparse inference needs a model in eval mode (call '
                       'model.eval()): its BatchNorm layers use batch '
                       'statistics.')


class SparseRunner:
  """Runs a model's inference skipping halted units and positions.

  Attributes:
    trace_counts: how many times each jitted phase was traced (compiled),
      by phase name.
    last_units: per-unit records of the last call (SACT: counts, mode, row
      plans; ACT: units run).
  """

  def __init__(self, model: nnx.Module, options: SparseOptions | None = None,
               **kwargs):
    if options is None:
      options = SparseOptions(**kwargs)
    elif kwargs:
      raise ValueError('Pass either options or keyword options, not both.')
    if not isinstance(model, base.AdaptiveResNet):
      raise TypeError('SparseRunner takes a model built by create_model, got '
                      f'{type(model).__name__}.')
    self.options = options
    if options.device_flops is not None:
      self.device_flops = options.device_flops
    else:
      self.device_flops = 50e6 if jax.default_backend() == 'cpu' else math.inf
    self.jit = functools.partial(
        jax.jit, compiler_options=dict(options.compiler_options) or None)
    self.model_type = model.model_type
    self._model_ref = weakref.ref(model)
    self._model_cls = type(model)
    self._params = None
    self._top_graphdefs = {name: _graphdef(module)
                           for name, module in _top_modules(model).items()}
    self._model_graphdef = _graphdef(model)
    self.trace_counts = collections.Counter()
    self.last_units = []
    self._blocks = []
    for block in model.blocks:
      if block.steps is not None and self.model_type == 'sact':
        stages.check_unit(block.steps.unit)
      self._blocks.append(
          _SactBlock(self, block) if self.model_type == 'sact'
          else _ActBlock(self, block) if self.model_type == 'act'
          else None)
    self._stem = self.jit(self._stem_fn)
    self._head = self.jit(self._head_fn)
    self._vanilla = self.jit(self._vanilla_fn)

  # Bookkeeping ---------------------------------------------------------

  def _trace(self, name: str):
    self.trace_counts[name] += 1

  def _model(self) -> nnx.Module:
    model = self._model_ref()
    if model is None:
      raise RuntimeError('The model of this SparseRunner no longer exists.')
    return model

  def _refresh(self):
    if self._params is None or not self._params.current():
      model = self._model()
      _check_eval(model)
      self._params = _Params(model)
    return self._params

  def _view(self, top_pure: dict) -> types.SimpleNamespace:
    """The model's non-block layers, for its own `stem` and `head` code."""
    return types.SimpleNamespace(**{
        name: nnx.merge(self._top_graphdefs[name], pure)
        for name, pure in top_pure.items()})

  # Jitted model-level phases -------------------------------------------

  def _stem_fn(self, top_pure, images):
    self._trace('stem')
    counter = flops_lib.FlopCounter()
    x = self._model_cls.stem(self._view(top_pure), images, counter)
    return x, counter.per_image(images.shape[0])

  def _head_fn(self, top_pure, x, flops_B, ponder_costs):
    self._trace('head')
    counter = flops_lib.FlopCounter()
    logits = self._model_cls.head(self._view(top_pure), x, counter)
    ponder_loss = sum((jnp.mean(p) for p in ponder_costs),
                      jnp.zeros((), jnp.float32))
    return logits, flops_B + counter.per_image(x.shape[0]), ponder_loss

  def _vanilla_fn(self, pure, images):
    self._trace('vanilla')
    return nnx.merge(self._model_graphdef, pure)(images)

  # Running -------------------------------------------------------------

  def __call__(self, images_BxHxWx3: jax.Array,
               timings: dict[str, float] | None = None
               ) -> tuple[jax.Array, dict]:
    """Same `(logits, aux)` as `model(images)`, plus `aux['flops_overhead']`.

    Args:
      images_BxHxWx3: input images.
      timings: if given, every phase is waited for and its wall-clock
        seconds are added under its name (for benchmarks; slows the run).
    """
    base.check_images(images_BxHxWx3)
    images = jnp.asarray(images_BxHxWx3, jnp.float32)
    params = self._refresh()
    top_pure = params.top
    self.last_units = []
    clock = _Clock(timings)

    if self.model_type == 'vanilla':
      logits, aux = clock('vanilla', self._vanilla, params.model, images)
      aux = dict(aux)
      aux['flops_overhead'] = jnp.zeros((), jnp.float32)
      return logits, aux

    x, flops_B = clock('stem', self._stem, top_pure, images)
    ponder_costs, num_units = [], []
    overhead = 0
    for runner_block, block_params in zip(self._blocks, params.blocks):
      x, ponder, units, flops_B, waste = runner_block.run(
          block_params, x, flops_B, clock)
      overhead += waste
      ponder_costs.append(ponder)
      num_units.append(units)
    logits, flops_B, ponder_loss = clock('head', self._head, top_pure, x,
                                         flops_B, ponder_costs)
    aux = {
        'flops': flops_B,
        'ponder_cost': ponder_costs,
        'num_units': num_units,
        'ponder_loss': ponder_loss,
        'flops_overhead': (overhead if isinstance(overhead, jax.Array)
                           else jnp.asarray(float(overhead), jnp.float32)),
    }
    return logits, aux


class _Clock:
  """Calls jitted phases; optionally waits for each and sums the times."""

  def __init__(self, timings: dict[str, float] | None):
    self.timings = timings

  def __call__(self, name: str, fn: Callable, *args, **kwargs):
    if self.timings is None:
      return fn(*args, **kwargs)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    self.timings[name] = (self.timings.get(name, 0.0)
                          + time.perf_counter() - start)
    return out

  def host(self, name: str, start: float):
    if self.timings is not None:
      self.timings[name] = (self.timings.get(name, 0.0)
                            + time.perf_counter() - start)


def _counts(values: jax.Array, clock: _Clock) -> tuple[int, ...]:
  """Reads small device integers on the host (waits for the device)."""
  start = time.perf_counter()
  out = tuple(int(v) for v in np.asarray(values))
  clock.host('sync', start)
  return out


class _SactBlock:
  """Jitted phases and the host loop of one SACT block.

  The block's state lives in flat maps (`maps`, donated to every phase so
  XLA updates them in place): `x` `[N, C]` (the current unit input), `out`
  `[N, C]` (the halting-weighted block output), `y` `[N + 1, D]` (the
  dilated stage's output) and `taps` `[N + 1, 9]` (the next head's per-tap
  products, `stages.head_taps`), the last row of the two latter zero
  (padding); `xsum` `[B, C]` holds per-image sums of `x` for the heads'
  global term.

  Instead of adding `p^l x^l` at every position after each unit, `out`
  starts as `x^1` and each unit adds `(1 - c^{l-1}) f^l(x^{l-1})` at its
  active rows, `c^{l-1}` being the cumulative halting score before the unit:
  the same sum regrouped (`x^l = x^1 + sum_{j<=l} f^j`, the weights sum to
  1), touching active rows only.

  Per unit the host makes two calls: `stage_a` (dilated rows: the dilated
  stage, and the next head's tap products of rows this unit leaves
  unchanged) and `stage_b` (active rows: the rest of the unit, the tap
  products of the updated rows, then the next head's local sums at the
  active rows, the halting step and the next unit's index sets, whose sizes
  the host reads back to plan the next unit).
  """

  def __init__(self, runner: SparseRunner, block: nnx.Module):
    self.runner = runner
    self.num_units = block.num_units
    self.eps = block.eps
    self.first_gd = _graphdef(block.first)
    self.stride = block.first.stride
    if block.steps is None:
      self.single = runner.jit(self._single)
      return
    opts = runner.options
    unit, head = block.steps.unit, block.steps.head
    self.unit_gd = _graphdef(unit)
    self.head_gd = _graphdef(head)
    self.dilated_cost = unit.dilated_cost
    self.active_cost = unit.active_cost
    self.local_cost = flops_lib.conv_cost(head.local_conv)
    self.global_cost = flops_lib.conv_cost(head.global_conv)
    channels = unit.preact.num_features
    self.mid = stages.dilated_channels(unit)
    k1 = math.prod(unit.conv1.kernel_size)
    # Floats per gathered row: stage A reads k1 * C and writes `mid`; stage
    # B reads a 3x3 im2col of `mid` and writes C.
    self.chunk_d = _chunk(opts, k1 * channels + self.mid)
    self.chunk_a = _chunk(opts, 10 * self.mid + channels)
    # Floats gathered or scattered per row, for the cost model: stage A
    # reads its conv input (and the rows for the head's taps) and writes
    # `mid`; stage B reads a 3x3 im2col and `x`, writes `x`, `out`, `xsum`;
    # a dense unit streams about 3 maps of C (masked update, `out`, `xsum`).
    self.floats_d = k1 * channels + channels + self.mid
    self.floats_a = 9 * self.mid + 4 * channels
    self.floats_dense = 3 * channels
    # Row segments: stage A gathers k1 neighbours (and the row for the
    # taps) and scatters `y`; stage B gathers 9 neighbours and `x`, and
    # scatters `x`, `out`, `xsum` and the taps.
    self.slices_d = k1 + 2
    self.slices_a = 9 + 5
    self.start = runner.jit(self._start)
    self.device_loop = runner.jit(self._device_loop)
    self.stage_a = runner.jit(
        self._stage_a, static_argnames=('tail', 'hw', 'with_head'),
        donate_argnames=('maps',))
    self.stage_b = runner.jit(
        self._stage_b, static_argnames=('tail', 'dense', 'with_head'),
        donate_argnames=('maps',))
    self.finish = runner.jit(self._finish)

  # Jitted phases ---------------------------------------------------------

  def out_hw(self, in_hw: tuple[int, int]) -> int:
    """Positions of the block's maps for an input of `in_hw`."""
    return math.prod(-(-s // self.stride) for s in in_hw)

  def _single(self, first_pure, x_in, flops_B):
    """A block of one unit: dense, ponder cost 2, one unit used."""
    self.runner._trace('block_single')
    first = nnx.merge(self.first_gd, first_pure)
    x = first(x_in)
    batch, height, width = x.shape[:3]
    flops_B = flops_B + first.dense_flops(
        x_in.shape[1] * x_in.shape[2], height * width)
    state = act_lib.init_state(_dummy((batch, height, width)),
                               (batch, height, width))
    state = act_lib.finish(state, _dummy((batch, height, width)), self.eps)
    return x, state.ponder_cost, state.num_units, flops_B

  def _step(self, head, halting_BxHxW, state, flops_B):
    """Halting step; set sizes and FLOPs of the next unit.

    The index sets themselves are built by the stages that use them
    (`_rows`), so units run densely never pay for them.
    """
    flops_B = flops_B + head.flops(state.running)
    state = act_lib.step(state, halting_BxHxW,
                         _dummy(halting_BxHxW.shape), self.eps)
    mask = state.running
    dilated = act_lib.dilate_mask(mask)
    flops_B = (flops_B
               + flops_lib.spatial_count(dilated) * self.dilated_cost
               + flops_lib.spatial_count(mask) * self.active_cost)
    counts = jnp.stack([jnp.sum(dilated > 0), jnp.sum(mask > 0)])
    return {'state': state, 'flops': flops_B}, counts.astype(jnp.int32)

  def _start(self, first_pure, head_pure, x_in, flops_B):
    """First unit and first head, densely (every position runs them)."""
    self.runner._trace('block_start')
    first = nnx.merge(self.first_gd, first_pure)
    x = first(x_in)
    batch, height, width, channels = x.shape
    num_rows = batch * height * width
    flops_B = flops_B + first.dense_flops(
        x_in.shape[1] * x_in.shape[2], height * width)
    head = nnx.merge(self.head_gd, head_pure)
    state = act_lib.init_state(_dummy((batch, height, width)),
                               (batch, height, width))
    small, counts = self._step(head, stages.head_dense(head, x), state,
                               flops_B)
    x_NxC = x.reshape(num_rows, channels)
    maps = {
        'x': x_NxC,
        'out': x_NxC,
        'y': jnp.zeros((num_rows + 1, self.mid), x.dtype),
        'taps': jnp.zeros((num_rows + 1, 9), x.dtype),
        'xsum': jnp.sum(x, axis=(1, 2)),
    }
    return maps, small, counts

  def _rows(self, state, dilated: bool) -> jax.Array:
    """Padded flat indices of the (dilated) running positions."""
    mask = state.running
    if dilated:
      mask = act_lib.dilate_mask(mask)
    chunk = self.chunk_d if dilated else self.chunk_a
    return rows_lib.indices(mask.reshape(-1),
                            rows_lib.padded_length(mask.size, chunk))

  def _stage_a(self, unit_pure, head_pure, maps, state, n_full, *, tail, hw,
               with_head):
    """The dilated stage at the dilated rows, into `y`; next head's taps.

    Tap products are computed from the rows before the unit's update: right
    for the rows the unit leaves unchanged, and overwritten in `stage_b` for
    the active rows.
    """
    self.runner._trace('stage_a')
    unit = nnx.merge(self.unit_gd, unit_pure)
    head = nnx.merge(self.head_gd, head_pure) if with_head else None
    height, width = hw
    x = maps['x']
    def body(idx_S, carry):
      y, taps = carry
      rows = stages.dilated_stage(unit, x, idx_S, height=height, width=width)
      y = rows_lib.scatter_set(y, idx_S, rows)
      if with_head:
        taps = rows_lib.scatter_set(
            taps, idx_S, stages.head_taps(head, rows_lib.gather(x, idx_S)))
      return y, taps
    idx_d = self._rows(state, dilated=True)
    y, taps = rows_lib.row_loop(idx_d, n_full, self.chunk_d, tail, body,
                                (maps['y'], maps['taps']))
    return dict(maps, y=y, taps=taps)

  def _stage_b(self, unit_pure, head_pure, maps, small, n_full, *, tail,
               dense, with_head):
    """The rest of the unit at its active rows, then the next head.

    Updates `x`, `out`, `xsum`; with a head, also its tap products at the
    updated rows, its scores at the active rows (the only ones that matter:
    `act.step` ignores halted positions), the halting step and the index
    sets and counts of the next unit (without a head, `None` for both: the
    halting state is unchanged).
    """
    self.runner._trace('stage_b')
    unit = nnx.merge(self.unit_gd, unit_pure)
    head = nnx.merge(self.head_gd, head_pure) if with_head else None
    state = small['state']
    batch, height, width = state.running.shape
    hw = height * width
    x, out, xsum, taps = maps['x'], maps['out'], maps['xsum'], maps['taps']
    num_rows, channels = x.shape
    if dense:
      x_map = x.reshape(batch, height, width, channels)
      residual = unit.residual(x_map)
      new_x = act_lib.masked_residual(x_map, residual, state.running)
      weight = (state.running * (1.0 - state.cumulative))[..., None]
      out = out + (weight * residual).reshape(num_rows, channels)
      maps = dict(maps, x=new_x.reshape(num_rows, channels), out=out,
                  xsum=jnp.sum(new_x, axis=(1, 2)))
      if not with_head:
        return maps, None, None
      small, counts = self._step(head, stages.head_dense(head, new_x), state,
                                 small['flops'])
      return maps, small, counts

    cumulative_N = state.cumulative.reshape(-1)
    y = maps['y']
    def body(idx_S, carry):
      x, out, xsum, taps = carry
      residual = stages.active_stage(unit, y, idx_S, height=height,
                                     width=width)
      weight = 1.0 - rows_lib.gather(cumulative_N, idx_S)
      # Gather, add, set (not scatter-add): the new rows feed the head's
      # taps, and the data dependency lets XLA update `x` in place.
      new_rows = rows_lib.gather(x, idx_S) + residual
      if with_head:
        taps = rows_lib.scatter_set(taps, idx_S,
                                    stages.head_taps(head, new_rows))
      x = rows_lib.scatter_set(x, idx_S, new_rows)
      out = rows_lib.scatter_add(out, idx_S, weight[:, None] * residual)
      xsum = rows_lib.scatter_add(xsum, idx_S // hw, residual)
      return x, out, xsum, taps
    idx_a = self._rows(state, dilated=False)
    x, out, xsum, taps = rows_lib.row_loop(idx_a, n_full, self.chunk_a, tail,
                                           body, (x, out, xsum, taps))
    maps = dict(maps, x=x, out=out, xsum=xsum, taps=taps)
    if not with_head:
      return maps, None, None

    global_B = stages.head_global(head, xsum, hw)
    def head_body(idx_S, halting_N):
      local = stages.head_local(head, taps, idx_S, height=height,
                                width=width)
      halting = jax.nn.sigmoid(local + rows_lib.gather(global_B, idx_S // hw))
      return rows_lib.scatter_set(halting_N, idx_S, halting)
    halting_N = rows_lib.row_loop(idx_a, n_full, self.chunk_a, tail,
                                  head_body, jnp.zeros((num_rows,), x.dtype))
    small, counts = self._step(head, halting_N.reshape(batch, height, width),
                               state, small['flops'])
    return maps, small, counts

  def _device_loop(self, first_pure, stacked_units, stacked_heads, x_in,
                   flops_B):
    """The whole block on the device: dense masked units in a while loop.

    Numerically the dense model's block (`blocks.py`), except that the loop
    stops once no position runs; the heads it then skips still add their
    global conv FLOPs, as the reference counts them. Iteration i runs unit
    i+2 and then the head of unit i+2 (stacked at index i+1). Returns the
    block output, ponder cost, units, FLOPs, the FLOPs computed beyond the
    count (at halted positions; the head computed after the last unit) and
    the number of units run after the first.
    """
    self.runner._trace('block_device_loop')
    first = nnx.merge(self.first_gd, first_pure)
    x = first(x_in)
    batch, height, width = x.shape[:3]
    num_rows = batch * height * width
    flops_B = flops_B + first.dense_flops(
        x_in.shape[1] * x_in.shape[2], height * width)
    last = self.num_units - 2

    def apply_head(i, x, state, flops_B, waste):
      head = nnx.merge(self.head_gd, _pick(stacked_heads, i))
      flops_B = flops_B + head.flops(state.running)
      waste = waste + (num_rows - jnp.sum(state.running)) * self.local_cost
      state = act_lib.step(state, stages.head_dense(head, x), x, self.eps)
      return state, flops_B, waste

    state = act_lib.init_state(x, (batch, height, width))
    state, flops_B, waste = apply_head(0, x, state, flops_B,
                                       jnp.zeros((), jnp.float32))

    def cond(loop):
      i, _, state, _, _ = loop
      return (i <= last) & jnp.any(state.running > 0)

    def body(loop):
      i, x, state, flops_B, waste = loop
      unit = nnx.merge(self.unit_gd, _pick(stacked_units, i))
      mask = state.running
      dilated_B = flops_lib.spatial_count(act_lib.dilate_mask(mask))
      active_B = flops_lib.spatial_count(mask)
      flops_B = (flops_B + dilated_B * self.dilated_cost
                 + active_B * self.active_cost)
      waste = waste + ((num_rows - jnp.sum(dilated_B)) * self.dilated_cost
                       + (num_rows - jnp.sum(active_B)) * self.active_cost)
      x = act_lib.masked_residual(x, unit.residual(x), mask)
      # The head of the next unit; after the last unit it is computed (on a
      # clamped index) and dropped.
      headed = apply_head(jnp.minimum(i + 1, last), x, state, flops_B, waste)
      dropped = (state, flops_B, waste + num_rows * self.local_cost
                 + batch * self.global_cost)
      state, flops_B, waste = jax.tree.map(
          lambda a, b: jnp.where(i < last, a, b), headed, dropped)
      return i + 1, x, state, flops_B, waste

    steps, x, state, flops_B, waste = lax.while_loop(
        cond, body, (jnp.int32(0), x, state, flops_B, waste))
    flops_B = (flops_B
               + (last - jnp.minimum(steps, last)) * self.global_cost)
    state = act_lib.finish(state, x, self.eps)
    return (state.output, state.ponder_cost, state.num_units, flops_B, waste,
            steps)

  def _finish(self, maps, small, skipped_heads):
    """The last halting step and the block output.

    Heads skipped because every position had halted still add their global
    conv FLOPs: the reference counts it for every unit.
    """
    self.runner._trace('block_finish')
    state = small['state']
    batch, height, width = state.running.shape
    state = act_lib.finish(state, _dummy((batch, height, width)), self.eps)
    flops_B = small['flops'] + skipped_heads * self.global_cost
    out = maps['out'].reshape(batch, height, width, -1)
    return out, state.ponder_cost, state.num_units, flops_B

  # Host loop -------------------------------------------------------------

  def run(self, params, x_in, flops_B, clock: _Clock):
    """Runs the block; returns its output, aux maps, FLOPs and waste."""
    if self.num_units == 1:
      out, ponder, units, flops_B = clock('block_single', self.single,
                                          params.first, x_in, flops_B)
      return out, ponder, units, flops_B, 0
    opts = self.runner.options
    unit_flops = (x_in.shape[0] * self.out_hw(x_in.shape[1:3])
                  * (self.dilated_cost + self.active_cost))
    cheap = unit_flops < self.runner.device_flops
    if opts.sact_mode == 'device' or (opts.sact_mode == 'auto' and cheap):
      out, ponder, units, flops_B, waste, steps = clock(
          'block_device_loop', self.device_loop, params.first,
          params.stacked_units, params.stacked_heads, x_in, flops_B)
      self.runner.last_units.append({'device_loop': True, 'steps': steps})
      return out, ponder, units, flops_B, waste
    maps, small, counts = clock('block_start', self.start, params.first,
                                params.heads[0], x_in, flops_B)
    batch, height, width = small['state'].running.shape
    num_rows = batch * height * width
    granule_d = rows_lib.granule_for(num_rows, self.chunk_d, opts.buckets)
    granule_a = rows_lib.granule_for(num_rows, self.chunk_a, opts.buckets)
    # unit_counts[i]: device counts of unit i's index sets. Unit i is
    # planned from counts[i] (exact: the host waits for the previous unit)
    # or, pipelined, from counts[i - 1]: sets only shrink (halted positions
    # never resume), so those bound unit i's, and the device still has unit
    # i - 1 queued while the host reads them.
    unit_counts = [counts]
    planned = []
    skipped = 0
    # known[j + 1]: host copy of unit j's counts; known[0]: all positions.
    known = [(num_rows, num_rows)]
    for i in range(self.num_units - 1):
      while len(known) < i + 1:  # Units before i-1 are done: no wait.
        known.append(_counts(unit_counts[len(known) - 1], clock))
      drop = known[i - 1][1] - known[i][1] if i > 0 else num_rows
      exact = drop > opts.pipeline * num_rows or opts.pipeline <= 0
      if exact:
        known.append(_counts(unit_counts[i], clock))  # Wait for unit i-1.
      dense = self._dense(*known[-1], num_rows)
      if dense and not exact:
        # Never run a whole map on a stale bound: the unit may be sparse.
        known.append(_counts(unit_counts[i], clock))
        dense = self._dense(*known[-1], num_rows)
      n_d, n_a = known[-1]
      if n_a == 0:
        skipped = self.num_units - 2 - i
        break
      start = time.perf_counter()
      with_head = i < self.num_units - 2
      head = params.heads[i + 1] if with_head else None
      plan_d = rows_lib.plan_rows(n_d, self.chunk_d, granule_d)
      plan_a = rows_lib.plan_rows(n_a, self.chunk_a, granule_a)
      planned.append((plan_d, plan_a, dense, with_head))
      clock.host('host', start)
      if not dense:
        maps = clock('stage_a', self.stage_a, params.units[i], head, maps,
                     small['state'], plan_d.n_full, tail=plan_d.tail,
                     hw=(height, width), with_head=with_head)
      maps, new_small, counts = clock(
          'stage_b', self.stage_b, params.units[i], head, maps, small,
          plan_a.n_full, tail=plan_a.tail, dense=dense, with_head=with_head)
      if with_head:
        small = new_small
        unit_counts.append(counts)
    out, ponder, units, flops_B = clock('block_finish', self.finish, maps,
                                        small, skipped)
    waste = self._account(unit_counts, planned, num_rows, clock)
    if len(planned) < self.num_units - 1:
      self.runner.last_units.append(
          {'units_skipped': self.num_units - 1 - len(planned)})
    return out, ponder, units, flops_B, waste

  def _dense(self, n_d: int, n_a: int, num_rows: int) -> bool:
    """Whether a unit with these set sizes runs densely (`sact_mode`)."""
    opts = self.runner.options
    if opts.sact_mode != 'auto':
      return opts.sact_mode == 'dense'
    kappa, sigma = opts.gather_cost, opts.slice_cost
    return (opts.unit_cost
            + n_d * (self.dilated_cost + kappa * self.floats_d
                     + sigma * self.slices_d)
            + n_a * (self.active_cost + kappa * self.floats_a
                     + sigma * self.slices_a)
            >= num_rows * (self.dilated_cost + self.active_cost
                           + kappa * self.floats_dense))

  def _account(self, unit_counts, planned, num_rows, clock) -> int:
    """Records the units run; returns the FLOPs computed beyond the count.

    Reads the exact counts of every unit run (the block is done by then).
    """
    waste = 0
    dense_cost = num_rows * (self.dilated_cost + self.active_cost)
    for counts, (plan_d, plan_a, dense, with_head) in zip(unit_counts,
                                                          planned):
      n_d, n_a = _counts(counts, clock)
      if dense:
        waste += dense_cost - n_d * self.dilated_cost - n_a * self.active_cost
        if with_head:  # The head's local conv runs on the whole map.
          waste += (num_rows - n_a) * self.local_cost
      else:
        rows_d = plan_d.n_full * plan_d.chunk + plan_d.tail
        rows_a = plan_a.n_full * plan_a.chunk + plan_a.tail
        waste += ((rows_d - n_d) * self.dilated_cost
                  + (rows_a - n_a) * self.active_cost)
        if with_head:  # Taps on dilated and active rows, sums on active.
          waste += (rows_d + rows_a - n_a) * self.local_cost
      self.runner.last_units.append({
          'rows': num_rows, 'dilated': n_d, 'active': n_a, 'dense': dense,
          'planned_dilated': plan_d.count, 'planned_active': plan_a.count,
          'tail_d': plan_d.tail, 'tail_a': plan_a.tail,
          'chunks_d': plan_d.n_full, 'chunks_a': plan_a.n_full})
    return waste


class _ActBlock:
  """Jitted phases and the loop of one ACT block (dense units, early stop).

  A unit runs for the whole batch while any image still runs; the units of
  images that halted earlier are computed but weigh 0 (as in the dense
  model), and their FLOPs are overhead.
  """

  def __init__(self, runner: SparseRunner, block: nnx.Module):
    self.runner = runner
    self.num_units = block.num_units
    self.eps = block.eps
    self.first_gd = _graphdef(block.first)
    self.single = runner.jit(self._single)
    if block.steps is None:
      return
    self.unit_gd = _graphdef(block.steps.unit)
    self.head_gd = _graphdef(block.steps.head)
    self.head_global_cost = flops_lib.conv_cost(block.steps.head.global_conv)
    self.unit_cost_per_position = (block.steps.unit.dilated_cost
                                   + block.steps.unit.active_cost)
    self.start = runner.jit(self._start)
    self.unit = runner.jit(self._unit, static_argnames=('with_head',),
                        donate_argnames=('carry',))
    self.finish = runner.jit(self._finish)
    self.device_loop = runner.jit(self._device_loop,
                                  donate_argnames=('carry',))

  def _single(self, first_pure, x_in, flops_B):
    self.runner._trace('block_single')
    first = nnx.merge(self.first_gd, first_pure)
    x = first(x_in)
    flops_B = flops_B + first.dense_flops(
        x_in.shape[1] * x_in.shape[2], x.shape[1] * x.shape[2])
    state = act_lib.init_state(x, (x.shape[0],))
    state = act_lib.finish(state, x, self.eps)
    return state.output, state.ponder_cost, state.num_units, flops_B

  def _start(self, first_pure, head_pure, x_in, flops_B):
    self.runner._trace('block_start')
    first = nnx.merge(self.first_gd, first_pure)
    x = first(x_in)
    flops_B = flops_B + first.dense_flops(
        x_in.shape[1] * x_in.shape[2], x.shape[1] * x.shape[2])
    head = nnx.merge(self.head_gd, head_pure)
    state = act_lib.init_state(x, (x.shape[0],))
    flops_B = flops_B + head.flops(state.running)
    state = act_lib.step(state, head(x), x, self.eps)
    carry = {'x': x, 'state': state, 'flops': flops_B,
             'waste': jnp.zeros((), jnp.float32)}
    return carry, jnp.sum(state.running > 0).astype(jnp.int32)

  def _apply_unit(self, unit, carry):
    """Unit k for the whole batch, unmasked, as the dense ACT model."""
    x, state = carry['x'], carry['state']
    unit_cost = self.unit_cost_per_position * x.shape[1] * x.shape[2]
    return dict(
        carry, x=x + unit.residual(x),
        flops=carry['flops'] + state.running * unit_cost,
        waste=carry['waste'] + jnp.sum(1.0 - state.running) * unit_cost)

  def _apply_head(self, head, carry):
    """Halting head k on the unit's output and the halting step."""
    state = carry['state']
    return dict(
        carry,
        state=act_lib.step(state, head(carry['x']), carry['x'], self.eps),
        flops=carry['flops'] + head.flops(state.running),
        waste=carry['waste']
        + jnp.sum(1.0 - state.running) * self.head_global_cost)

  def _unit(self, unit_pure, head_pure, carry, *, with_head):
    self.runner._trace('act_unit')
    carry = self._apply_unit(nnx.merge(self.unit_gd, unit_pure), carry)
    if with_head:
      carry = self._apply_head(nnx.merge(self.head_gd, head_pure), carry)
    return carry, jnp.sum(carry['state'].running > 0).astype(jnp.int32)

  def _device_loop(self, stacked_units, stacked_heads, carry):
    """All units 2..L in one `lax.while_loop` that stops once all halted.

    Iteration i runs unit i+2, then (except after the last unit) the head
    of unit i+2, which the stacked heads hold at index i+1.
    """
    self.runner._trace('act_device_loop')
    last = self.num_units - 2

    def cond(loop):
      i, carry = loop
      return (i <= last) & jnp.any(carry['state'].running > 0)

    def body(loop):
      i, carry = loop
      carry = self._apply_unit(
          nnx.merge(self.unit_gd, _pick(stacked_units, i)), carry)
      headed = self._apply_head(
          nnx.merge(self.head_gd,
                    _pick(stacked_heads, jnp.minimum(i + 1, last))), carry)
      carry = jax.tree.map(lambda a, b: jnp.where(i < last, a, b), headed,
                           carry)
      return i + 1, carry

    return lax.while_loop(cond, body, (jnp.int32(0), carry))[1]

  def _finish(self, carry):
    self.runner._trace('block_finish')
    state = act_lib.finish(carry['state'], carry['x'], self.eps)
    return (state.output, state.ponder_cost, state.num_units, carry['flops'],
            carry['waste'])

  def run(self, params, x_in, flops_B, clock: _Clock):
    if self.num_units == 1:
      out, ponder, units, flops_B = clock('block_single', self.single,
                                          params.first, x_in, flops_B)
      return out, ponder, units, flops_B, 0
    carry, running = clock('block_start', self.start, params.first,
                           params.heads[0], x_in, flops_B)
    if self.runner.options.act_loop == 'device':
      carry = clock('act_device_loop', self.device_loop,
                    params.stacked_units, params.stacked_heads, carry)
    else:
      for i in range(self.num_units - 1):
        if _counts(running[None], clock)[0] == 0:
          self.runner.last_units.append(
              {'units_skipped': self.num_units - 1 - i})
          break
        with_head = i < self.num_units - 2
        self.runner.last_units.append({'unit': i + 2})
        carry, running = clock(
            'act_unit', self.unit, params.units[i],
            params.heads[i + 1] if with_head else None, carry,
            with_head=with_head)
    out, ponder, units, flops_B, waste = clock('block_finish', self.finish,
                                               carry)
    return out, ponder, units, flops_B, waste


_RUNNERS: 'weakref.WeakKeyDictionary[nnx.Module, dict]' = (
    weakref.WeakKeyDictionary())


def runner_for(model: nnx.Module, **options) -> SparseRunner:
  """The cached `SparseRunner` of `model` with these options."""
  opts = SparseOptions(**options)
  per_model = _RUNNERS.setdefault(model, {})
  if opts not in per_model:
    per_model[opts] = SparseRunner(model, opts)
  return per_model[opts]


def apply(model: nnx.Module, images_BxHxWx3: jax.Array, **options
          ) -> tuple[jax.Array, dict]:
  """`model(images)` computing only what the halting decisions keep.

  Args:
    model: a model built by `create_model` (any family and type), in eval
      mode. Its weights are read, never changed.
    images_BxHxWx3: input images.
    **options: `SparseOptions` fields.

  Returns:
    `(logits, aux)` as `model(images)`, aux with the same keys plus
    `flops_overhead`: conv FLOPs computed beyond `aux['flops']` (bucket
    padding, units run densely, ACT images computed after halting), summed
    over the batch.
  """
  return runner_for(model, **options)(images_BxHxWx3)
