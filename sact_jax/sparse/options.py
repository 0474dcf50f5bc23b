"""Options of the sparse path and the cost model that applies them.

`SparseOptions` holds the knobs; `CostModel` turns them into the decisions
of one SACT block: rows per chunk of each stage, whether a unit runs at rows
or densely ('auto'), and the FLOPs computed beyond the reference count.
"""

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from sact_jax import halting
from sact_jax import models
from sact_jax import units as units_lib
from sact_jax.sparse import planner as planner_lib

ACT_LOOPS = ('host', 'device')
SACT_MODES = ('auto', 'rows', 'dense', 'device')
ROWS_LOOPS = ('auto', 'device', 'host')


@dataclasses.dataclass(frozen=True)
class SparseOptions:
  """Knobs of the sparse path.

  The defaults are tuned on a CPU (BUILD.md has the measurements). Costs are
  in FLOPs so that the cost model compares like with like: a cost of c is
  the time the machine takes for c FLOPs of conv matmuls.

  Attributes:
    buckets: tail sizes per chunk: a unit wastes at most `chunk / buckets`
      rows (or `N / buckets` when the whole map is smaller than a chunk) and
      jit compiles at most `buckets + 1` tail shapes per stage, map size and
      head/no head.
    chunk_bytes: target size of the gathered rows of one chunk; rows beyond
      it are processed in a loop (keeps im2col buffers in the last-level
      cache at large batch sizes, while giving each matmul hundreds of
      rows: below about 1000 rows oneDNN's row matmuls run well below
      their rate). Fused stages (`stages.runs_fused`) take all their rows
      in one call and tile them themselves.
    chunk_rows: fixed rows per chunk, overriding `chunk_bytes` (tests force
      tiny chunks to exercise the loop).
    sact_mode: how SACT units 2..L run. 'rows': at their active and dilated
      rows (gathered); 'dense': on the whole map, masked (a host loop that
      still stops once every position has halted); 'device': a block's
      units in one `lax.while_loop`, dense and masked, stopping once every
      position has halted (no host round trip per unit); 'auto': 'device'
      for blocks whose units are cheap (`device_flops`), else per unit
      'rows' or 'dense', whichever the cost model favours.
    gather_cost: for 'auto', the cost of moving one float through a gather
      or scatter. Rows pay when a unit's convs do many FLOPs per gathered
      float (wide channels).
    slice_cost: for 'auto', the cost of one gathered or scattered row
      segment (a fixed price per row and neighbour, whatever its width), so
      narrow rows (CIFAR) need fewer active positions to pay than wide ones.
    unit_cost: for 'auto', what running a unit at rows costs beyond its
      FLOPs, gathers and segments: the halting head's second pass, index
      sets and extra kernels. It matters only where a dense unit is cheap
      (small batches), where it sends units with most positions active to
      dense.
    device_flops: under 'auto', blocks whose dense unit costs fewer FLOPs
      (for the whole batch) run in 'device' mode: per-call dispatch and the
      count read-back would cost more than the unit. None: 50e6 on the CPU;
      on other backends every block ('device' mode), since an accelerator
      runs a whole unit of these networks in less time than the row path's
      separate gather, scatter and read-back kernels.
    adapt: under 'auto', a block that ran every unit densely (or none)
      in its last call for inputs of this shape runs as a device loop in
      the next one, without a host round trip per unit, until a device
      loop's average unit would have paid at rows; after a call in which
      every block was such a loop and did the dense model's work (no
      position halted early, or, in a block that is a device loop
      whatever halts (`device_flops`), every unit ran), the dense model
      itself runs, until one of its calls shows a block that would have
      skipped work. Outputs never depend on it, only the time (where
      nothing halts, ImageNet ResNet-101 batch 1: 1.06-1.11x the dense
      model from the host, 0.99-1.01x as device loops; CIFAR ResNet-110
      batch 1: 1.07-1.13x as one program, 1.01x with the dense model;
      halting at 30-50% of the FLOPs with every loop running every unit,
      about 4% less time with the dense model).
    rows_loop: where the units of 'rows' and 'auto' blocks that are not
      device loops of dense units are driven from. 'device': the block is
      one program (`SactBlock._device_rows`), a `lax.while_loop` whose
      body runs a unit at rows or densely (the cost model on its exact set
      sizes), each stage's tail chosen by a `lax.switch` over a few tail
      sizes: no host round trip per unit, but XLA copies the block's maps
      into the branches that update them, once per unit, and compiles
      every tail size. 'host': one or two calls per unit, planned by the
      host from the set sizes it reads back (pipelined plans,
      `dense_head`), compiling only the tails that occur. 'auto': 'device'
      where a map of the block holds at most `device_rows_floats` floats
      (the copies cost less than the round trips: every ImageNet
      ResNet-101 block at batch 1, blocks 3-4 at batch 4), else 'host'.
    device_rows_floats: the bound of `rows_loop='auto'`.
    act_loop: 'device' (one `lax.while_loop` over the units of a block,
      stopping once no image runs; unit parameters are sliced on the
      device) or 'host' (a jitted call per unit, the host checks whether
      any image is still running). 'device' is faster on a 2-core CPU both
      where nothing halts (CIFAR ResNet-110 batch 1: 1.14x the dense model
      vs 3.4x; ImageNet ResNet-101: 1.18x vs 1.40x) and where everything
      halts after unit 1 (0.22x vs 0.34x; 0.23x vs 0.24x): a host round
      trip per unit costs more than the unit at these sizes.
    pipeline: plan a SACT unit from the counts of the unit before it (an
      upper bound: halted positions never resume), so that the host does
      not wait for the unit it just queued, when the active count fell by
      at most this fraction of the positions at the previous unit (the
      rows that halted in between become padding); otherwise, and with 0,
      wait for the exact counts.
    dense_head: the halting head after a unit run at rows runs on the whole
      map instead (the dense model's head, no tap products at rows) when
      the rows the unit's two stages compute reach this fraction of the
      map's positions: at rows its tap products are computed at the dilated
      rows and again at the active ones, each with a gather and a scatter.
      0: always; `math.inf`: never. Not after fused stages
      (`SactBlock.fuses`), which compute the taps inside their calls.
    compiler_options: XLA compiler options for every jitted phase, as
      `(name, value)` pairs (e.g. `(('xla_backend_optimization_level', 0),)`
      for fast compiles in tests, at a large cost in speed); None:
      `common.compiler_options` (the dense model's and, on the CPU, a copy
      insertion that keeps maps in place in conditionals), () XLA's
      defaults.
  """
  buckets: int = 16
  chunk_bytes: int = 8 << 20
  chunk_rows: int | None = None
  sact_mode: str = 'auto'
  gather_cost: float = 60.0
  slice_cost: float = 750.0
  unit_cost: float = 45e6
  device_flops: float | None = None
  adapt: bool = True
  rows_loop: str = 'auto'
  device_rows_floats: int = 1 << 20
  act_loop: str = 'device'
  pipeline: float = 0.05
  dense_head: float = 1.0
  compiler_options: tuple[tuple[str, Any], ...] | None = None

  def __post_init__(self):
    for name in ('buckets', 'chunk_bytes', 'chunk_rows'):
      if getattr(self, name) is not None:
        models.positive_int(name, getattr(self, name))
    if self.sact_mode not in SACT_MODES:
      raise ValueError(f'sact_mode must be one of {SACT_MODES}, got '
                       f'{self.sact_mode!r}.')
    if not isinstance(self.adapt, bool):
      # `adapt='no'` would be truthy.
      raise TypeError(f'adapt must be True or False, got {self.adapt!r}.')
    # Numbers given as strings would fail below with a bare comparison error.
    for name in ('gather_cost', 'slice_cost', 'unit_cost', 'device_flops',
                 'pipeline', 'dense_head', 'device_rows_floats'):
      value = getattr(self, name)
      if not (isinstance(value, numbers.Real)
              or (value is None and name == 'device_flops')):
        raise TypeError(f'{name} must be a number, got {value!r}.')
    if min(self.gather_cost, self.slice_cost, self.unit_cost) < 0:
      raise ValueError('gather_cost, slice_cost and unit_cost must be >= 0, '
                       f'got {self.gather_cost}, {self.slice_cost}, '
                       f'{self.unit_cost}.')
    if not 0.0 <= self.pipeline <= 1.0:
      raise ValueError(f'pipeline must lie in [0, 1], got {self.pipeline}.')
    if self.device_flops is not None and self.device_flops < 0:
      raise ValueError(
          f'device_flops must be >= 0, got {self.device_flops}.')
    if self.compiler_options is not None:
      # A tuple of pairs: options are part of the jit cache key.
      pairs = self.compiler_options
      if isinstance(pairs, dict):
        pairs = pairs.items()
      try:
        pairs = tuple((str(name), value) for name, value in pairs)
      except (TypeError, ValueError):
        raise ValueError('compiler_options must be (name, value) pairs, got '
                         f'{self.compiler_options!r}.') from None
      object.__setattr__(self, 'compiler_options', pairs)
    if self.dense_head < 0:
      raise ValueError(f'dense_head must be >= 0, got {self.dense_head}.')
    if self.device_rows_floats < 0:
      raise ValueError('device_rows_floats must be >= 0, got '
                       f'{self.device_rows_floats}.')
    if self.rows_loop not in ROWS_LOOPS:
      raise ValueError(f'rows_loop must be one of {ROWS_LOOPS}, got '
                       f'{self.rows_loop!r}.')
    if self.act_loop not in ACT_LOOPS:
      raise ValueError(f'act_loop must be one of {ACT_LOOPS}, got '
                       f'{self.act_loop!r}.')


