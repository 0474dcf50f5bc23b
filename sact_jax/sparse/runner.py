"""Inference that performs only the computation ACT and SACT keep.

The dense models compute every unit at every position and multiply by the
halting mask, as the reference does. `SparseRunner` runs the same weights so
that the saved FLOPs become saved time:

* vanilla: the model itself;
* ACT: a unit is skipped once every image of the batch has halted (the
  reference's early stopping; `act_block.py`);
* SACT: units 2..L of a block run only at their active positions (plus the
  dilated set for the convs that feed a 3x3 conv), gathered into rows
  (`sact_block.py`, `rows.py`, `stages.py`); a halting head scores only the
  positions still running (its local conv as per-row tap products on the
  dilated set plus a neighbour sum) and takes its global term from the mean
  of the whole map, kept as per-image sums updated with each unit's
  residuals.

Where a block's maps are large (ImageNet at batch 32), a host loop drives
its units: each unit is one or two calls to jitted functions (the unit's
parameters are arguments, so every unit of a block shares one
compilation), and the host reads the number of active positions after each
unit to choose the row plan of the next one (`planner.py`). Plans depend on
the counts only through a bucketed tail size (`rows.plan_rows`), so jit
compiles a bounded number of shapes per map size, never one per input.
Where the maps are small (ImageNet at batch 1), the per-call dispatch and
read-back would cost a third of a unit, and the block runs as one program
instead (`SparseOptions.rows_loop`): a `lax.while_loop` over the units whose
tails are picked by `lax.switch`. Each unit runs at rows or densely,
whichever a cost model of gathers favours (`options.py`); blocks whose units
are too cheap for rows (CIFAR at small batch) run as one `lax.while_loop` of
dense masked units. Where every block runs on the device (ACT by default;
SACT at small maps), the whole model is one jitted program: one dispatch
per call, as the dense model. A block whose units all
ran densely in the last call runs as such a loop in the next
(`SparseOptions.adapt`), so where nothing halts every block ends up in one
program too, and after a call of that program in which no position halted
the dense model itself runs. On the CPU the one program runs its operations
on XLA's thread pool and hops between threads where the dense model's stays
on the caller's. For batch-1 latency where halting does save work, start
the process with this environment variable (BUILD.md, "XLA:CPU's scheduler
and batch-1 latency"):
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`.

FLOPs follow `flops.py` exactly: `aux['flops']` equals the dense model's
count (and is what the convs compute at real rows); conv FLOPs spent on
padding rows of the buckets, on units run densely, or (ACT) on images that
halted while others in the batch ran on are reported separately in
`aux['flops_overhead']` (a scalar for the whole batch).
"""

import functools
import time
import types
import weakref

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import flops as flops_lib
from sact_jax.models import base
from sact_jax.sparse import act_block
from sact_jax.sparse import common
from sact_jax.sparse import options as options_lib
from sact_jax.sparse import sact_block

SparseOptions = options_lib.SparseOptions

# `SparseRunner.__call__`'s `timings` key prefix for whole blocks.
BLOCK_TIMINGS = 'blocks/'


class _Weights:
  """The model's weights as plain arrays, unit parameters pre-sliced.

  Rebuilt whenever a Variable of the model holds a new value, so a runner
  always uses the current weights.
  """

  def __init__(self, model: nnx.Module):
    nodes = [node for _, node in nnx.iter_graph(model)]
    self.variables = [(v, v.get_raw_value()) for v in nodes
                      if isinstance(v, nnx.Variable)]
    # Checked on every call: `model.train()` changes no weights.
    self.batch_norms = [n for n in nodes if isinstance(n, nnx.BatchNorm)]
    self.top = {name: common.variable_arrays(module)
                for name, module in _top_modules(model).items()}
    # The whole model: vanilla runs it; SACT under `adapt` where nothing
    # halts (`SparseRunner._dense_pays`).
    self.model = (common.variable_arrays(model)
                  if model.model_type in ('vanilla', 'sact') else None)
    self.blocks = []
    for block in model.blocks:
      entry = types.SimpleNamespace(
          first=common.variable_arrays(block.first), units=None, heads=None,
          stacked_units=None, stacked_heads=None)
      if block.steps is not None and model.model_type != 'vanilla':
        entry.stacked_units = common.variable_arrays(block.steps.unit)
        entry.units = common.unstack(entry.stacked_units)
        entry.stacked_heads = common.variable_arrays(block.steps.head)
        entry.heads = common.unstack(entry.stacked_heads)
      self.blocks.append(entry)

  def current(self) -> bool:
    return all(v.get_raw_value() is value for v, value in self.variables)


