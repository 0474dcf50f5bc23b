"""What the sparse blocks and the runner share: compiled phases, weights.

A runner calls jitted *phases* (stem, a block's first unit, one SACT stage,
...) whose module weights are plain arrays passed as arguments, so that all
units of a block share one compilation. `Phases` compiles them and keeps the
bookkeeping tests and benchmarks read; `Clock` calls them, optionally timing
each.
"""

import collections
import functools
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import conv
from sact_jax.sparse import options as options_lib


# The sparse programs update maps in place inside the branches of
# `lax.cond` and `lax.switch` (a unit run densely or at rows, a stage's tail
# size). XLA:CPU's default copy insertion then copies every map such a
# branch updates, at every unit: in a trace of ImageNet ResNet-101 at batch
# 1 (one program per block), 575 copies took 4.4 ms of the call. Its
# region-based analysis of the branches proves those copies needless (0.3
# ms of copies left, none of a map); the call took 0.83-0.86 of the dense
# vanilla model's time instead of 0.87-0.88 (separate processes,
# alternating; batch 32 0.68-0.69 instead of 0.70). Compiling took 7%
# longer at batch 1, as long at batch 32. (jaxlib 0.12's default copy
# insertion no longer copies the small case of `sparse_test`; the option
# stays, harmless there.)
_SPARSE_CPU_OPTIONS = (('xla_cpu_copy_insertion_use_region_analysis', True),)


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """XLA options of the sparse phases on `backend` (default one): the dense
  model's (`conv.compiler_options`) and, on the CPU, the copy insertion
  above (where this jaxlib knows it)."""
  options = conv.compiler_options(backend)
  if options is not None and conv.options_supported(_SPARSE_CPU_OPTIONS):
    options.update(_SPARSE_CPU_OPTIONS)
  return options


class Phases:
  """Compiles one runner's phases and keeps its records.

  Attributes:
    options: the runner's options.
    device_flops: blocks whose dense unit costs fewer FLOPs run in one
      device loop under 'auto' (`SparseOptions.device_flops`, resolved).
    trace_counts: how many times each phase was traced, by name.
  """

  def __init__(self, options: options_lib.SparseOptions):
    self.options = options
    self.device_flops = options_lib.device_flops(options)
    self.trace_counts = collections.Counter()
    self._records = []
    jit_options = (compiler_options() if options.compiler_options is None
                   else dict(options.compiler_options))
    self._jit = functools.partial(jax.jit,
                                  compiler_options=jit_options or None)

  def jit(self, fn: Callable, **kwargs) -> Callable:
    """`jax.jit` with the runner's compiler options."""
    return self._jit(fn, **kwargs)

  def trace(self, name: str):
    """Called by a phase while it is traced."""
    self.trace_counts[name] += 1

  def new_call(self):
    """Starts the records of a new call."""
    self._records = []

  def record(self, entry: dict[str, Any]):
    self._records.append(entry)

  def record_later(self, entries: Callable[[], list[dict[str, Any]]]):
    """Records what `entries()` returns when the records are read: entries
    made from device arrays, which reading would wait for."""
    self._records.append(entries)

  @property
  def unit_records(self) -> list[dict[str, Any]]:
    """Per-unit records of the current call (later entries made once)."""
    self._records = [entry for item in self._records
                     for entry in (item() if callable(item) else [item])]
    return list(self._records)


class Clock:
  """Calls jitted phases; optionally waits for each and sums the times."""

  def __init__(self, timings: dict[str, float] | None):
    self.timings = timings

  def __call__(self, name: str, fn: Callable, *args, **kwargs):
    if self.timings is None:
      return fn(*args, **kwargs)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    self.host(name, start)
    return out

  def host(self, name: str, start: float, wait_for=None):
    """Adds the time since `start` under `name`, once `wait_for` (arrays)
    is ready."""
    if self.timings is not None:
      jax.block_until_ready(wait_for)
      self.timings[name] = (self.timings.get(name, 0.0)
                            + time.perf_counter() - start)


def read_counts(values: jax.Array, clock: Clock) -> tuple[int, ...]:
  """Reads small device integers (or one) on the host (waits for them).

  A scalar is read as is: indexing it on the device first (`x[None]`) would
  be one more dispatched op, paid after every wait.
  """
  start = time.perf_counter()
  out = tuple(int(v) for v in np.asarray(values).reshape(-1))
  clock.host('sync', start)
  return out


def graphdef(module: nnx.Module):
  return nnx.split(module)[0]


def variable_arrays(module: nnx.Module) -> dict:
  """The module's variables as a nested dict of arrays (cheap to pass).

  On the default device, where sparse inference runs: a model restored
  for data-parallel work holds its weights replicated over every device
  (no copy where they are on that device already).
  """
  return jax.device_put(nnx.to_pure_dict(nnx.split(module)[1]),
                        jax.local_devices()[0])


@jax.jit
def unstack(tree):
  """Per-unit slices of stacked variables (one device call)."""
  count = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(count)]


def dummy_output(batch_shape) -> jax.Array:
  """A `[..., 1]` stand-in for unit outputs in `act.step`.

  The SACT block accumulates the halting-weighted output itself, so the
  halting state's accumulator only needs a valid shape.
  """
  return jnp.zeros((*batch_shape, 1), jnp.float32)


def run_first_unit(first_gd, first_vars, x_in: jax.Array, flops_B: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """A block's first unit, densely; its output and the FLOPs with it."""
  first = nnx.merge(first_gd, first_vars)
  x = first(x_in)
  return x, flops_B + first_unit_flops(first, x_in, x)


def first_unit_flops(first: nnx.Module, x_in: jax.Array, x: jax.Array
                     ) -> int:
  """FLOPs per image of a block's first unit, densely from `x_in` to
  `x`."""
  return first.dense_flops(x_in.shape[1] * x_in.shape[2],
                           x.shape[1] * x.shape[2])
