"""A block of residual units with (spatially) adaptive computation time.

The first unit (possibly strided) runs densely on its own; units 2..L run
under one `nnx.scan` over stacked parameters (created with `nnx.vmap`), so
compile time does not grow with depth. In evaluation it is a `lax.scan` over
unit indices that leaves the units' conv kernels stacked for oneDNN to read
in place (`conv.pick`). Algorithm 1 of the SACT paper runs on the fly in the
scan carry (`act.HaltingState`): no unit output is kept.

Scan step k (k = 2..L) holds the halting head of unit k-1 and unit k itself:
it scores x^{k-1}, updates the halting state, then applies unit k with the
resulting running mask. The head of the last unit does not exist (its score
is 1), which this pairing expresses without an unused head.
"""

import numbers
from typing import Callable, Literal

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

from sact_jax import act as act_lib
from sact_jax import conv as conv_lib
from sact_jax import flops as flops_lib

ModelType = Literal['vanilla', 'act', 'sact']
MODEL_TYPES = ('vanilla', 'act', 'sact')
# `remat` values: the backend's default, none, the whole unit, or all but
# the outputs of XLA's convolutions.
REMAT_MODES = (None, False, True, 'convs')


def is_remat_mode(remat) -> bool:
  """Whether `remat` is one of `REMAT_MODES` (bools as bools, not 0 / 1)."""
  return remat is None or isinstance(remat, bool) or remat == 'convs'


def _keeps_convs(prim, *_, **__) -> bool:
  """A `jax.checkpoint` policy: keep what XLA's convolutions output."""
  return prim is lax.conv_general_dilated_p


