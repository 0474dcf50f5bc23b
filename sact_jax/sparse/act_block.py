"""One ACT block with early stopping: dense units while any image runs.

A unit runs for the whole batch while any image still runs; the units of
images that halted earlier are computed but weigh 0 (as in the dense
model), and their FLOPs are overhead.
"""

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

from sact_jax import act as act_lib
from sact_jax import conv as conv_lib
from sact_jax.sparse import common


class ActBlock:
  """Jitted phases and the loop of one ACT block."""

  def __init__(self, phases: common.Phases, block: nnx.Module):
    self.phases = phases
    self.num_units = block.num_units
    self.eps = block.eps
    self.first_gd = common.graphdef(block.first)
    self.single = phases.jit(self._single)
    if block.steps is None:
      return
    unit = block.steps.unit
    self.unit_gd = common.graphdef(unit)
    # The device loop reads these kernels in place.
    self.in_place = conv_lib.kernels_read_in_place(unit)
    self.head_gd = common.graphdef(block.steps.head)
    self.unit_cost_per_position = unit.dilated_cost + unit.active_cost
    self.start = phases.jit(self._start)
    self.unit = phases.jit(self._unit, static_argnames=('with_head',),
                           donate_argnames=('carry',))
    self.finish = phases.jit(self._finish)
    self.device_loop = phases.jit(self._device_loop,
                                  donate_argnames=('carry',))

  def _first(self, first_vars, x_in, flops_B):
    return common.run_first_unit(self.first_gd, first_vars, x_in, flops_B)

  def _single(self, first_vars, x_in, flops_B):
    self.phases.trace('block_single')
    x, flops_B = self._first(first_vars, x_in, flops_B)
    state = act_lib.init_state(x, (x.shape[0],))
    state = act_lib.finish(state, x, self.eps)
    return state.output, state.ponder_cost, state.num_units, flops_B

  def _start(self, first_vars, head_vars, x_in, flops_B):
    self.phases.trace('block_start')
    x, flops_B = self._first(first_vars, x_in, flops_B)
    state = act_lib.init_state(x, (x.shape[0],))
    carry = {'x': x, 'state': state, 'flops': flops_B,
             'waste': jnp.zeros((), jnp.float32)}
    carry = self._apply_head(nnx.merge(self.head_gd, head_vars), carry)
    return carry, jnp.sum(carry['state'].running > 0).astype(jnp.int32)

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
    running = carry['state'].running
    return dict(
        carry,
        state=act_lib.step(carry['state'], head(carry['x']), carry['x'],
                           self.eps),
        flops=carry['flops'] + head.flops(running),
        waste=carry['waste'] + jnp.sum(head.flops(jnp.ones_like(running))
                                       - head.flops(running)))

  def _unit(self, unit_vars, head_vars, carry, *, with_head):
    self.phases.trace('act_unit')
    carry = self._apply_unit(nnx.merge(self.unit_gd, unit_vars), carry)
    if with_head:
      carry = self._apply_head(nnx.merge(self.head_gd, head_vars), carry)
    return carry, jnp.sum(carry['state'].running > 0).astype(jnp.int32)

  def _device_loop(self, stacked_units, stacked_heads, carry):
    """All units 2..L in one `lax.while_loop` that stops once all halted.

    Iteration i runs unit i+2, then (except after the last unit) the head
    of unit i+2, which the stacked heads hold at index i+1.
    """
    self.phases.trace('act_device_loop')
    last = self.num_units - 2

    def cond(loop):
      i, carry = loop
      return (i <= last) & jnp.any(carry['state'].running > 0)

    def body(loop):
      i, carry = loop
      with conv_lib.stacked_unit(i):
        carry = self._apply_unit(
            nnx.merge(self.unit_gd,
                      conv_lib.pick(stacked_units, i, self.in_place)), carry)
      headed = self._apply_head(
          nnx.merge(self.head_gd,
                    conv_lib.pick(stacked_heads, jnp.minimum(i + 1, last))),
          carry)
      carry = jax.tree.map(lambda a, b: jnp.where(i < last, a, b), headed,
                           carry)
      return i + 1, carry

    return lax.while_loop(cond, body, (jnp.int32(0), carry))[1]

  def _finish(self, carry):
    self.phases.trace('block_finish')
    state = act_lib.finish(carry['state'], carry['x'], self.eps)
    return (state.output, state.ponder_cost, state.num_units, carry['flops'],
            carry['waste'])

  def device_run(self, weights, x_in, flops_B):
    """The block as one traceable function (`act_loop='device'`).

    For `SparseRunner`'s whole-model program: the phases of `run` with the
    device loop, without a host call between them.
    """
    if self.num_units == 1:
      out, ponder, units, flops_B = self._single(weights.first, x_in, flops_B)
      return out, ponder, units, flops_B, jnp.zeros((), jnp.float32)
    carry, _ = self._start(weights.first, weights.heads[0], x_in, flops_B)
    carry = self._device_loop(weights.stacked_units, weights.stacked_heads,
                              carry)
    return self._finish(carry)

  def run(self, weights, x_in, flops_B, clock: common.Clock):
    """Runs the block; returns its output, aux maps, FLOPs and waste."""
    if self.num_units == 1:
      out, ponder, units, flops_B = clock('block_single', self.single,
                                          weights.first, x_in, flops_B)
      return out, ponder, units, flops_B, 0
    carry, running = clock('block_start', self.start, weights.first,
                           weights.heads[0], x_in, flops_B)
    if self.phases.options.act_loop == 'device':
      carry = clock('act_device_loop', self.device_loop,
                    weights.stacked_units, weights.stacked_heads, carry)
    else:
      for i in range(self.num_units - 1):
        if common.read_counts(running, clock)[0] == 0:
          self.phases.record({'units_skipped': self.num_units - 1 - i})
          break
        with_head = i < self.num_units - 2
        self.phases.record({'unit': i + 2})
        carry, running = clock(
            'act_unit', self.unit, weights.units[i],
            weights.heads[i + 1] if with_head else None, carry,
            with_head=with_head)
    return clock('block_finish', self.finish, carry)
