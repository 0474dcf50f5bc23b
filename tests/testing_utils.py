"""Shared helpers of the model tests: cheap init, weight surgery, forwards.

Random init of a real model compiles one random op per parameter shape
(tens of seconds on a busy 2-core machine), so tests build models
abstractly (`nnx.eval_shape`) and fill the variables from numpy instead.
BatchNorm statistics are random too, so eval-mode tests are not blind to a
mix-up of mean and variance.
"""

import functools
import json
import os
from typing import Any, Callable
from unittest import mock

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import act
from sact_jax import flops as flops_lib
from sact_jax import halting
from sact_jax import layers
from sact_jax.models import create_model

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


def _fill_value(path: tuple, shape: tuple[int, ...],
                rng: np.random.Generator) -> np.ndarray:
  """A plausible value for the variable at `path` (stacked or not)."""
  name = path[-1]
  stacked = 'steps' in path
  if name == 'kernel':
    per_unit = shape[1:] if stacked else shape
    fan_in = int(np.prod(per_unit[:-1]))
    return rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
  if name == 'scale':
    return rng.uniform(0.8, 1.2, size=shape)
  if name == 'var':
    return rng.uniform(0.5, 1.5, size=shape)
  if name in ('bias', 'mean'):
    return rng.normal(size=shape) * 0.1
  raise ValueError(f'No fill rule for variable {path}.')


def init_randomly(model: nnx.Module, seed: int) -> nnx.Module:
  """Gives every Param and BatchStat of `model` (maybe abstract) a value."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  for path, variable in nnx.to_flat_state(state):
    value = _fill_value(tuple(path), tuple(variable.shape), rng)
    variable.set_value(jnp.asarray(value, jnp.float32))
  return nnx.merge(graphdef, state)


def build(family: str, units, model_type: str, *, seed: int = 0,
          num_classes: int = 10, base_channels: int | None = None,
          **kwargs) -> nnx.Module:
  """`create_model` with numpy-filled weights (fast, deterministic)."""
  abstract = nnx.eval_shape(lambda: create_model(
      family, units, model_type, num_classes=num_classes,
      base_channels=base_channels, rngs=nnx.Rngs(0), **kwargs))
  return init_randomly(abstract, seed)


def heads(model: nnx.Module) -> list[nnx.Module]:
  """The stacked halting heads of every block that has some."""
  return [b.steps.head for b in model.blocks
          if b.steps is not None and b.steps.head is not None]


def halting_bias(head: nnx.Module) -> nnx.Param:
  """The bias that sets the halting prior: local conv (SACT) or dense (ACT)."""
  return (head.local_conv.bias if hasattr(head, 'local_conv')
          else head.global_conv.bias)


def set_halting_bias(model: nnx.Module, value: float):
  for head in heads(model):
    bias = halting_bias(head)
    bias[...] = jnp.full(bias.shape, value, jnp.float32)


def copy_shared(src: nnx.Module, dst: nnx.Module) -> int:
  """Copies every variable of `src` whose path exists in `dst`.

  Returns:
    How many variables were copied.
  """
  src_flat = dict(nnx.to_flat_state(nnx.state(src)))
  dst_state = nnx.state(dst)
  copied = 0
  for path, variable in nnx.to_flat_state(dst_state):
    if path in src_flat:
      assert src_flat[path].shape == variable.shape, path
      variable.set_value(src_flat[path][...])
      copied += 1
  nnx.update(dst, dst_state)
  return copied


# LLVM at -O0 halves XLA:CPU compile times, which dominate these tests.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`nnx.jit` for `fn(module, *arrays)`, compiled with `FAST_COMPILE`.

  State updates of the module (BatchNorm statistics) are written back, as
  `nnx.jit` does. One compile per module structure and argument shapes.
  """
  compiled = {}

  def wrapper(module: nnx.Module, *args):
    graphdef, state = nnx.split(module)
    if graphdef not in compiled:
      def pure(state, *args):
        module = nnx.merge(graphdef, state)
        out = fn(module, *args)
        return out, nnx.state(module)
      compiled[graphdef] = jax.jit(pure, compiler_options=FAST_COMPILE)
    out, new_state = compiled[graphdef](state, *args)
    nnx.update(module, new_state)
    return out

  return wrapper


@jit
def forward(model: nnx.Module, images: jax.Array) -> tuple[jax.Array, dict]:
  """One jitted forward shared by all tests (same structure: one compile)."""
  return model(images)


# How far from the threshold every tested halting decision must lie when a
# test compares num_units exactly across two programs (see halting_margin).
HALTING_MARGIN = 1e-5


