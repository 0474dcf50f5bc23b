"""Halting arithmetic of ACT and SACT as pure functions.

Nothing here owns parameters: the functions take halting scores and unit
outputs and return the halting distribution, the number of units used, the
remainder and the ponder cost (Graves 2016; Figurnov et al. 2017, Algorithm 1).
The trailing shape of every array is free: `[B]` for ACT (one score per
image), `[B, H, W]` for SACT (one per position).

Conventions follow the reference implementation (docs/method.md, section 1):

* `N = min{n : sum_{l <= n} h^l >= 1 - eps}`, with the last unit's score
  treated as 1, so N <= L.
* `R = 1 - sum_{l < N} h^l`; `p^l = h^l` for l < N, `R` for l = N, 0 after.
* `rho = N + R`. N carries no gradient, so d rho / d h^l = -1 for l < N.
"""

import functools
import numbers
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

DEFAULT_EPS = 0.01


class HaltingDistribution(NamedTuple):
  """Closed-form result of ACT over L units (shapes `[L, ...]` or `[...]`)."""
  probs: jax.Array  # [L, ...] p^l, sums to 1 over L.
  num_units: jax.Array  # [...] int32 N in 1..L.
  remainder: jax.Array  # [...] R.
  ponder_cost: jax.Array  # [...] rho = N + R.


def _threshold(eps: float, dtype) -> jax.Array:
  return jnp.asarray(1.0 - eps, dtype)


def _check_eps(eps):
  """Refuses a threshold 1 - eps outside (0, 1).

  Every concrete scalar is checked, numpy and JAX ones included (a numpy
  `1.5` would otherwise halt everything at the first unit); a traced eps
  cannot be, and is trusted.
  """
  if isinstance(eps, jax.core.Tracer):
    return
  if not (isinstance(eps, numbers.Real) or hasattr(eps, 'dtype')):
    raise TypeError(f'eps must be a number in (0, 1), got {eps!r}.')
  if np.ndim(eps) == 0 and not 0.0 < float(eps) < 1.0:
    raise ValueError(f'eps must lie in (0, 1), got {eps}.')


def _check_halting_dtype(halting: jax.Array):
  """Integer scores would make the threshold 0 (every unit halts at once)."""
  if not jnp.issubdtype(halting.dtype, jnp.floating):
    raise TypeError('halting scores must be floats in [0, 1] (sigmoid '
                    f'outputs), got dtype {halting.dtype}.')


def _check_halting_values(halting: jax.Array):
  """Scores outside [0, 1] or NaN give a confident, wrong N.

  Only concrete arrays are checked: under jit the values are unknown.
  """
  if not halting.size:
    return
  values = np.asarray(halting)
  if np.isnan(values).any():
    raise ValueError('halting scores must be floats in [0, 1] (sigmoid '
                     'outputs), got NaN.')
  low, high = values.min(), values.max()
  if low < 0 or high > 1:
    raise ValueError('halting scores must be floats in [0, 1] (sigmoid '
                     f'outputs), got values in [{low:g}, {high:g}].')


def _check_leading(name: str, shape, halting_shape):
  """One clear error where `shape` does not start with the halting shape.

  Broadcasting would otherwise pair a `[1, W]` mask with `[B, H, W, C]`.
  """
  if tuple(shape[:len(halting_shape)]) != tuple(halting_shape):
    raise ValueError(f'{name} has shape {tuple(shape)}, which does not start '
                     f'with the halting shape {tuple(halting_shape)}.')


def halting_distribution(halting: jax.Array,
                         eps: float = DEFAULT_EPS) -> HaltingDistribution:
  """ACT over all L units at once.

  Args:
    halting: `[L, ...]` halting scores in [0, 1]; `halting[L-1]` is ignored
      and treated as 1 (the last unit always halts).
    eps: halting threshold is `1 - eps`.

  Returns:
    The `HaltingDistribution`.

  Raises:
    TypeError: non-float scores.
    ValueError: a bad shape or eps, or (when not traced) scores outside
      [0, 1] or NaN.
  """
  _check_eps(eps)
  if jnp.ndim(halting) < 1 or jnp.shape(halting)[0] < 1:
    raise ValueError('halting must be shaped [L, ...] with L >= 1 units, '
                     f'got shape {jnp.shape(halting)}.')
  halting = jnp.asarray(halting)
  _check_halting_dtype(halting)
  if not isinstance(halting, jax.core.Tracer):
    _check_halting_values(halting[:-1])  # The last score is ignored.
  num_layers = halting.shape[0]
  h = halting.at[num_layers - 1].set(1.0)
  cumulative = jnp.cumsum(h, axis=0)
  reached = cumulative >= _threshold(eps, h.dtype)
  n0 = jnp.argmax(reached, axis=0)  # 0-based index of the halting unit.
  index = lax.broadcasted_iota(jnp.int32, h.shape, 0)
  before = index < n0
  remainder = 1.0 - jnp.sum(jnp.where(before, h, 0.0), axis=0)
  probs = jnp.where(before, h, jnp.where(index == n0, remainder, 0.0))
  num_units = (n0 + 1).astype(jnp.int32)
  return HaltingDistribution(
      probs=probs, num_units=num_units, remainder=remainder,
      ponder_cost=num_units.astype(h.dtype) + remainder)


