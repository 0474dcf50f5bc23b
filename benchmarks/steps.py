"""The trainer's own training step on synthetic data, for benchmarks.

Shared by `benchmarks.train_step` (CPU variants, timed in turn)
and `benchmarks.gpu_overhead` (steps compiled at once, timed interleaved).
"""

import contextlib
import time

from flax import nnx
import numpy as np

from sact_jax import layers
from sact_jax import onednn
from sact_jax import parallel
from sact_jax import train as train_lib
from sact_jax.configs import cifar10
from sact_jax.configs import imagenet
from sact_jax.configs import validation

# Config overrides of each variant (`benchmarks.train_step --variants`).
VARIANT_CONFIG = {
    'scan': {},
    'unrolled': {'unroll': True},
    'scan_remat': {'remat': True},
    'scan_noremat': {'remat': False},
    'scan_convs': {'remat': 'convs'},
    'scan_ynn': {},
    'xlaconv': {},
    'nnx_bn': {},
}


@contextlib.contextmanager
def _nnx_batch_norms():
  """Models built inside get flax's own `nnx.BatchNorm`, whose training
  call autodiff differentiates, instead of `layers.BatchNorm` (variant
  'nnx_bn', to time what the latter saves)."""
  def batch_norm(factory, channels, *, rngs):
    return nnx.BatchNorm(channels, momentum=factory.bn_momentum,
                         epsilon=factory.bn_epsilon, rngs=rngs)
  ours = layers.LayerFactory.batch_norm
  layers.LayerFactory.batch_norm = batch_norm
  try:
    yield
  finally:
    layers.LayerFactory.batch_norm = ours


def lower_step(depth: int, model_type: str, batch: int, tau: float = 0.01,
               variant: str = 'scan', family: str = 'cifar',
               image_size: int = 0):
  """The trainer's own step on synthetic data, traced and not compiled.

  The config of `family`, `depth` and `model_type` (loss = cross-entropy +
  tau ponder + L2, momentum SGD, BN statistics, metrics); CIFAR with `tau`,
  ImageNet with its config's. Returns `(lowered, state, batch, lower_s)`,
  so that a caller can compile several steps at once
  (`benchmarks/gpu_overhead.py`).
  """
  if family == 'cifar':
    config = cifar10.get_config(f'{model_type}_{depth}')
    config.tau = tau
  else:
    config = imagenet.get_config(f'{model_type}_{depth}')
  if image_size:
    config.image_size = image_size
  config.batch_size = batch
  for key, value in VARIANT_CONFIG[variant].items():
    config[key] = value
  validation.validate_config(config)
  mesh = parallel.make_mesh()
  with (_nnx_batch_norms() if variant == 'nnx_bn'
        else contextlib.nullcontext()):
    trainer = train_lib.Trainer.create(
        config, mesh, compiler_options={} if variant == 'scan_ynn' else None)
    state = trainer.init_state()
  rng = np.random.default_rng(0)
  size = config.image_size
  batch_arrays = parallel.shard_batch({
      'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      'label': rng.integers(0, config.num_classes,
                            size=(batch,)).astype(np.int32)}, mesh)
  t0 = time.perf_counter()
  with (onednn.disabled() if variant == 'xlaconv'
        else contextlib.nullcontext()):
    lowered = trainer.train_step.lower(state, batch_arrays)
  return lowered, state, batch_arrays, time.perf_counter() - t0


def stepper(compiled, state, batch_arrays):
  """`step()` runs one update in place and returns its metrics (block on
  them to time it)."""
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch_arrays)
    return metrics
  return step


def make_step(depth: int, model_type: str, batch: int, tau: float = 0.01,
              variant: str = 'scan', family: str = 'cifar',
              image_size: int = 0):
  """`lower_step`, compiled: returns `(step, compile_s)` (`stepper`;
  `compile_s` is tracing plus compiling)."""
  lowered, state, batch_arrays, lower_s = lower_step(
      depth, model_type, batch, tau, variant, family, image_size)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = lower_s + time.perf_counter() - t0
  return stepper(compiled, state, batch_arrays), compile_s