def _device_vars(block_weights) -> dict:
  """What a block's `device_run` reads (not the unstacked units)."""
  heads = block_weights.heads
  return {'first': block_weights.first,
          'stacked_units': block_weights.stacked_units,
          'stacked_heads': block_weights.stacked_heads,
          'heads': heads[:1] if heads else None}


def _top_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """The layers outside the blocks (stem, head), by attribute name."""
  return {name: module for name, module in vars(model).items()
          if isinstance(module, nnx.Module) and name != 'blocks'}


def _check_eval(batch_norms: list[nnx.BatchNorm]):
  if any(not bn.use_running_average for bn in batch_norms):
    raise ValueError('sparse inference needs a model in eval mode (call '
                     'model.eval()): its BatchNorm layers use batch '
                     'statistics.')


class SparseRunner:
  """Runs a model's inference skipping halted units and positions.

  Attributes:
    options: the `SparseOptions`.
    device_flops: `options.device_flops` resolved for the backend.
  """

  def __init__(self, model: nnx.Module, options: SparseOptions | None = None,
               **kwargs):
    options = _options(options, kwargs)
    if not isinstance(model, base.AdaptiveResNet):
      raise TypeError('SparseRunner takes a model built by create_model, got '
                      f'{type(model).__name__}.')
    self.options = options
    self._phases = common.Phases(options)
    self.device_flops = self._phases.device_flops
    self.model_type = model.model_type
    self._model_ref = weakref.ref(model)
    self._model_cls = type(model)
    self._weights = None
    self._top_graphdefs = {name: common.graphdef(module)
                           for name, module in _top_modules(model).items()}
    self._model_graphdef = common.graphdef(model)
    block_cls = {'sact': sact_block.SactBlock,
                 'act': act_block.ActBlock}.get(self.model_type)
    self._blocks = [block_cls(self._phases, block) if block_cls else None
                    for block in model.blocks]
    self._stem = self._phases.jit(self._stem_fn)
    self._head = self._phases.jit(self._head_fn)
    self._vanilla = self._phases.jit(self._vanilla_fn)
    self._whole = self._phases.jit(self._whole_fn,
                                   static_argnames=('rows',))
    self._block_shapes = {}  # Image shape -> each block's input shape.
    # `adapt`, per image shape: the last whole-model call's usage, FLOPs
    # and overhead (read at the next call); the FLOPs per image of every
    # unit at every position; and, where the dense model runs the next
    # call, its last call's `num_units` (None before its first).
    self._whole_usage = {}
    self._full_flops = {}
    self._dense_units = {}

  @property
  def trace_counts(self):
    """How many times each jitted phase was traced (compiled), by name."""
    return self._phases.trace_counts

  @property
  def last_units(self) -> list[dict]:
    """Per-unit records of the last call (SACT: set sizes, mode, row plans;
    ACT: units run; units skipped once all halted)."""
    return self._phases.unit_records

  # For benchmarks that time the parts of a unit ---------------------------

  def sact_block(self, index: int) -> sact_block.SactBlock:
    """The runner of SACT block `index` (its pieces: `halting_step`,
    `index_rows`, `costs`)."""
    block = self._blocks[index]
    if not isinstance(block, sact_block.SactBlock) or block.costs is None:
      raise ValueError(f'Block {index} is not a SACT block with units 2..L.')
    return block

  def stage_modules(self, index: int, i: int
                    ) -> tuple[nnx.Module, nnx.Module | None]:
    """What SACT stage i of block `index` runs, on the current weights.

    Returns:
      Unit i + 2 of the block and the halting head that scores its output
      (None after the last unit).
    """
    block = self.sact_block(index)
    weights = self._refresh().blocks[index]
    head = (nnx.merge(block.head_gd, weights.heads[i + 1])
            if i + 1 < len(weights.heads) else None)
    return nnx.merge(block.unit_gd, weights.units[i]), head

  # Bookkeeping -----------------------------------------------------------

  def _model(self) -> nnx.Module:
    model = self._model_ref()
    if model is None:
      raise RuntimeError('The model of this SparseRunner no longer exists.')
    return model

  def _refresh(self) -> _Weights:
    if self._weights is None or not self._weights.current():
      self._weights = _Weights(self._model())
    _check_eval(self._weights.batch_norms)
    return self._weights

  def _view(self, top_vars: dict) -> types.SimpleNamespace:
    """The model's non-block layers, for its own `stem` and `head` code."""
    return types.SimpleNamespace(**{
        name: nnx.merge(self._top_graphdefs[name], arrays)
        for name, arrays in top_vars.items()})

  # Jitted model-level phases ---------------------------------------------

  def _run_stem(self, top_vars, images):
    counter = flops_lib.FlopCounter()
    x = self._model_cls.stem(self._view(top_vars), images, counter)
    return x, counter.per_image(images.shape[0])

  def _stem_fn(self, top_vars, images):
    self._phases.trace('stem')
    return self._run_stem(top_vars, images)

  def _head_fn(self, top_vars, x, flops_B, ponder_costs):
    self._phases.trace('head')
    counter = flops_lib.FlopCounter()
    logits = self._model_cls.head(self._view(top_vars), x, counter)
    ponder_loss = sum((jnp.mean(p) for p in ponder_costs),
                      jnp.zeros((), jnp.float32))
    return logits, flops_B + counter.per_image(x.shape[0]), ponder_loss

  def _vanilla_fn(self, model_vars, images):
    self._phases.trace('vanilla')
    return nnx.merge(self._model_graphdef, model_vars)(images)

  def _whole_fn(self, top_vars, blocks_vars, images, rows=None):
    """The whole model as one program: every block as its device loop.

    Where no block needs the host between units (ACT with
    `act_loop='device'`; SACT where every block is `on_device` or runs its
    rows on the device, as `rows[k]` says), one call instead of several per
    block: at small batches the dispatch of a call costs as much as a unit.
    """
    self._phases.trace('whole_model')
    x, flops_B = self._stem_fn(top_vars, images)
    ponder_costs, num_units, steps, usage, logs = [], [], [], [], []
    waste = jnp.zeros((), jnp.float32)
    for k, (runner_block, block_vars) in enumerate(zip(self._blocks,
                                                       blocks_vars)):
      extra = {'rows': rows[k]} if rows is not None else {}
      out = runner_block.device_run(types.SimpleNamespace(**block_vars), x,
                                    flops_B, **extra)
      x, ponder, units, flops_B, block_waste = out[:5]
      if self.model_type == 'sact' and runner_block.num_units > 1:
        steps.append(out[5])
        usage.append(out[6])
        logs.append(out[7])
      waste = waste + block_waste
      ponder_costs.append(ponder)
      num_units.append(units)
    logits, flops_B, ponder_loss = self._head_fn(top_vars, x, flops_B,
                                                 ponder_costs)
    aux = {'flops': flops_B, 'ponder_cost': ponder_costs,
           'num_units': num_units, 'ponder_loss': ponder_loss,
           'flops_overhead': waste}
    return logits, aux, steps, usage, logs

  def _block_input_shapes(self, weights, images_shape) -> list:
    """Each block's input shape for images of `images_shape` (cached)."""
    if images_shape not in self._block_shapes:
      def first(block, first_vars, x_in):
        flops_B = jnp.zeros((x_in.shape[0],), jnp.float32)
        return common.run_first_unit(block.first_gd, first_vars, x_in,
                                     flops_B)[0]

      x, _ = jax.eval_shape(self._run_stem, weights.top,
                            jax.ShapeDtypeStruct(images_shape, jnp.float32))
      shapes = []
      for runner_block, block_weights in zip(self._blocks, weights.blocks):
        shapes.append(x.shape)
        x = jax.eval_shape(functools.partial(first, runner_block),
                           block_weights.first, x)
      self._block_shapes[images_shape] = shapes
    return self._block_shapes[images_shape]

  def _dense_pays(self, weights, images_shape) -> bool:
    """`adapt`: the dense model itself, after a whole-model call whose
    device loops did the dense model's work (`did_dense_work`: where no
    position halted early there is nothing to skip, and a block that is a
    device loop whatever halts and ran every unit skipped none; on XLA:CPU
    the dense model's program also runs on the caller's thread, BUILD.md),
    until a dense call shows a block that would have skipped work
    (`dense_call_fits`)."""
    opts = self.options
    if self.model_type != 'sact' or opts.sact_mode != 'auto' or not opts.adapt:
      return False
    if images_shape in self._whole_usage:
      usage, flops_B, overhead = self._whole_usage.pop(images_shape)
      if all(block.did_dense_work(shape, block_usage)
             for (block, shape), block_usage in zip(
                 self._looped_blocks(weights, images_shape), usage)):
        # Every image computed every unit at every position: the count and
        # what the loops computed beyond it, per image.
        flops_B = np.asarray(flops_B, np.float64)
        self._full_flops[images_shape] = (
            (flops_B.sum() + float(overhead)) / flops_B.size)
        self._dense_units[images_shape] = None
    if images_shape not in self._dense_units:
      return False
    num_units = self._dense_units[images_shape]
    if num_units is not None and not all(
        block.dense_call_fits(shape, units)
        for block, shape, units in zip(
            self._blocks, self._block_input_shapes(weights, images_shape),
            num_units) if block.num_units > 1):
      del self._dense_units[images_shape]
      return False
    return True

  def _looped_blocks(self, weights, images_shape) -> list:
    """(block, input shape) of the SACT blocks with units to loop over: the
    blocks whose device loops report usage, in order."""
    return [(block, shape) for block, shape in zip(
        self._blocks, self._block_input_shapes(weights, images_shape))
            if block.num_units > 1]

  def _whole_plan(self, weights, images_shape) -> tuple[bool, ...] | None:
    """Whether the whole model runs as one program (not None), and then
    per block whether it runs its rows on the device (else a device loop
    of dense units, `on_device`)."""
    if self.model_type == 'act':
      return (False,) * len(self._blocks) if (
          self.options.act_loop == 'device') else None
    rows = []
    for block, shape in zip(self._blocks, self._block_input_shapes(
        weights, images_shape)):
      if block.on_device(shape):
        rows.append(False)
      elif block.rows_on_device(shape):
        rows.append(True)
      else:
        return None
    return tuple(rows)

  # Running ---------------------------------------------------------------

  def __call__(self, images_BxHxWx3: jax.Array,
               timings: dict[str, float] | None = None
               ) -> tuple[jax.Array, dict]:
    """Same `(logits, aux)` as `model(images)`, plus `aux['flops_overhead']`.

    Args:
      images_BxHxWx3: input images.
      timings: if given, every phase is waited for and its wall-clock
        seconds are added under its name (for benchmarks; slows the run);
        where the blocks run as calls of their own (not `whole_model`),
        each block's seconds are also added under `blocks/k` (k its index;
        these overlap the phases').
    """
    base.check_images(images_BxHxWx3)
    images = jnp.asarray(images_BxHxWx3, jnp.float32)
    weights = self._refresh()
    self._phases.new_call()
    clock = common.Clock(timings)

    if self.model_type == 'vanilla':
      logits, aux = clock('vanilla', self._vanilla, weights.model, images)
      aux = dict(aux)
      aux['flops_overhead'] = jnp.zeros((), jnp.float32)
      return logits, aux

    if self._dense_pays(weights, images.shape):
      logits, aux = clock('dense_model', self._vanilla, weights.model, images)
      aux = dict(aux)
      # Per image first: exactly 0 where nothing halted, at any batch size.
      aux['flops_overhead'] = jnp.sum(self._full_flops[images.shape]
                                      - aux['flops'])
      # Read when the next call asks (by then it is done).
      self._dense_units[images.shape] = aux['num_units']
      self._phases.record({'dense_model': True})
      return logits, aux

    rows = self._whole_plan(weights, images.shape)
    if rows is not None:
      logits, aux, steps, usage, logs = clock(
          'whole_model', self._whole, weights.top,
          [_device_vars(b) for b in weights.blocks], images,
          rows=rows if self.model_type == 'sact' else None)
      if self.model_type == 'sact':
        for (block, shape), block_steps, block_usage, log in zip(
            self._looped_blocks(weights, images.shape), steps, usage, logs):
          if log is None:
            self._phases.record({'device_loop': True, 'steps': block_steps})
          else:
            block.record_rows(shape, log)
          block.note_device_usage(shape, block_usage)
        self._whole_usage[images.shape] = (usage, aux['flops'],
                                           aux['flops_overhead'])
      else:
        for block_steps in steps:
          self._phases.record({'device_loop': True, 'steps': block_steps})
      return logits, aux

    x, flops_B = clock('stem', self._stem, weights.top, images)
    ponder_costs, num_units = [], []
    # Host blocks count their waste in Python ints (beyond int32 at ImageNet
    # batch 32), device loops in float32 arrays: kept apart, summed last.
    host_overhead, device_overheads = 0, []
    for k, (runner_block, block_weights) in enumerate(
        zip(self._blocks, weights.blocks)):
      start = time.perf_counter()
      x, ponder, units, flops_B, waste = runner_block.run(
          block_weights, x, flops_B, clock)
      clock.host(f'{BLOCK_TIMINGS}{k}', start, wait_for=x)
      if isinstance(waste, jax.Array):
        device_overheads.append(waste)
      else:
        host_overhead += waste
      ponder_costs.append(ponder)
      num_units.append(units)
    logits, flops_B, ponder_loss = clock('head', self._head, weights.top, x,
                                         flops_B, ponder_costs)
    aux = {
        'flops': flops_B,
        'ponder_cost': ponder_costs,
        'num_units': num_units,
        'ponder_loss': ponder_loss,
        'flops_overhead': sum(device_overheads,
                              jnp.asarray(float(host_overhead), jnp.float32)),
    }
    return logits, aux