class HaltingState(NamedTuple):
  """The carry of Algorithm 1: everything ACT needs between two units.

  `running` is the residual mask of the *next* unit: 1 where the position
  (or image) has not halted yet.
  """
  cumulative: jax.Array  # [...] sum of the halting scores seen so far.
  remainder: jax.Array  # [...] R, valid once halted (1 - cumulative before).
  output: jax.Array  # [..., C] sum_l p^l x^l so far.
  ponder_cost: jax.Array  # [...] N + R so far.
  num_units: jax.Array  # [...] int32 units used so far.
  running: jax.Array  # [...] float 1 = still running, 0 = halted.


def init_state(x: jax.Array, batch_shape: tuple[int, ...]) -> HaltingState:
  """A state before the first unit, for unit outputs shaped like `x`.

  Args:
    x: an example unit output `[*batch_shape, ..., C]`; only its dtype and the
      shape of the accumulator are taken from it.
    batch_shape: the halting shape, `[B]` for ACT or `[B, H, W]` for SACT.
  """
  _check_leading('x', x.shape, batch_shape)
  zeros = jnp.zeros(batch_shape, x.dtype)
  return HaltingState(
      cumulative=zeros, remainder=zeros, output=jnp.zeros_like(x),
      ponder_cost=zeros, num_units=jnp.zeros(batch_shape, jnp.int32),
      running=jnp.ones(batch_shape, x.dtype))


def _expand(a: jax.Array, ndim: int) -> jax.Array:
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def step(state: HaltingState, halting: jax.Array, x: jax.Array,
         eps: float = DEFAULT_EPS) -> HaltingState:
  """Accounts for one unit: its output `x` and its halting score.

  Args:
    state: the carry after the previous units.
    halting: `[...]` score of this unit in [0, 1] (the halting shape);
      pass ones for the last.
    x: `[..., C...]` this unit's output, shaped as `init_state`'s `x`.
    eps: halting threshold is `1 - eps`.

  Returns:
    The carry after this unit. Scores of halted positions are ignored.
  """
  _check_eps(eps)
  # Exact shapes: a head's raw `[..., 1]` output, or an `x` without its
  # channel axis, would broadcast (or fail inside JAX) instead.
  if tuple(jnp.shape(halting)) != tuple(state.cumulative.shape):
    raise ValueError(
        f'halting has shape {tuple(jnp.shape(halting))}; expected the halting '
        f'shape {tuple(state.cumulative.shape)} (drop the channel axis of a '
        "head's output).")
  if tuple(jnp.shape(x)) != tuple(state.output.shape):
    raise ValueError(
        f'x has shape {tuple(jnp.shape(x))}; expected the shape of the unit '
        f'outputs the state was made for, {tuple(state.output.shape)}.')
  _check_halting_dtype(jnp.asarray(halting))
  num_units = state.num_units + (state.running > 0).astype(jnp.int32)
  floats = _Floats(state.cumulative, state.remainder, state.output,
                   state.ponder_cost, state.running)
  if isinstance(eps, (int, float)):
    floats = _step(floats, halting, x, eps)
  else:  # An array, e.g. traced by jit: an input without a gradient.
    floats = _step_array_eps(floats, halting, x,
                             jnp.asarray(eps, state.cumulative.dtype))
  return HaltingState(
      cumulative=floats.cumulative, remainder=floats.remainder,
      output=floats.output, ponder_cost=floats.ponder_cost,
      num_units=num_units, running=floats.running)


class _Floats(NamedTuple):
  """The differentiable part of a `HaltingState` (all but `num_units`)."""
  cumulative: jax.Array
  remainder: jax.Array
  output: jax.Array
  ponder_cost: jax.Array
  running: jax.Array


