"""One SACT block, sparsely: units 2..L at their active and dilated rows.

The block's state lives in flat maps (`maps`, donated to every phase so XLA
updates them in place): `x` `[N, C]` (the current unit input), `out` `[N, C]`
(the halting-weighted block output), `y` `[N + 1, D]` (the dilated stage's
output) and `taps` `[N + 1, 9]` (the next head's per-tap products,
`SactHead.local_taps`), the last row of the two latter zero (padding);
`xsum` `[B, C]` holds per-image sums of `x` for the heads' global term. The
halting carry (`halting_carry`: the `act.HaltingState` and the FLOPs per
image) is small and passed alongside.

Instead of adding `p^l x^l` at every position after each unit, `out` starts
as `x^1` and each unit adds `(1 - c^{l-1}) f^l(x^{l-1})` at its active rows,
`c^{l-1}` being the cumulative halting score before the unit: the same sum
regrouped (`x^l = x^1 + sum_{j<=l} f^j`, the weights sum to 1), touching
active rows only.

From the host loop, per unit two calls: `stage_dilated` (dilated rows: the
dilated stage, and the next head's tap products of rows this unit leaves
unchanged) and `stage_active` (active rows: the rest of the unit, the tap
products of the updated rows, then the next head's local sums at the active
rows, the halting step and the next unit's set sizes, which the host reads
back to plan the next unit, `planner.Planner`). Where those tap products
would cover as many rows as the map has (`SparseOptions.dense_head`), the
head runs on the whole map after the update instead, as the dense model's.
Where the maps are small, `_device_rows` runs the same two stages for every
unit inside one program instead (`SparseOptions.rows_loop`).
"""

import functools
import math
import time
from typing import Any, NamedTuple

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sact_jax import act as act_lib
from sact_jax import blocks as blocks_lib
from sact_jax import conv as conv_lib
from sact_jax import flops as flops_lib
from sact_jax.sparse import common
from sact_jax.sparse import options as options_lib
from sact_jax.sparse import planner as planner_lib
from sact_jax.sparse import rows as rows_lib
from sact_jax.sparse import stages