def device_flops(options: SparseOptions) -> float:
  """`options.device_flops`, None resolved for the default backend."""
  if options.device_flops is not None:
    return options.device_flops
  return 50e6 if jax.default_backend() == 'cpu' else math.inf


def chunk_rows(options: SparseOptions, floats_per_row: int) -> int:
  """Rows per chunk: a power of two near `chunk_bytes` of gathered rows."""
  if options.chunk_rows is not None:
    return options.chunk_rows
  rows = options.chunk_bytes // (4 * floats_per_row)
  return int(min(16384, max(16, 2 ** int(math.log2(max(rows, 1))))))


class CostModel:
  """What the units 2..L of one SACT block cost, in FLOPs.

  Attributes:
    dilated_cost, active_cost: conv FLOPs per position of a unit's dilated
      and active stages.
    local_cost: FLOPs per position of the halting head's local conv.
    chunk_dilated, chunk_active: rows per chunk of the two stages.
    channels: channels of the block's maps.
  """

  def __init__(self, options: SparseOptions, unit: units_lib.ResidualUnit,
               head: halting.SactHead):
    self.options = options
    self.dilated_cost = unit.dilated_cost
    self.active_cost = unit.active_cost
    self.local_cost = head.local_cost
    self.channels = channels = unit.cin
    mid = unit.dilated_channels
    window = unit.dilated_kernel_size ** 2
    # Floats per gathered row: the dilated stage reads `window` * C and
    # writes `mid`; the active stage reads a 3x3 im2col of `mid` and writes
    # C.
    self.chunk_dilated = chunk_rows(options, window * channels + mid)
    self.chunk_active = chunk_rows(options, 10 * mid + channels)
    # Floats gathered or scattered per row: the dilated stage reads its conv
    # input (and the rows for the head's taps) and writes `mid`; the active
    # stage reads a 3x3 im2col and `x`, writes `x`, `out`, `xsum`; a dense
    # unit streams about 3 maps of C (masked update, `out`, `xsum`).
    self._floats_dilated = window * channels + channels + mid
    self._floats_active = 9 * mid + 4 * channels
    self._floats_dense = 3 * channels
    # Row segments: the dilated stage gathers `window` neighbours (and the
    # row for the taps) and scatters `y`; the active stage gathers 9
    # neighbours and `x`, and scatters `x`, `out`, `xsum` and the taps.
    self._slices_dilated = window + 2
    self._slices_active = 9 + 5

  def runs_dense(self, n_dilated: int, n_active: int, num_rows: int) -> bool:
    """Whether a unit with these set sizes runs densely (`sact_mode`)."""
    opts = self.options
    if opts.sact_mode != 'auto':
      return opts.sact_mode == 'dense'
    # Floats: with traced sizes, Python ints past int32 would overflow.
    kappa, sigma = float(opts.gather_cost), float(opts.slice_cost)
    at_rows = (float(opts.unit_cost)
               + n_dilated * (self.dilated_cost + kappa * self._floats_dilated
                              + sigma * self._slices_dilated)
               + n_active * (self.active_cost + kappa * self._floats_active
                             + sigma * self._slices_active))
    dense = num_rows * (self.dilated_cost + self.active_cost
                        + kappa * self._floats_dense)
    return at_rows >= dense

  def waste(self, plan: planner_lib.UnitPlan, n_dilated: int, n_active: int,
            num_rows: int, exact_rows: bool = False) -> int:
    """Conv FLOPs a unit run as `plan` computes beyond the reference count.

    Args:
      plan: how the unit ran.
      n_dilated, n_active: the exact sizes of its sets.
      num_rows: positions of the map.
      exact_rows: whether its stages computed their sets' rows and no
        chunk padding (fused, `sparse.stages.fusable`).
    """
    if plan.dense:
      waste = (num_rows * (self.dilated_cost + self.active_cost)
               - n_dilated * self.dilated_cost - n_active * self.active_cost)
      if plan.with_head:  # The head's local conv runs on the whole map.
        waste += (num_rows - n_active) * self.local_cost
      return waste
    rows_dilated, rows_active = ((n_dilated, n_active) if exact_rows
                                 else (plan.dilated.rows, plan.active.rows))
    waste = ((rows_dilated - n_dilated) * self.dilated_cost
             + (rows_active - n_active) * self.active_cost)
    if plan.dense_head:  # The head's local conv runs on the whole map.
      waste += (num_rows - n_active) * self.local_cost
    elif plan.with_head:  # Taps on dilated and active rows, sums on active.
      waste += (rows_dilated + rows_active - n_active) * self.local_cost
    return waste

  def waste_on_device(self, dense, sizes_2: jax.Array, rows_2: jax.Array,
                      num_rows: int, with_head) -> jax.Array:
    """`waste` of a unit in `SactBlock._device_rows`, in float32.

    Args:
      dense: whether the unit ran densely (a bool or a traced one).
      sizes_2: its exact set sizes (dilated, active).
      rows_2: the rows its two stages computed.
      num_rows: positions of the map.
      with_head: whether its head counts (a traced bool): a unit without
        one (the block's last) ran a stand-in head, all of it waste. A head
        after a unit at rows ran at rows (tap products).
    """
    n_dilated, n_active = (sizes_2.astype(jnp.float32)[k] for k in (0, 1))
    rows_dilated, rows_active = (rows_2.astype(jnp.float32)[k]
                                 for k in (0, 1))
    conv = ((rows_dilated - n_dilated) * self.dilated_cost
            + (rows_active - n_active) * self.active_cost)
    head_rows = jnp.where(dense, num_rows, rows_dilated + rows_active)
    counted = jnp.where(with_head, n_active, 0.0)
    return conv + (head_rows - counted) * self.local_cost

  def head_runs_dense(self, rows_dilated: int, rows_active: int,
                      num_rows: int) -> bool:
    """Whether a sparse unit's head runs on the whole map (`dense_head`).

    At rows the head's tap products are computed at the dilated rows and
    again at the active rows, each with a gather and a scatter; on the
    whole map once per position, with no index work.
    """
    return rows_dilated + rows_active >= self.options.dense_head * num_rows