def sact_runs(num_units_BxHxW: jax.Array, num_heads: int
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What units 2..L and their heads computed under SACT, from N.

  Unit k >= 2 ran where N >= k, its first conv where the 3x3 maximum of N
  is >= k (the dilated set), and the head before it where N >= k - 1.

  Args:
    num_units_BxHxW: int32 N, in 1..L.
    num_heads: L - 1.

  Returns:
    Per image, the positions summed over units 2..L where their first conv
    ran (`[B]`) and where the rest ran (`[B]`); per position, the heads
    that ran (`[B, H, W]`).
  """
  return (flops_lib.spatial_count(act_lib.dilate_mask(num_units_BxHxW) - 1),
          flops_lib.spatial_count(num_units_BxHxW - 1),
          jnp.minimum(num_units_BxHxW, num_heads))


class ScanStep(nnx.Module):
  """What one scan iteration owns: unit k and the halting head of unit k-1.

  Its attributes name the parameters (`steps/unit/...`, `steps/head/...`).
  """

  def __init__(self, unit: nnx.Module, head: nnx.Module | None):
    self.unit = unit
    self.head = head


class Block(nnx.Module):
  """L residual units with a shared halting state.

  Args:
    make_first: builds the first unit, called as `make_first(rngs=rngs)`.
    make_unit: builds one of units 2..L (identity shortcut), likewise.
    make_head: builds one halting head, likewise (unused for vanilla).
    num_units: L >= 1.
    model_type: 'vanilla', 'act' (one halting score per image) or 'sact'
      (one per position).
    eps: halting threshold is `1 - eps`.
    remat: rematerialise each scanned unit in the backward pass. True:
      recompute the whole unit; 'convs': keep the outputs of XLA's
      convolutions and recompute the rest, the BatchNorms, activations and
      heads (a CIFAR training step moves 17-21% fewer bytes on a GPU than
      keeping everything, by XLA's count; BUILD.md, "ACT and SACT over
      vanilla on a GPU"; the CPU's own convolutions (`conv.py`) are not
      XLA's, so there it recomputes everything). None: on the CPU only,
      where a scan's stacked per-unit residuals cost more memory traffic
      than recomputing the forward (BUILD.md, "The scan trap (XLA:CPU) and
      compile times"); accelerators keep their residuals.
    unroll: fully unroll the scan (for benchmarks: compile time then grows
      with depth).
  """

  def __init__(self, make_first: Callable[..., nnx.Module],
               make_unit: Callable[..., nnx.Module],
               make_head: Callable[..., nnx.Module],
               num_units: int, model_type: ModelType, *,
               eps: float = act_lib.DEFAULT_EPS,
               remat: bool | str | None = None, unroll: bool = False,
               rngs: nnx.Rngs):
    if model_type not in MODEL_TYPES:
      raise ValueError(f'model_type must be one of {MODEL_TYPES}, got '
                       f'{model_type!r}.')
    if num_units < 1:
      raise ValueError(f'A block needs at least one unit, got {num_units}.')
    if not (isinstance(eps, numbers.Real) or hasattr(eps, 'dtype')):
      # E.g. '0.01', which the comparison below would fail on obscurely.
      raise TypeError(f'eps must be a number in (0, 1), got {eps!r}.')
    if not 0.0 < eps < 1.0:
      raise ValueError(f'eps must lie in (0, 1), got {eps}.')
    if not is_remat_mode(remat):
      raise ValueError(f'remat must be one of {REMAT_MODES}, got {remat!r}.')
    self.num_units = num_units
    self.model_type = model_type
    self.eps = eps
    self.remat = (jax.default_backend() == 'cpu') if remat is None else remat
    self.unroll = unroll
    # Set by `model.eval()` / `model.train()`, as BatchNorm's is: in
    # evaluation the scan reads the units' conv kernels from their stack in
    # place where oneDNN runs them (`conv.pick`), which saves XLA:CPU a copy
    # of every kernel per unit and call; training slices them (a stack's
    # gradient per unit would be the whole stack).
    self.use_running_average = False
    self.first = make_first(rngs=rngs)
    adaptive = model_type != 'vanilla'
    if num_units > 1:
      @nnx.split_rngs(splits=num_units - 1)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_steps(rngs: nnx.Rngs) -> ScanStep:
        return ScanStep(make_unit(rngs=rngs),
                    make_head(rngs=rngs) if adaptive else None)
      self.steps = make_steps(rngs)
    else:
      self.steps = None

  def _scan(self, body, carry):
    # The units' kernels only: the heads' are few and read otherwise too.
    in_place = (conv_lib.kernels_read_in_place(self.steps.unit, ('unit',))
                if self.use_running_average else frozenset())
    if in_place:
      graphdef, stacked = nnx.split(self.steps)
      def indexed_body(i_carry, _):
        i, carry = i_carry
        with conv_lib.stacked_unit(i):
          step = nnx.merge(graphdef, conv_lib.pick(stacked, i, in_place))
          return (i + 1, body(carry, step)), None
      return lax.scan(indexed_body, (jnp.int32(0), carry), None,
                      length=self.num_units - 1,
                      unroll=True if self.unroll else 1)[0][1]
    if self.remat:
      body = nnx.remat(body, policy=_keeps_convs if self.remat == 'convs'
                       else None)
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                    unroll=True if self.unroll else 1)(carry, self.steps)

  def __call__(self, x_BxHxWxC: jax.Array, counter: flops_lib.FlopCounter
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the block; adds its FLOPs to `counter`.

    Returns:
      The block output (for ACT/SACT the halting-weighted sum of the unit
      outputs) and a dict with `ponder_cost` and `num_units` (`[B]` for ACT,
      `[B, H, W]` for SACT; empty for vanilla).
    """
    x = self.first(x_BxHxWxC)
    batch, height, width = x.shape[:3]
    hw = height * width
    counter.add(self.first.dense_flops(
        x_BxHxWxC.shape[1] * x_BxHxWxC.shape[2], hw))

    if self.model_type == 'vanilla':
      if self.steps is None:
        return x, {}
      def vanilla_body(x, step):
        return step.unit.plus_residual(x)
      x = self._scan(vanilla_body, x)
      counter.add((self.num_units - 1) * self._unit_dense_cost(hw))
      return x, {}

    sact = self.model_type == 'sact'
    halting_shape = (batch, height, width) if sact else (batch,)
    state = act_lib.init_state(x, halting_shape)
    eps = self.eps

    if self.steps is not None:
      def body(carry, step):
        x, state = carry
        state = act_lib.step(state, step.head(x), x, eps)
        if sact:
          x = act_lib.masked_residual(x, step.unit.residual(x),
                                      state.running)
        else:
          # ACT masks nothing: a halted image's later states get weight 0.
          x = step.unit.plus_residual(x)
        return x, state

      x, state = self._scan(body, (x, state))

    state = act_lib.finish(state, x, eps)
    if self.steps is not None:
      counter.add(self._adaptive_flops(state.num_units, hw))
    return state.output, {'ponder_cost': state.ponder_cost,
                          'num_units': state.num_units}

  def _adaptive_flops(self, num_units: jax.Array, hw: int) -> jax.Array:
    """FLOPs `[B]` of units 2..L and their heads, from the units used.

    Unit k >= 2 runs where N >= k, and the head before it (unit k-1's)
    where N >= k - 1: summed over the units, a position (SACT) or image
    (ACT) runs N - 1 units and min(N, L - 1) heads; under SACT a unit's
    first conv runs on the 3x3 dilation of its mask (`sact_runs`). Counted
    once here from the integer map rather than per unit inside the scan,
    which keeps three reductions and a 3x3 max per unit out of the loop;
    the counts are exact, and so are their float32 products with the costs
    (`flops.py`).

    Args:
      num_units: `[B, H, W]` (SACT) or `[B]` (ACT) int32 N, in 1..L.
      hw: positions of the block's maps.
    """
    unit, head = self.steps.unit, self.steps.head
    heads = self.num_units - 1
    if self.model_type == 'act':
      units_run = (num_units - 1).astype(jnp.float32)
      return ((unit.dilated_cost + unit.active_cost) * hw * units_run
              + head.flops_of_runs(jnp.minimum(num_units, heads), heads))
    dilated_B, active_B, heads_run = sact_runs(num_units, heads)
    return (dilated_B * unit.dilated_cost + active_B * unit.active_cost
            + head.flops_of_runs(heads_run, heads))

  def _unit_dense_cost(self, hw: int) -> int:
    """Dense FLOPs of one of units 2..L (read from the stacked params)."""
    unit = self.steps.unit
    return (unit.dilated_cost + unit.active_cost) * hw