class _TailPlan:
  """`rows.plan_rows` on the device: full chunks, then a tail whose size is
  one of a few static `tails`, picked by index (a `lax.switch`).

  Tails are 0-4 granules, then twice as far apart up to a chunk (7 sizes
  for 16 granules, padding up to half the tail): every size is compiled
  into the block's program, so fewer than the host loop's `buckets + 1`.
  The row matmuls, most of a unit's time, skip the padding
  (`conv.valid_rows`); gathers and scatters run over it. On ImageNet
  ResNet-101 at batch 1, tails 1.5x apart (9 sizes) took the first call
  of `sparse.apply` 26.5 s against 22.3 s and ran it no faster (these
  tails took 1.005 and 1.004 of their time); before the matmuls skipped
  the padding, a tail at every granule (17 sizes) ran it about 3% faster
  but compiled for 40 s.
  """

  def __init__(self, chunk: int, granule: int, num_rows: int):
    self.chunk, self.granule = chunk, granule
    top = -(-min(chunk, num_rows) // granule)
    ks = list(range(min(top, 4) + 1))
    while ks[-1] < top:
      ks.append(min(top, 2 * ks[-1]))
    self._ks = np.asarray(ks, np.int32)
    self.tails = [min(chunk, k * granule) for k in ks]

  def __call__(self, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full chunks and the tail's index for a set of `count` rows."""
    n_full = count // self.chunk
    granules = -(-(count - n_full * self.chunk) // self.granule)
    return n_full, jnp.searchsorted(self._ks, granules).astype(jnp.int32)

  def rows(self, n_full: jax.Array, tail: jax.Array) -> jax.Array:
    """Rows computed: the full chunks and the tail."""
    return (n_full * self.chunk
            + jnp.asarray(self.tails, jnp.int32)[tail]).astype(jnp.int32)


class _Picked(NamedTuple):
  """Unit or head `index` of a block's stacked variables, not yet sliced.

  Inside `_device_rows`' loop the stages slice their parameters where they
  use them (`SactBlock._unit`, `_head`): sliced before the `lax.cond` and
  `lax.switch` that pick a unit's branch, every parameter was an operation
  of its own (about 25 per unit); sliced inside, XLA fuses most slices into
  their users (ImageNet ResNet-101 at batch 1: 40 slice operations a call
  instead of 505, `sparse.apply` 0.994 of its time, the same values).
  """
  stacked: Any
  index: jax.Array


class SactBlock:
  """Jitted phases and the host loop of one SACT block.

  Attributes:
    costs: the cost model of units 2..L (None for a one-unit block).
    dilated_channels: channels of the dilated stage's output `y`.
  """

  def __init__(self, phases: common.Phases, block: nnx.Module):
    self.phases = phases
    self.num_units = block.num_units
    self.eps = block.eps
    self.first_gd = common.graphdef(block.first)
    self.stride = block.first.stride
    self.costs = None
    # `SparseOptions.adapt`: per input shape, whether the next call runs
    # as a device loop, and the usage of the last device loop, read when
    # the next call asks (by then it is done).
    self._adapted = {}
    self._usage = {}
    if block.steps is None:
      self.single = phases.jit(self._single)
      return
    unit, head = block.steps.unit, block.steps.head
    stages.check_unit(unit)
    self.unit_gd = common.graphdef(unit)
    # Loops over the stacked units read these kernels in place.
    self.in_place = conv_lib.kernels_read_in_place(unit)
    # Heads whose taps are not affine take the chunked update (`stages`).
    self.fusable = stages.fusable(unit) and head.folds_local_bn
    self.head_gd = common.graphdef(head)
    self.costs = options_lib.CostModel(phases.options, unit, head)
    self.dilated_channels = unit.dilated_channels
    # What the reference counts for a head at which no position runs.
    self.idle_head_flops = head.global_cost
    self.start = phases.jit(self._start)
    self.device_loop = phases.jit(self._device_loop)
    self.device_rows = phases.jit(self._device_rows)
    self.stage_dilated = phases.jit(
        self._stage_dilated, static_argnames=('tail', 'hw', 'with_taps'),
        donate_argnames=('maps',))
    self.stage_active = phases.jit(
        self._stage_active,
        static_argnames=('tail', 'dense', 'with_head', 'dense_head'),
        donate_argnames=('maps',))
    self.dense_loop = phases.jit(self._dense_loop, donate_argnames=('maps',))
    # Donated: the block output aliases `out` instead of being a fresh copy.
    self.finish = phases.jit(self._finish, donate_argnames=('maps',))

  def fuses(self, dtype, num_rows: int) -> bool:
    """Whether units at rows of a map of `num_rows` positions run each
    stage as one call on all their rows (`stages.fused_dilated`,
    `fused_active`; for heads with affine taps, `SactHead.taps_affine`):
    then the dilated stage's chunk plan does not reach it (no padding
    rows, one compiled program)."""
    return self.fusable and stages.runs_fused(dtype, num_rows)

  def num_rows(self, in_shape) -> int:
    """Positions of the block's maps, batch included, for inputs of
    `in_shape` (`[B, H, W, C]`)."""
    return in_shape[0] * math.prod(-(-s // self.stride)
                                   for s in in_shape[1:3])

  # Pieces of the phases (also timed apart by benchmarks) -----------------

  def halting_step(self, head, halting_BxHxW, state, flops_B):
    """Halting step; the halting carry and set sizes of the next unit.

    The index sets themselves are built by the stages that use them
    (`index_rows`), so units run densely never pay for them.
    """
    costs = self.costs
    flops_B = flops_B + head.flops(state.running)
    state = act_lib.step(state, halting_BxHxW,
                         common.dummy_output(halting_BxHxW.shape), self.eps)
    mask = state.running
    dilated = act_lib.dilate_mask(mask)
    flops_B = (flops_B
               + flops_lib.spatial_count(dilated) * costs.dilated_cost
               + flops_lib.spatial_count(mask) * costs.active_cost)
    sizes = jnp.stack([jnp.sum(dilated > 0), jnp.sum(mask > 0)])
    return {'state': state, 'flops': flops_B}, sizes.astype(jnp.int32)

  def index_rows(self, state, dilated: bool) -> jax.Array:
    """Padded flat indices of the (dilated) running positions."""
    mask = state.running
    if dilated:
      mask = act_lib.dilate_mask(mask)
    chunk = self.costs.chunk_dilated if dilated else self.costs.chunk_active
    return rows_lib.indices(mask.reshape(-1),
                            rows_lib.padded_length(mask.size, chunk))

  # Jitted phases ---------------------------------------------------------

  def _first(self, first_vars, x_in, flops_B):
    return common.run_first_unit(self.first_gd, first_vars, x_in, flops_B)

  def _single(self, first_vars, x_in, flops_B):
    """A block of one unit: dense, ponder cost 2, one unit used."""
    self.phases.trace('block_single')
    x, flops_B = self._first(first_vars, x_in, flops_B)
    halting_shape = x.shape[:3]
    state = act_lib.init_state(common.dummy_output(halting_shape),
                               halting_shape)
    state = act_lib.finish(state, common.dummy_output(halting_shape),
                           self.eps)
    return x, state.ponder_cost, state.num_units, flops_B

  def _first_maps(self, first_vars, stacked_heads, x_in, flops_B):
    """First unit and first head densely: the maps, the halting carry and
    unit 2's set sizes.

    The block output so far is the first unit's output `x` itself: `out`
    is None until unit 2 writes it (`_dense_loop`). A map given as both
    `x` and `out` to a call that updates both in place is one buffer that
    XLA copies first (at 56x56x256, batch 32, 11 ms on one of the two
    threads).
    """
    head = nnx.merge(self.head_gd, conv_lib.pick(stacked_heads, 0))
    x, flops_B, xsum, halting = self._first_and_scores(first_vars, head,
                                                       x_in, flops_B)
    batch, height, width, channels = x.shape
    num_rows = batch * height * width
    state = act_lib.init_state(common.dummy_output((batch, height, width)),
                               (batch, height, width))
    halting_carry, sizes = self.halting_step(head, halting, state, flops_B)
    x_NxC = x.reshape(num_rows, channels)
    maps = {
        'x': x_NxC,
        'out': None,
        'y': jnp.zeros((num_rows + 1, self.dilated_channels), x.dtype),
        'taps': jnp.zeros((num_rows + 1, 9), x.dtype),
        'xsum': xsum,
    }
    return maps, halting_carry, sizes

  def _start(self, first_vars, stacked_units, stacked_heads, unit_vars,
             head_vars, x_in, flops_B):
    """First unit and first head densely (every position runs them), then
    the units after them for as long as they run densely too (`_dense_loop`,
    from unit 2): where nothing halts early, the host waits once per block.

    Returns the maps and halting carry, unit 2's set sizes and
    `_dense_loop`'s stop and sizes.
    """
    self.phases.trace('block_start')
    maps, halting_carry, sizes = self._first_maps(first_vars, stacked_heads,
                                                  x_in, flops_B)
    maps, halting_carry, stop, sizes_Ux2 = self._dense_loop(
        stacked_units, stacked_heads, unit_vars, head_vars, maps,
        halting_carry, sizes, jnp.int32(0))
    return maps, halting_carry, sizes, stop, sizes_Ux2

  def _unit(self, unit_vars) -> nnx.Module:
    """The unit of `unit_vars` (its variables, or `_Picked` from a stack)."""
    if isinstance(unit_vars, _Picked):
      unit_vars = conv_lib.pick(unit_vars.stacked, unit_vars.index,
                                self.in_place)
    return nnx.merge(self.unit_gd, unit_vars)

  def _head(self, head_vars) -> nnx.Module:
    """The head of `head_vars` (its variables, or `_Picked`)."""
    if isinstance(head_vars, _Picked):
      head_vars = conv_lib.pick(head_vars.stacked, head_vars.index)
    return nnx.merge(self.head_gd, head_vars)

  def _stage_dilated(self, unit_vars, head_vars, maps, state, n_full,
                     count=None, *, tail, hw, with_taps):
    """The dilated stage at the dilated rows, into `y`; with `with_taps`, the
    next head's tap products there. `count`: the dilated rows (`row_loop`).

    Tap products are computed from the rows before the unit's update: right
    for the rows the unit leaves unchanged, and overwritten in
    `stage_active` for the active rows.
    """
    self.phases.trace('stage_dilated')
    height, width = hw
    x = maps['x']
    idx_dilated = self.index_rows(state, dilated=True)
    if self.fuses(x.dtype, x.shape[0]):  # Every row in one call.
      unit = self._unit(unit_vars)
      if not with_taps:
        return dict(maps, y=stages.fused_dilated(unit, x, maps['y'],
                                                 idx_dilated))
      y, taps = stages.fused_dilated(unit, x, maps['y'], idx_dilated,
                                     self._head(head_vars), maps['taps'])
      return dict(maps, y=y, taps=taps)
    source = stages.dilated_source(self._unit(unit_vars), x)
    def body(idx_S, carry):
      unit = self._unit(unit_vars)  # Sliced here: see `_Picked`.
      head = self._head(head_vars) if with_taps else None
      y, taps = carry
      rows = stages.dilated_stage(unit, source, idx_S, height=height,
                                  width=width, num_rows=x.shape[0])
      y = rows_lib.scatter_set(y, idx_S, rows)
      if head is not None:
        taps = rows_lib.row_taps(taps, x, idx_S, head)
      return y, taps
    y, taps = rows_lib.row_loop(idx_dilated, n_full, self.costs.chunk_dilated,
                                tail, body, (maps['y'], maps['taps']), count)
    return dict(maps, y=y, taps=taps)

  def _stage_active(self, unit_vars, head_vars, maps, halting_carry, n_full,
                    count=None, *, tail, dense, with_head, dense_head):
    """The rest of the unit at its active rows (`count` of them, for
    `row_loop`), then the next head.

    Updates `x`, `out`, `xsum`; with a head, also its tap products at the
    updated rows, its scores at the active rows (the only ones that matter:
    `act.step` ignores halted positions), the halting step and the set
    sizes of the next unit. With `dense_head` the head runs on the whole
    map instead (no taps). Without a head (the block's last unit) only
    `out` is updated, the one map read after it, and `None` is returned for
    both (the halting state is unchanged).
    """
    self.phases.trace('stage_active')
    head = self._head(head_vars) if with_head else None
    state = halting_carry['state']
    if dense:
      unit = self._unit(unit_vars)
      shape = (*state.running.shape, maps['x'].shape[-1])
      x, out = maps['x'].reshape(shape), maps['out'].reshape(shape)
      if not with_head:  # The block's last unit: only `out` is read after.
        _, out = self._update_dense(unit, x, out, state)
        return self._to_maps(maps, out=out), None, None
      x, out, xsum, halting = self._dense_unit(unit, head, x, out, state)
      maps = dict(self._to_maps(maps, x=x, out=out), xsum=xsum)
    else:
      idx_active = self.index_rows(state, dilated=False)
      maps = self._update_rows(unit_vars, maps, state, idx_active, n_full,
                               tail, count, update_x=with_head,
                               taps_head=None if dense_head else head_vars)
      if not with_head:
        return maps, None, None
      if dense_head:  # On the whole map, as in the dense branch.
        halting = self._dense_scores(
            head, maps['x'].reshape(*state.running.shape, -1), maps['xsum'])
      else:
        halting = self._halting_rows(head_vars, maps, state, idx_active,
                                     n_full, tail)
    halting_carry, sizes = self.halting_step(head, halting, state,
                                             halting_carry['flops'])
    return maps, halting_carry, sizes

  @staticmethod
  def _update_dense(unit, x_BxHxWxC, out_BxHxWxC, state):
    """The unit on the whole map, masked: the new `x` and `out` maps.

    On `[B, H, W, C]` maps (the flat maps reshaped by the caller): inside
    `dense_loop`'s while loop, flat carries cost XLA a copy of `x` per unit.
    """
    residual = unit.residual(x_BxHxWxC)
    new_x = act_lib.masked_residual(x_BxHxWxC, residual, state.running)
    weight = SactBlock._out_weight(state)[..., None]
    if out_BxHxWxC is None:  # `out` is `x` (`_first_maps`).
      out_BxHxWxC = x_BxHxWxC
    return new_x, out_BxHxWxC + weight * residual

  @staticmethod
  def _out_weight(state):
    """`[B, H, W]` weight of a unit's residual in the block output summed
    as `out` (`x_1 + sum of (1 - cumulative) r`): 0 at halted positions."""
    return state.running * (1.0 - state.cumulative)

  def _dense_unit(self, unit, head, x_BxHxWxC, out_BxHxWxC, state):
    """`_update_dense`, then the head after the unit on the whole map.

    Returns the new `x` and `out` (given as None, `out` is `x`:
    `_first_maps`), the new `x`'s per-image sums and the head's scores
    `[B, H, W]`. Where `rows.fuses_dense`, the maps' update, the sums and
    the head's tap products are one pass over the map
    (`rows.update_dense`, which also adds the unit's last bias:
    `residual_and_bias`); elsewhere the dense model's code.
    """
    if not rows_lib.fuses_dense(head, x_BxHxWxC.dtype):
      x, out = self._update_dense(unit, x_BxHxWxC, out_BxHxWxC, state)
      xsum = jnp.sum(x, axis=(1, 2))
      return x, out, xsum, self._dense_scores(head, x, xsum)
    residual, bias = unit.residual_and_bias(x_BxHxWxC)
    x, out, xsum, taps = rows_lib.update_dense(
        x_BxHxWxC, out_BxHxWxC, residual, self._out_weight(state),
        head=head, bias_C=bias)
    return x, out, xsum, self._tap_scores(head, taps, xsum)

  def _first_and_scores(self, first_vars, head, x_in, flops_B):
    """The block's first unit densely and the head after it: the unit's
    output `x`, the FLOPs with it, `x`'s per-image sums and the scores.

    Where `rows.fuses_dense`, the unit's output (its shortcut, residual and
    last biases: `ResidualUnit.split_output`) is summed in the pass that
    makes the sums and the head's taps, where XLA's sum was one pass over
    the map and the taps another (6-8 ms at 56x56x256, batch 32).
    """
    if not rows_lib.fuses_dense(head, x_in.dtype):
      x, flops_B = self._first(first_vars, x_in, flops_B)
      xsum = jnp.sum(x, axis=(1, 2))
      return x, flops_B, xsum, self._dense_scores(head, x, xsum)
    first = nnx.merge(self.first_gd, first_vars)
    shortcut, residual, bias = first.split_output(x_in)
    x, _, xsum, taps = rows_lib.update_dense(shortcut, None, residual, None,
                                             head=head, bias_C=bias)
    flops_B = flops_B + common.first_unit_flops(first, x_in, x)
    return x, flops_B, xsum, self._tap_scores(head, taps, xsum)

  @staticmethod
  def _tap_scores(head, taps_BxHxWx9, xsum_BxC):
    """The head's scores `[B, H, W]` from its tap products at every
    position and the map's per-image sums."""
    local = head.local_logits_from_tap_map(taps_BxHxWx9)
    hw = taps_BxHxWx9.shape[1] * taps_BxHxWx9.shape[2]
    global_B = head.global_logits(xsum_BxC / hw)
    return head.probability(local, global_B[:, None, None])

  @staticmethod
  def _dense_scores(head, x_BxHxWxC, xsum_BxC):
    """`head(x)` with the global term from `x`'s per-image sums, which the
    block keeps anyway: the head's own mean would read the map once more
    (1 ms at 14x14x1024, batch 32)."""
    hw = x_BxHxWxC.shape[1] * x_BxHxWxC.shape[2]
    return head.scores(x_BxHxWxC, xsum_BxC / hw)

  @staticmethod
  def _to_maps(maps, **maps_BxHxWxC):
    """`maps` with the given `[B, H, W, C]` maps flattened into it."""
    return dict(maps, **{k: v.reshape(-1, v.shape[-1])
                         for k, v in maps_BxHxWxC.items()})

  def _update_rows(self, unit_vars, maps, state, idx_active, n_full, tail,
                   count, *, update_x, taps_head):
    """The active stage at the active rows: `out`; with `update_x`, `x` and
    `xsum`; with `taps_head` (a head's variables), its tap products at the
    updated rows."""
    height, width = state.running.shape[1:]
    hw = height * width
    cumulative_N = state.cumulative.reshape(-1)
    y = maps['y']
    carry = (maps['x'], maps['out'], maps['xsum'], maps['taps'])
    # The block's last unit (no `update_x`): only `out` is read after.
    if self.fuses(y.dtype, cumulative_N.shape[0]):  # Every row in one call.
      x, out, xsum, taps = stages.fused_active(
          self._unit(unit_vars), y, idx_active, cumulative_N, carry,
          height=height, width=width, update_x=update_x,
          head=None if taps_head is None else self._head(taps_head))
      return dict(maps, x=x, out=out, xsum=xsum, taps=taps)
    def body(idx_S, carry):
      x, out, xsum, taps = carry
      residual = stages.active_stage(self._unit(unit_vars), y, idx_S,
                                     height=height, width=width)
      weight = 1.0 - rows_lib.gather(cumulative_N, idx_S)
      x, out, xsum, taps = rows_lib.update_rows(
          x, out, xsum, taps, idx_S, residual, weight, hw=hw,
          update_x=update_x,
          head=None if taps_head is None else self._head(taps_head))
      return x, out, xsum, taps
    x, out, xsum, taps = rows_lib.row_loop(
        idx_active, n_full, self.costs.chunk_active, tail, body, carry, count)
    return dict(maps, x=x, out=out, xsum=xsum, taps=taps)

  def _halting_rows(self, head_vars, maps, state, idx_active, n_full, tail):
    """The head's scores `[B, H, W]` at the active rows (0 elsewhere).

    Over the active stage's chunks, or where the stages fuse over all of
    the padded set at once (9 taps a row, small next to a stage's chunk):
    then no chunk plan reaches the active stage, which is one program per
    block instead of one per plan.
    """
    batch, height, width = state.running.shape
    hw = height * width
    taps = maps['taps']
    global_B = self._head(head_vars).global_logits(maps['xsum'] / hw)
    def body(idx_S, halting_N):
      head = self._head(head_vars)
      local_S = stages.head_local(head, taps, idx_S, height=height,
                                  width=width)
      halting_S = head.probability(
          local_S, rows_lib.gather(global_B, idx_S // hw))
      return rows_lib.scatter_set(halting_N, idx_S, halting_S)
    halting_N = jnp.zeros((batch * hw,), maps['x'].dtype)
    if self.fuses(maps['x'].dtype, batch * hw):
      halting_N = body(idx_active, halting_N)
    else:
      halting_N = rows_lib.row_loop(idx_active, n_full,
                                    self.costs.chunk_active, tail, body,
                                    halting_N)
    return halting_N.reshape(batch, height, width)

  def _dense_loop(self, stacked_units, stacked_heads, unit_vars, head_vars,
                  maps, halting_carry, sizes, start):
    """Dense units `start`, `start + 1`, ... on the device, while dense pays.

    What `stage_active(dense=True)` does for one unit, in a
    `lax.while_loop` that runs on as long as the cost model keeps choosing
    dense for the next unit's set sizes (and some position runs), without
    a host round trip per unit: where nothing halts, a block costs what the
    dense model's block does. Only units followed by a head run here (the
    last unit of the block is the host loop's).

    Unit `start` runs from its own weights (`unit_vars`, `head_vars`), the
    next ones from the stacks: inside the loop XLA copies what a unit
    slices out of a stack (all its weights where oneDNN does not run its
    convs, which read their kernels in place: `conv.pick`), which at small
    batch sizes costs as much as the matmuls (they stream the weights),
    and often unit `start` is the only one that runs densely.

    Args:
      stacked_units, stacked_heads: the block's units 2..L and heads.
      unit_vars, head_vars: unit `start` and the head after it (any head
        for the block's last unit with a head: it is not run then).
      maps, halting_carry: the block state before unit `start` (index into
        units 2..L).
      sizes: `[2]` set sizes of unit `start`.
      start: index of the first unit to run.

    Returns:
      The maps and halting carry after the units run, the index of the
      first unit not run, and `[L - 1, 2]` set sizes: row k holds unit k's
      sizes for k in [start, stop] (the rest zero).
    """
    self.phases.trace('dense_loop')
    num_rows = maps['x'].shape[0]
    last = self.num_units - 2
    sizes_Ux2 = jnp.zeros((self.num_units - 1, 2), jnp.int32).at[start].set(
        sizes)
    shape = (*halting_carry['state'].running.shape, maps['x'].shape[-1])

    def cond(loop):  # A unit with a head, some position runs, dense pays.
      i, _, _, _, _, sizes, _ = loop
      return ((i < last) & (sizes[1] > 0)
              & self.costs.runs_dense(sizes[0], sizes[1], num_rows))

    def step(unit_vars, head_vars, loop):
      i, x, out, _, halting_carry, _, sizes_Ux2 = loop
      unit = nnx.merge(self.unit_gd, unit_vars)
      head = nnx.merge(self.head_gd, head_vars)
      state = halting_carry['state']
      x, out, xsum, halting = self._dense_unit(unit, head, x, out, state)
      halting_carry, sizes = self.halting_step(
          head, halting, state, halting_carry['flops'])
      return (i + 1, x, out, xsum, halting_carry, sizes,
              sizes_Ux2.at[i + 1].set(sizes))

    def body(loop):
      i = loop[0]
      with conv_lib.stacked_unit(i):
        return step(conv_lib.pick(stacked_units, i, self.in_place),
                    conv_lib.pick(stacked_heads, i + 1), loop)

    def skip(loop):  # Unit `start` does not run densely: `out` as it is.
      i, x, out, *rest = loop
      return (i, x, x if out is None else out, *rest)

    out = maps['out']  # None: `x` (`_first_maps`), until unit `start`.
    loop = (start, maps['x'].reshape(shape),
            None if out is None else out.reshape(shape), maps['xsum'],
            halting_carry, sizes, sizes_Ux2)
    loop = lax.cond(cond(loop), functools.partial(step, unit_vars, head_vars),
                    skip, loop)
    stop, x, out, xsum, halting_carry, _, sizes_Ux2 = lax.while_loop(
        cond, body, loop)
    maps = dict(self._to_maps(maps, x=x, out=out), xsum=xsum)
    return maps, halting_carry, stop, sizes_Ux2

  def _device_loop(self, first_vars, stacked_units, stacked_heads, x_in,
                   flops_B):
    """The whole block on the device: dense masked units in a while loop.

    The dense model's block (`blocks.py`) up to rounding, except that the
    loop stops once no position runs; the heads it then skips still count,
    as the reference counts them. Iteration i runs unit i+2 and then the
    head of unit i+2 (stacked at index i+1), as `_dense_unit` (the block
    output summed as the host loop's `out`, a pass over the map per unit
    where `rows.fuses_dense`); the last unit, which has no head, runs after
    the loop if any position still does (so no iteration computes a head
    only to drop it). Returns the block output, ponder cost, units, FLOPs,
    the FLOPs computed beyond the count (at halted positions), the number
    of units run after the first and, for `adapt`, the dilated and active
    positions summed over those units and their number.
    """
    self.phases.trace('block_device_loop')
    x, flops_B, _, halting = self._first_and_scores(
        first_vars, nnx.merge(self.head_gd, conv_lib.pick(stacked_heads, 0)),
        x_in, flops_B)
    batch, height, width = x.shape[:3]
    num_rows = batch * height * width
    costs = self.costs
    last = self.num_units - 2
    halting_shape = (batch, height, width)

    def halt(state, halting):
      return act_lib.step(state, halting, common.dummy_output(halting_shape),
                          self.eps)

    def unit_at(i):
      return nnx.merge(self.unit_gd,
                       conv_lib.pick(stacked_units, i, self.in_place))

    state = act_lib.init_state(common.dummy_output(halting_shape),
                               halting_shape)
    state = halt(state, halting)

    def cond(loop):
      i, _, _, state = loop
      return (i < last) & jnp.any(state.running > 0)

    def body(loop):
      i, x, out, state = loop
      head = nnx.merge(self.head_gd, conv_lib.pick(stacked_heads, i + 1))
      with conv_lib.stacked_unit(i):
        x, out, _, halting = self._dense_unit(unit_at(i), head, x, out,
                                              state)
      return i + 1, x, out, halt(state, halting)

    def skip(loop):  # Unit 2 does not run: `out` is `x`.
      i, x, _, state = loop
      return i, x, x, state

    # Unit 2 outside the loop, from `out` None (`_first_maps` says why):
    # a loop started from `(x, x)` copied both maps (at 56x56x256, batch
    # 32, four copies of the map, 8 ms).
    loop = (jnp.int32(0), x, None, state)
    loop = lax.cond(cond(loop), body, skip, loop)
    steps, x, out, state = lax.while_loop(cond, body, loop)
    heads = (steps + 1).astype(jnp.float32)
    run_last = (steps == last) & jnp.any(state.running > 0)

    def last_unit(out):
      with conv_lib.stacked_unit(last):
        return self._update_dense(unit_at(last), x, out, state)[1]

    out = lax.cond(run_last, last_unit, lambda out: out, out)
    steps = steps + run_last.astype(jnp.int32)
    units = steps.astype(jnp.float32)
    state = act_lib.finish(state, common.dummy_output(halting_shape),
                           self.eps)
    # What ran, from the units used per position as the dense model counts
    # it, rather than per unit inside the loop; heads the loop skipped
    # count as the head says.
    dilated_B, active_B, head_runs = blocks_lib.sact_runs(state.num_units,
                                                          last + 1)
    any_head = nnx.merge(self.head_gd, conv_lib.pick(stacked_heads, 0))
    flops_B = flops_B + (dilated_B * costs.dilated_cost
                         + active_B * costs.active_cost
                         + any_head.flops_of_runs(head_runs, last + 1))
    dilated, active = jnp.sum(dilated_B), jnp.sum(active_B)
    waste = ((units * num_rows - dilated) * costs.dilated_cost
             + (units * num_rows - active) * costs.active_cost
             + (heads * num_rows - jnp.sum(head_runs)) * costs.local_cost)
    usage_3 = jnp.stack([dilated, active, units])
    return (out, state.ponder_cost, state.num_units, flops_B, waste, steps,
            usage_3)

  def _device_rows(self, first_vars, stacked_units, stacked_heads, x_in,
                   flops_B):
    """The whole block on the device, each unit at rows or densely.

    What the host loop (`run`) computes, in one program: a
    `lax.while_loop` over units 2..L whose body runs a unit densely or at
    its rows (`CostModel.runs_dense` on its exact set sizes, a `lax.cond`),
    each stage's tail a `lax.switch` over `_TailPlan`'s static sizes. No
    host round trip per unit: on a CPU each call of a phase and each
    read-back costs a fixed time, at batch 1 a third of a small unit's
    (BUILD.md, "Sparse inference"). Heads after a unit at rows score its
    active rows from tap products (no `dense_head`). Kernels are read from
    their stacks in place where oneDNN runs the convs (`conv.pick`).

    Returns what `_device_loop` returns, and the per-unit sizes, rows
    computed and modes (`[L - 1, 2]`, `[L - 1, 2]`, `[L - 1]`) for the
    records.
    """
    self.phases.trace('block_device_rows')
    maps, halting_carry, sizes = self._first_maps(first_vars, stacked_heads,
                                                  x_in, flops_B)
    maps['out'] = maps['x']  # The loop carries `out` from unit 2 on.
    batch, height, width = halting_carry['state'].running.shape
    num_rows = batch * height * width
    costs = self.costs
    last = self.num_units - 2
    buckets = self.phases.options.buckets
    plans = [_TailPlan(chunk, rows_lib.granule_for(num_rows, chunk, buckets),
                       num_rows)
             for chunk in (costs.chunk_dilated, costs.chunk_active)]

    def run_unit(i, maps, halting_carry, sizes):
      """Unit i: the maps, carry and sizes after it, its rows and mode.

      Every unit runs with a head; the last one's is a stand-in (the
      stack's last head) whose results `body` drops, so that one compiled
      body serves every unit.
      """
      unit_vars = _Picked(stacked_units, i)
      head_vars = _Picked(stacked_heads, i + 1)
      n_dilated, n_active = sizes[0], sizes[1]
      dense = costs.runs_dense(n_dilated, n_active, num_rows)

      def densely(maps, halting_carry):
        maps, carry, new_sizes = self._stage_active(
            unit_vars, head_vars, maps, halting_carry, 0, tail=0,
            dense=True, with_head=True, dense_head=True)
        return (maps, carry, new_sizes,
                jnp.full((2,), num_rows, jnp.int32))

      def at_rows(maps, halting_carry):
        if self.fuses(maps['x'].dtype, num_rows):  # All rows, one program.
          maps = self._stage_dilated(
              unit_vars, head_vars, maps, halting_carry['state'], 0, tail=0,
              hw=(height, width), with_taps=True)
          maps, carry, new_sizes = self._stage_active(
              unit_vars, head_vars, maps, halting_carry, 0, tail=0,
              dense=False, with_head=True, dense_head=False)
          return (maps, carry, new_sizes, jnp.stack([n_dilated, n_active]))
        n_full, tail = plans[0](n_dilated)
        maps = lax.switch(tail, [functools.partial(
            self._stage_dilated, tail=t, hw=(height, width),
            with_taps=True) for t in plans[0].tails],
                          unit_vars, head_vars, maps,
                          halting_carry['state'], n_full, n_dilated)
        rows_dilated = plans[0].rows(n_full, tail)
        n_full, tail = plans[1](n_active)
        maps, carry, new_sizes = lax.switch(tail, [functools.partial(
            self._stage_active, tail=t, dense=False, with_head=True,
            dense_head=False) for t in plans[1].tails],
                                            unit_vars, head_vars, maps,
                                            halting_carry, n_full, n_active)
        return (maps, carry, new_sizes,
                jnp.stack([rows_dilated, plans[1].rows(n_full, tail)]))

      with conv_lib.stacked_unit(i):
        if isinstance(dense, bool):  # 'rows' or 'dense' mode: static.
          out = (densely if dense else at_rows)(maps, halting_carry)
        else:
          out = lax.cond(dense, densely, at_rows, maps, halting_carry)
      return (*out, jnp.asarray(dense))

    def cond(loop):
      i, _, _, sizes, _, _ = loop
      return (i <= last) & (sizes[1] > 0)

    def body(loop):
      i, maps, halting_carry, sizes, waste, log = loop
      maps, new_carry, new_sizes, rows_2, dense = run_unit(
          i, maps, halting_carry, sizes)
      with_head = i < last
      # After the last unit, the halting state and FLOPs stay as they were.
      halting_carry = jax.tree.map(
          lambda new, old: jnp.where(with_head, new, old), new_carry,
          halting_carry)
      waste = waste + costs.waste_on_device(dense, sizes, rows_2, num_rows,
                                            with_head)
      log = {'sizes': log['sizes'].at[i].set(sizes),
             'rows': log['rows'].at[i].set(rows_2),
             'dense': log['dense'].at[i].set(dense)}
      return i + 1, maps, halting_carry, new_sizes, waste, log

    pairs = jnp.zeros((last + 1, 2), jnp.int32)
    log = {'sizes': pairs, 'rows': pairs,
           'dense': jnp.zeros((last + 1,), jnp.bool_)}
    steps, maps, halting_carry, _, waste, log = lax.while_loop(
        cond, body, (jnp.int32(0), maps, halting_carry, sizes,
                     jnp.zeros((), jnp.float32), log))
    # Heads not run once no position runs (the last unit has none).
    skipped = jnp.maximum(last - steps, 0)
    out, ponder, units, flops_B = self._finish(maps, halting_carry, skipped)
    usage_3 = jnp.concatenate([
        jnp.sum(log['sizes'], axis=0).astype(jnp.float32),
        steps.astype(jnp.float32)[None]])
    return (out, ponder, units, flops_B, waste, steps, usage_3,
            log['sizes'], log['rows'], log['dense'])

  def _finish(self, maps, halting_carry, skipped_heads):
    """The last halting step and the block output.

    Heads skipped because every position had halted still count (their
    global conv): the reference counts it for every unit.
    """
    self.phases.trace('block_finish')
    state = halting_carry['state']
    halting_shape = state.running.shape
    state = act_lib.finish(state, common.dummy_output(halting_shape),
                           self.eps)
    flops_B = halting_carry['flops'] + skipped_heads * self.idle_head_flops
    out = maps['out'].reshape(*halting_shape, -1)
    return out, state.ponder_cost, state.num_units, flops_B

  # Host loop -------------------------------------------------------------

  def on_device(self, in_shape) -> bool:
    """Whether the block runs as one device loop for inputs of `in_shape`.

    'device' mode, or 'auto' where a dense unit (for the whole batch) costs
    less than `device_flops` or where `adapt` says so; one-unit blocks have
    nothing to loop over.
    """
    if self.num_units == 1:
      return True
    opts = self.phases.options
    if opts.sact_mode != 'auto':
      return opts.sact_mode == 'device'
    return self._cheap(in_shape) or (
        opts.adapt and self._adapted_device(tuple(in_shape)))

  def _cheap(self, in_shape) -> bool:
    """Whether a dense unit (for the whole batch) costs less than
    `device_flops`: in 'auto', a device loop whatever halts."""
    unit_flops = (self.num_rows(in_shape)
                  * (self.costs.dilated_cost + self.costs.active_cost))
    return unit_flops < self.phases.device_flops

  def _adapted_device(self, in_shape) -> bool:
    """`adapt`: device loop while its average unit would run densely."""
    usage = self._usage.pop(in_shape, None)
    if usage is not None:
      dilated, active, units = np.asarray(usage).tolist()
      self._adapted[in_shape] = units == 0 or self.costs.runs_dense(
          round(dilated / units), round(active / units),
          self.num_rows(in_shape))
    return self._adapted.get(in_shape, False)

  def did_dense_work(self, in_shape, usage_3: jax.Array) -> bool:
    """Whether a device loop with this usage (`_device_loop`) did what the
    dense model's block does (`adapt`'s step to the dense model): every
    unit at every position, or, in a block that is a device loop whatever
    halts (`_cheap`), every unit, its halted positions masked as the dense
    model masks them."""
    dilated, active, units = np.asarray(usage_3).tolist()
    if units != self.num_units - 1:
      return False
    return (dilated == active == units * self.num_rows(in_shape)
            or self._cheap(in_shape))

  def dense_call_fits(self, in_shape, num_units_BxHxW) -> bool:
    """Whether a call of the dense model did no more than this block's
    device loop would have: every position ran every unit, or, in a block
    that is a device loop whatever halts, some position did (`adapt`'s
    step back from the dense model)."""
    units = np.asarray(num_units_BxHxW)
    reached = units.max() if self._cheap(in_shape) else units.min()
    return int(reached) == self.num_units

  def note_device_usage(self, in_shape, usage_3: jax.Array) -> None:
    """Keeps a device loop's usage (`_device_loop`) for `adapt`."""
    if self.costs is not None:
      self._usage[tuple(in_shape)] = usage_3

  def rows_on_device(self, in_shape) -> bool:
    """Whether the units at rows run in one device program per block
    (`SparseOptions.rows_loop`) rather than from the host loop."""
    opts = self.phases.options
    if self.num_units == 1 or opts.sact_mode not in ('auto', 'rows'):
      return False
    if opts.rows_loop == 'auto':
      return (self.num_rows(in_shape) * self.costs.channels
              <= opts.device_rows_floats)
    return opts.rows_loop == 'device'

  def device_run(self, weights, x_in, flops_B, rows: bool = False):
    """The block as one traceable function: `_device_loop` where
    `on_device`, `_device_rows` with `rows`.

    Returns the outputs of `run`, the units run after the first, the usage
    for `adapt` and (`rows`, else None) the per-unit log of
    `_device_rows`.
    """
    if self.num_units == 1:
      out, ponder, units, flops_B = self._single(weights.first, x_in, flops_B)
      return (out, ponder, units, flops_B, jnp.zeros((), jnp.float32),
              jnp.zeros((), jnp.int32), jnp.zeros((3,), jnp.float32), None)
    args = (weights.first, weights.stacked_units, weights.stacked_heads, x_in,
            flops_B)
    if rows:
      out = self._device_rows(*args)
      return (*out[:7], out[7:])
    return (*self._device_loop(*args), None)

  def record_rows(self, in_shape, log) -> None:
    """Records `_device_rows`'s per-unit log as the host loop records its
    units, read on the host only when the records are (it waits for the
    block)."""
    num_rows = self.num_rows(in_shape)

    def entries():
      sizes, rows, dense = (np.asarray(a).tolist() for a in log)
      out = []
      for i, ((n_dilated, n_active), (r_dilated, r_active), is_dense) in (
          enumerate(zip(sizes, rows, dense))):
        if n_active == 0:
          break
        out.append({'unit': i, 'rows': num_rows, 'dilated': n_dilated,
                    'active': n_active, 'dense': is_dense,
                    'rows_dilated': r_dilated, 'rows_active': r_active,
                    'device_rows': True})
      return out

    self.phases.record_later(entries)

  def run(self, weights, x_in, flops_B, clock: common.Clock):
    """Runs the block; returns its output, aux maps, FLOPs and waste."""
    if self.num_units == 1:
      out, ponder, units, flops_B = clock('block_single', self.single,
                                          weights.first, x_in, flops_B)
      return out, ponder, units, flops_B, 0
    if self.on_device(x_in.shape):
      out, ponder, units, flops_B, waste, steps, usage = clock(
          'block_device_loop', self.device_loop, weights.first,
          weights.stacked_units, weights.stacked_heads, x_in, flops_B)
      self.note_device_usage(x_in.shape, usage)
      self.phases.record({'device_loop': True, 'steps': steps})
      return out, ponder, units, flops_B, waste
    if self.rows_on_device(x_in.shape):
      out, ponder, units, flops_B, waste, _, usage, *log = clock(
          'block_device_rows', self.device_rows, weights.first,
          weights.stacked_units, weights.stacked_heads, x_in, flops_B)
      self.note_device_usage(x_in.shape, usage)
      self.record_rows(x_in.shape, log)
      return out, ponder, units, flops_B, waste
    opts = self.phases.options
    maps, halting_carry, sizes, stop, sizes_Ux2 = clock(
        'block_start', self.start, weights.first, weights.stacked_units,
        weights.stacked_heads, weights.units[0], self._head_after(weights, 0),
        x_in, flops_B)
    halting_shape = halting_carry['state'].running.shape
    num_rows = math.prod(halting_shape)
    fused = self.fuses(x_in.dtype, num_rows)
    planner = planner_lib.Planner(
        sizes, num_rows=num_rows, chunk_dilated=self.costs.chunk_dilated,
        chunk_active=self.costs.chunk_active, buckets=opts.buckets,
        pipeline=opts.pipeline,
        read=lambda values: common.read_counts(values, clock),
        # Fused stages compute the head's taps at their rows inside their
        # calls; on the whole map the head's local conv is an XLA dot of 9
        # columns (14x14x1024 maps at batch 32: 3-4 ms a unit).
        head_runs_dense=lambda rows_dilated, rows_active: not fused and (
            self.costs.head_runs_dense(rows_dilated, rows_active, num_rows)))
    first = self._dense_ran(planner, 0, stop, sizes_Ux2, clock)
    maps, halting_carry, skipped = self._run_units(
        weights, planner, maps, halting_carry, clock, first, fused)
    out, ponder, units, flops_B = clock('block_finish', self.finish, maps,
                                        halting_carry, skipped)
    waste = self._account(planner, fused)
    # Every unit dense (or none run): the device loop does the same work
    # without a round trip per unit (`adapt`).
    self._adapted[tuple(x_in.shape)] = all(
        plan.dense for plan in planner.plans)
    if len(planner.plans) < self.num_units - 1:
      self.phases.record(
          {'units_skipped': self.num_units - 1 - len(planner.plans)})
    return out, ponder, units, flops_B, waste

  @staticmethod
  def _head_after(weights, i: int):
    """The head after unit i (index into units 2..L), or any head if the
    unit has none (for `_dense_loop`, which then does not run it)."""
    return weights.heads[min(i + 1, len(weights.heads) - 1)]

  def _dense_ran(self, planner, first, stop, sizes_Ux2, clock) -> int:
    """Plans the units `_dense_loop` ran from unit `first`; the next one."""
    stop = common.read_counts(stop, clock)[0]
    start = time.perf_counter()
    sizes_Ux2 = np.asarray(sizes_Ux2).tolist()  # Python ints, as read.
    for k in range(first, stop):
      planner.plan(tuple(sizes_Ux2[k]), dense=True, with_head=True)
      planner.add_sizes(sizes_Ux2[k + 1])
    clock.host('host', start)
    return stop

  def _run_units(self, weights, planner, maps, halting_carry, clock,
                 first, fused: bool):
    """Units 2..L from unit `first` (index into them) until none is
    active, their stages fused where `fused` (`fuses`); returns the heads
    skipped too.

    A unit that runs densely hands over to `dense_loop`, which runs it and
    the next ones on the device for as long as they would run densely too.
    """
    height, width = halting_carry['state'].running.shape[1:]
    num_rows = planner.num_rows
    last = self.num_units - 2
    i = first
    while i <= last:
      sizes, exact = planner.sizes(i)
      dense = self.costs.runs_dense(*sizes, num_rows)
      if dense and not exact:
        # Never run a whole map on a stale bound: the unit may be sparse.
        sizes = planner.exact_sizes(i)
        dense = self.costs.runs_dense(*sizes, num_rows)
      if sizes[1] == 0:
        return maps, halting_carry, last - i
      start = time.perf_counter()
      with_head = i < last
      if dense and with_head:
        maps, halting_carry, stop, sizes_Ux2 = clock(
            'dense_loop', self.dense_loop, weights.stacked_units,
            weights.stacked_heads, weights.units[i],
            self._head_after(weights, i), maps, halting_carry,
            np.asarray(sizes, np.int32), np.int32(i))
        i = self._dense_ran(planner, i, stop, sizes_Ux2, clock)
        continue
      head = weights.heads[i + 1] if with_head else None
      plan = planner.plan(sizes, dense=dense, with_head=with_head)
      # Fused stages take every row at once: one program whatever the plan.
      (full_dilated, tail_dilated), (full_active, tail_active) = (
          ((0, 0), (0, 0)) if fused else
          ((plan.dilated.n_full, plan.dilated.tail),
           (plan.active.n_full, plan.active.tail)))
      clock.host('host', start)
      if not dense:
        with_taps = with_head and not plan.dense_head
        maps = clock('stage_dilated', self.stage_dilated, weights.units[i],
                     head if with_taps else None, maps,
                     halting_carry['state'], full_dilated, tail=tail_dilated,
                     hw=(height, width), with_taps=with_taps)
      maps, new_carry, sizes = clock(
          'stage_active', self.stage_active, weights.units[i], head, maps,
          halting_carry, full_active, tail=tail_active,
          dense=dense, with_head=with_head, dense_head=plan.dense_head)
      if with_head:
        halting_carry = new_carry
        planner.add_sizes(sizes)
      i += 1
    return maps, halting_carry, 0

  def _account(self, planner: planner_lib.Planner, fused: bool) -> int:
    """Records the units run; returns the FLOPs computed beyond the count.

    Reads the exact sizes of every unit run (the block is done by then).
    """
    waste = 0
    for (n_dilated, n_active), plan in planner.planned():
      waste += self.costs.waste(plan, n_dilated, n_active, planner.num_rows,
                                exact_rows=fused)
      self.phases.record({
          'rows': planner.num_rows, 'dilated': n_dilated,
          'active': n_active, 'dense': plan.dense,
          'dense_head': plan.dense_head,
          'planned_dilated': plan.dilated.count,
          'planned_active': plan.active.count,
          'tail_dilated': plan.dilated.tail, 'tail_active': plan.active.tail,
          'chunks_dilated': plan.dilated.n_full,
          'chunks_active': plan.active.n_full})
    return waste
