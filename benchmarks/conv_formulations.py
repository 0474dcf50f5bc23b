r"""Convolution formulations on XLA:CPU: native conv vs dot over windows.

Run by hand (not a test), on a quiet machine:

  python -m benchmarks.conv_formulations
  python -m benchmarks.conv_formulations --batches=1,32 --shapes=imagenet

For every convolution shape the CIFAR and ImageNet ResNets use, times
`conv.conv2d` with both passes 'conv' (XLA's convolution; stride 1 with the
canonical-layout backward) and both 'dot' (one dot over the input windows),
forward and forward + backward (input and kernel gradients), interleaved,
in one process. Prints GFLOP/s and the
dot/conv time ratio per shape and writes JSON: the measurements behind
`conv.formulation`.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import conv

# (name, H (= W) of the input, cin, cout, kernel, stride).
CIFAR_SHAPES = (
    ('cifar_stem', 32, 3, 16, 3, 1),
    ('cifar_b1', 32, 16, 16, 3, 1),
    ('cifar_b2_in', 32, 16, 32, 3, 2),
    ('cifar_b2', 16, 32, 32, 3, 1),
    ('cifar_b3_in', 16, 32, 64, 3, 2),
    ('cifar_b3', 8, 64, 64, 3, 1),
    ('cifar_halt', 32, 16, 1, 3, 1),
)
IMAGENET_SHAPES = (
    ('in_stem', 224, 3, 64, 7, 2),
    ('in_b1_1x1a', 56, 256, 64, 1, 1),
    ('in_b1_3x3', 56, 64, 64, 3, 1),
    ('in_b1_1x1b', 56, 64, 256, 1, 1),
    ('in_b2_3x3s2', 56, 128, 128, 3, 2),
    ('in_b2_short', 56, 256, 512, 1, 2),
    ('in_b2_3x3', 28, 128, 128, 3, 1),
    ('in_b2_1x1a', 28, 512, 128, 1, 1),
    ('in_b3_3x3', 14, 256, 256, 3, 1),
    ('in_b3_1x1a', 14, 1024, 256, 1, 1),
    ('in_b3_1x1b', 14, 256, 1024, 1, 1),
    ('in_b4_3x3', 7, 512, 512, 3, 1),
    ('in_b4_1x1a', 7, 2048, 512, 1, 1),
)
_SHAPES = flags.DEFINE_list('shapes', ['cifar', 'imagenet'],
                            'Shape sets: cifar, imagenet.')
_BATCHES = flags.DEFINE_list('batches', ['1', '32', '128'], 'Batch sizes.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed calls (median).')
_MIN_SECONDS = flags.DEFINE_float(
    'min_seconds', 0.02, 'Calls per timing are repeated to last this long.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/conv_formulations.json',
                           'JSON output path.')


def _fns(kernel, stride, padding):
  """Forward and forward + backward of each formulation of `conv.conv2d`."""
  strides = (stride, stride)

  def formulated(name):
    return lambda x, w: conv.conv2d(x, w, strides, padding, None, name, name)

  def grads(fn):
    def loss(x, w):
      return jnp.sum(fn(x, w))  # Cotangent of ones: cost as any other.
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  native, dot = formulated('conv'), formulated('dot')
  return {'conv_fwd': jax.jit(native), 'dot_fwd': jax.jit(dot),
          'conv_bwd': grads(native), 'dot_bwd': grads(dot)}


def _time(fn, args, repeats, min_seconds):
  jax.block_until_ready(fn(*args))  # Compile.
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  calls = max(1, int(min_seconds / max(once, 1e-6)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return times


def main(argv):
  del argv
  shapes = []
  if 'cifar' in _SHAPES.value:
    shapes += CIFAR_SHAPES
  if 'imagenet' in _SHAPES.value:
    shapes += IMAGENET_SHAPES
  rng = np.random.default_rng(0)
  rows = []
  print(f'{"shape":<14} {"batch":>5} {"fwd GF/s conv":>13} {"dot":>6} '
        f'{"ratio":>6} | {"fwd+bwd GF/s conv":>17} {"dot":>6} {"ratio":>6}')
  for batch in (int(b) for b in _BATCHES.value):
    for name, size, cin, cout, kernel, stride in shapes:
      if name.startswith('in_') and batch > 32:
        continue
      padding = conv.explicit_padding('SAME', (kernel, kernel),
                                      (stride, stride), (size, size))
      x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
      w = jnp.asarray(0.1 * rng.normal(size=(kernel, kernel, cin, cout)),
                      jnp.float32)
      out = -(-size // stride)
      flops = 2 * batch * out * out * kernel * kernel * cin * cout
      fns = _fns(kernel, stride, padding)
      # Interleaved: each repetition times every variant once.
      times = {k: [] for k in fns}
      for _ in range(_REPEATS.value):
        for key, fn in fns.items():
          times[key] += _time(fn, (x, w), 1, _MIN_SECONDS.value)
      med = {k: float(np.median(v)) for k, v in times.items()}
      row = dict(name=name, batch=batch, size=size, cin=cin, cout=cout,
                 kernel=kernel, stride=stride, flops=flops,
                 seconds=med,
                 fwd_ratio=med['dot_fwd'] / med['conv_fwd'],
                 bwd_ratio=med['dot_bwd'] / med['conv_bwd'])
      rows.append(row)
      print(f'{name:<14} {batch:>5} {flops / med["conv_fwd"] / 1e9:>13.0f} '
            f'{flops / med["dot_fwd"] / 1e9:>6.0f} {row["fwd_ratio"]:>6.2f} | '
            f'{3 * flops / med["conv_bwd"] / 1e9:>17.0f} '
            f'{3 * flops / med["dot_bwd"] / 1e9:>6.0f} '
            f'{row["bwd_ratio"]:>6.2f}', flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump({'backend': jax.default_backend(),
               'devices': [str(d) for d in jax.devices()],
               'jax': jax.__version__, 'rows': rows}, f, indent=2)
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