_RUNNERS: 'weakref.WeakKeyDictionary[nnx.Module, dict]' = (
    weakref.WeakKeyDictionary())


def _options(options: SparseOptions | None, fields: dict) -> SparseOptions:
  """`options`, or `SparseOptions(**fields)`: as `SparseRunner` takes them."""
  if options is None:
    return SparseOptions(**fields)
  if fields:
    raise ValueError('Pass either options or keyword options, not both.')
  if not isinstance(options, SparseOptions):
    raise TypeError(f'options must be a SparseOptions, got '
                    f'{type(options).__name__}.')
  return options


def runner_for(model: nnx.Module, *, options: SparseOptions | None = None,
               **fields) -> SparseRunner:
  """The cached `SparseRunner` of `model` with these options.

  Options are a `SparseOptions` or its fields as keywords, not both.
  """
  opts = _options(options, fields)
  per_model = _RUNNERS.setdefault(model, {})
  if opts not in per_model:
    per_model[opts] = SparseRunner(model, opts)
  return per_model[opts]


def apply(model: nnx.Module, images_BxHxWx3: jax.Array, *,
          options: SparseOptions | None = None, **fields
          ) -> tuple[jax.Array, dict]:
  """`model(images)` computing only what the halting decisions keep.

  Args:
    model: a model built by `create_model` (any family and type), in eval
      mode. Its weights are read, never changed.
    images_BxHxWx3: input images.
    options: a `SparseOptions`; or, instead, ...
    **fields: `SparseOptions` fields.

  Returns:
    `(logits, aux)` as `model(images)`, aux with the same keys plus
    `flops_overhead`: conv FLOPs computed beyond `aux['flops']` (bucket
    padding, units run densely, ACT images computed after halting), summed
    over the batch.
  """
  return runner_for(model, options=options, **fields)(images_BxHxWx3)