def _weight(running: jax.Array, cumulative: jax.Array, halting: jax.Array,
            eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A unit's masked score h, whether it halts there, and its weight p.

  Args:
    running, cumulative: the mask and the cumulative score before the unit.
    halting: the unit's score.
    eps: halting threshold is `1 - eps`.
  """
  h = halting * running  # Finished positions contribute nothing.
  halts_now = (running > 0) & (cumulative + h >= _threshold(eps, h.dtype))
  return h, halts_now, jnp.where(halts_now, 1.0 - cumulative, h)


def _step_values(state: _Floats, halting: jax.Array, x: jax.Array,
                 eps: float) -> _Floats:
  """`step` without the unit count."""
  running = state.running
  h, halts_now, p = _weight(running, state.cumulative, halting, eps)
  cumulative = state.cumulative + h
  halts_now_f = halts_now.astype(h.dtype)
  remainder_here = 1.0 - state.cumulative
  output = state.output + _expand(p, x.ndim).astype(x.dtype) * x
  remainder = jnp.where(halts_now, remainder_here, state.remainder)
  # rho = N + R: +1 for every unit run, +R at the halting unit.
  ponder_cost = (state.ponder_cost + running
                 + halts_now_f * remainder_here)
  return _Floats(cumulative=cumulative, remainder=remainder, output=output,
                 ponder_cost=ponder_cost,
                 running=running * (1.0 - halts_now_f))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _step(state, halting, x, eps):
  return _step_values(state, halting, x, eps)


def _step_fwd(state, halting, x, eps):
  """Keeps `x` (which its unit keeps anyway) and one `[3, ...]` array.

  Autodiff of `_step_values` keeps five arrays of the halting shape per
  unit (the mask, the halting decision twice, the weight, its broadcast),
  each one more store into a scan's stack of kept values: a kernel each
  on a GPU, where a training step's small kernels are most of SACT's
  extra ones (BUILD.md, "ACT and SACT over vanilla on a GPU").
  """
  kept = jnp.stack([state.running, state.cumulative,
                    halting.astype(state.cumulative.dtype)])
  return _step_values(state, halting, x, eps), (kept, x)


def _step_bwd(eps, residuals, g):
  """The gradients of `_step_values`, from the kept inputs recomputed."""
  kept, x = residuals
  running, cumulative, halting = kept[0], kept[1], kept[2]
  h, halts_now, p = _weight(running, cumulative, halting, eps)
  halts_now_f = halts_now.astype(h.dtype)
  # output = output_before + p * x.
  g_x = (_expand(p, x.ndim).astype(x.dtype) * g.output).astype(x.dtype)
  trailing = tuple(range(p.ndim, x.ndim))
  g_p = jnp.sum(g.output * x, axis=trailing).astype(h.dtype)
  # p = where(halts_now, 1 - cumulative_before, h); then the cumulative,
  # remainder, ponder cost and mask after the unit.
  g_h = g.cumulative + jnp.where(halts_now, 0.0, g_p)
  g_state = _Floats(
      cumulative=(g.cumulative
                  - jnp.where(halts_now, g_p + g.remainder, 0.0)
                  - halts_now_f * g.ponder_cost),
      remainder=jnp.where(halts_now, 0.0, g.remainder),
      output=g.output, ponder_cost=g.ponder_cost,
      running=(g.ponder_cost + g.running * (1.0 - halts_now_f)
               + g_h * halting))
  return g_state, (g_h * running).astype(halting.dtype), g_x


_step.defvjp(_step_fwd, _step_bwd)


@jax.custom_vjp
def _step_array_eps(state, halting, x, eps):
  """`_step` for an array `eps` (custom_vjp's static arguments are hashable
  Python values); the threshold is piecewise constant in it: no gradient."""
  return _step_values(state, halting, x, eps)


def _step_array_eps_fwd(state, halting, x, eps):
  out, residuals = _step_fwd(state, halting, x, eps)
  return out, (residuals, eps)


def _step_array_eps_bwd(residuals, g):
  residuals, eps = residuals
  return (*_step_bwd(eps, residuals, g), jnp.zeros_like(eps))


_step_array_eps.defvjp(_step_array_eps_fwd, _step_array_eps_bwd)


def finish(state: HaltingState, x_last: jax.Array,
           eps: float = DEFAULT_EPS) -> HaltingState:
  """Accounts for the last unit, whose halting score is always 1."""
  return step(state, jnp.ones_like(state.cumulative), x_last, eps)


def masked_residual(x: jax.Array, residual: jax.Array,
                    mask: jax.Array) -> jax.Array:
  """`x + mask * residual`: halted positions keep their value.

  Args:
    x: `[B, H, W, C]` unit input.
    residual: `[B, H, W, C]` residual branch output.
    mask: `[B, H, W]` (SACT) or `[B]` (ACT) running mask.
  """
  _check_leading('residual', residual.shape, x.shape)
  if mask.ndim not in (1, x.ndim - 1):
    raise ValueError(f'mask has shape {mask.shape}: a per-image [B] or '
                     f'per-position mask for x shaped {x.shape}.')
  _check_leading('x', x.shape, mask.shape)
  return x + _expand(mask, x.ndim).astype(x.dtype) * residual


def dilate_mask(mask_BxHxW: jax.Array) -> jax.Array:
  """3x3 max-pool (stride 1, SAME) of a mask.

  A conv whose output feeds a 3x3 conv must be computed on every position
  that an active position's 3x3 window reads: the dilated active set.
  """
  if mask_BxHxW.ndim != 3:
    raise ValueError('dilate_mask takes a [B, H, W] mask, got shape '
                     f'{mask_BxHxW.shape}.')
  return lax.reduce_window(
      mask_BxHxW, jnp.array(0, mask_BxHxW.dtype), lax.max,
      (1, 3, 3), (1, 1, 1), 'SAME')