def halting_margin(fn: Callable[..., Any], module: nnx.Module, *args
                   ) -> tuple[float, int]:
  """How close `fn(module, *args)` comes to flipping a halting decision.

  A position halts at the unit where its cumulative score s reaches
  1 - eps. Two programs that compute the same scores with other rounding
  (sparse vs dense, scan vs loop, another CPU's vector width) agree on
  every `num_units` only where |s - (1 - eps)| is above the difference of
  their s. On the tests' small random models that difference measured at
  most 2e-6 (sparse vs dense, and each program with AVX2 against AVX-512
  kernels), so tests that compare unit counts exactly check that their
  inputs keep HALTING_MARGIN, 5x that (`assert_halting_margin`): a seed,
  bias or input that lands near the threshold fails loudly here instead
  of flipping a count on some other machine. (Outputs stored from the
  original TF code are compared with looser bounds where they must be.)

  Every halting step goes through `act._weight`; a fresh trace of `fn` on
  a clone of `module` (so BatchNorm statistics stay put) records s there.

  Returns:
    The smallest |s - (1 - eps)| over the running positions of every
    halting step, and how many steps were recorded.
  """
  distances = []

  def record(d):
    distances.append(float(np.min(d)))

  original = act._weight  # pylint: disable=protected-access

  def weight(running, cumulative, halting, eps):
    threshold = act._threshold(eps, halting.dtype)  # pylint: disable=protected-access
    s = cumulative + halting * running
    jax.debug.callback(record, jnp.where(running > 0, jnp.abs(s - threshold),
                                         jnp.inf))
    return original(running, cumulative, halting, eps)

  graphdef, state = nnx.split(nnx.clone(module))

  def pure(state, *args):  # A new function: nothing cached is reused.
    return fn(nnx.merge(graphdef, state), *args)

  with mock.patch.object(act, '_weight', weight):
    jax.block_until_ready(
        jax.jit(pure, compiler_options=FAST_COMPILE)(state, *args))
    jax.effects_barrier()
  return (min(distances) if distances else float('inf')), len(distances)


def assert_halting_margin(fn: Callable[..., Any], module: nnx.Module, *args,
                          margin: float = HALTING_MARGIN):
  """Fails unless `fn(module, *args)` halts `margin` away from the threshold.

  See `halting_margin`; also fails if no halting step was recorded.
  """
  distance, steps = halting_margin(fn, module, *args)
  if not steps or distance < margin:
    raise AssertionError(
        f'Halting decisions {distance:.2e} from the threshold ({steps} '
        f'steps recorded), closer than {margin:g}: other rounding may flip '
        'them; move the inputs, seed or halting bias.')


def randomize_batch_norm(bn: nnx.BatchNorm, rng: np.random.Generator):
  """Random, non-trivial scale, bias and running statistics for `bn`."""
  channels = bn.num_features
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
  bn.mean[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)


def sact_head(channels: int, activation, fast_conv: bool, seed: int = 0
              ) -> halting.SactHead:
  """A head whose BatchNorms hold random, non-trivial statistics."""
  factory = layers.LayerFactory(bn_momentum=0.9, bn_epsilon=1e-3,
                                fast_conv_backward=fast_conv)
  head = halting.SactHead(channels, factory=factory, activation=activation,
                          rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for bn in (head.local_bn, head.global_bn):
    randomize_batch_norm(bn, rng)
  return head


def images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  """Random images with a per-image gain and offset, so images differ."""
  rng = np.random.default_rng(seed)
  gain = rng.uniform(0.3, 3.0, size=(shape[0], 1, 1, 1))
  offset = rng.normal(size=(shape[0], 1, 1, shape[-1]))
  return jnp.asarray(gain * rng.normal(size=shape) + offset, jnp.float32)


def np_dilate(mask_BxHxW: np.ndarray) -> np.ndarray:
  """3x3 max over each position's neighbourhood, zeros beyond the border."""
  mask = np.asarray(mask_BxHxW)
  height, width = mask.shape[1:]
  padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
  out = np.zeros_like(mask)
  for dy in range(3):
    for dx in range(3):
      out = np.maximum(out, padded[:, dy:dy + height, dx:dx + width])
  return out


def abstract_block_flops(model_fn: Callable[[], nnx.Module],
                         image_shape: tuple[int, int, int]
                         ) -> tuple[int, list[int]]:
  """Dense FLOPs outside the blocks and per block, traced abstractly.

  Mirrors `flops.vanilla_flops` but reads the counter between blocks, to
  compare with the reference's per-block table.
  """
  abstract = nnx.eval_shape(model_fn)
  abstract.eval()
  graphdef, state = nnx.split(abstract)
  counter = flops_lib.FlopCounter()
  per_block = []

  def run(state, images):
    model = nnx.merge(graphdef, state)
    x = model.stem(images, counter)
    for block in model.blocks:
      before = counter.static
      x, _ = block(x, counter)
      per_block.append(counter.static - before)
    return model.head(x, counter)

  jax.eval_shape(run, state,
                 jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return counter.static - sum(per_block), per_block


@functools.cache
def load_npz(relative_path: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(TESTDATA, relative_path)) as data:
    return {k: data[k] for k in data.files}


@functools.cache
def manifest() -> dict[str, Any]:
  with open(os.path.join(TESTDATA, 'parity_manifest.json')) as f:
    return json.load(f)
