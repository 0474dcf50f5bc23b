r"""Convolution formulations on XLA:CPU: native conv vs dot vs taps vs s2d.

Run by hand (not a test), on a quiet machine:

  python -m benchmarks.conv_formulations
  python -m benchmarks.conv_formulations --batches=1,32 --shapes=imagenet
  python -m benchmarks.conv_formulations --shapes=cifar --batches=128 \
      --formulations=conv --options=default,training
  python -m benchmarks.conv_formulations --formulations=conv,onednn \
      --options=training
  python -m benchmarks.conv_formulations --shapes=imagenet --batches=1 \
      --formulations=onednn,rows --options=training --chain=12

For every convolution shape the CIFAR and ImageNet ResNets use, times
`conv.conv2d` with both passes in each formulation ('conv': XLA's
convolution, stride 1 with the canonical-layout backward; 'dot': one dot
over the input windows; 'taps': where `kh * kw * O <= I`, a dot to every
tap's outputs and a shifted sum; 's2d', by request, for strided shapes:
a stride-1 conv over space-to-depth blocks; 'onednn', by request:
oneDNN's kernels through `jax.ffi` (sact_jax/onednn.py), with the largest
relative difference from 'conv' printed; 'rows', by request: oneDNN's 1x1
forward over the windows as one image row, its forward only: under
differentiation it runs 'onednn'), compiled with
XLA's default options and/or `conv.compiler_options` ('training'),
forward and forward + backward (input and kernel gradients), interleaved,
in one process. Prints GFLOP/s per variant and shape, and the
formulations `conv` chooses for it on this machine
(`conv.chosen_formulation`, forward/backward), and writes JSON: the
measurements behind `conv.formulation` and the trainers' compiler
options.
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import benchmarks
from sact_jax import conv
from sact_jax import onednn

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
_SHAPE_SETS = {'cifar': CIFAR_SHAPES, 'imagenet': IMAGENET_SHAPES}
_SHAPES = flags.DEFINE_list('shapes', ['cifar', 'imagenet'],
                            'Shape sets: cifar, imagenet.')
_BATCHES = flags.DEFINE_list('batches', ['1', '32', '128'], 'Batch sizes.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed calls (median).')
_MIN_SECONDS = flags.DEFINE_float(
    'min_seconds', 0.02, 'Calls per timing are repeated to last this long.')
_FORMULATIONS = flags.DEFINE_list('formulations', ['conv', 'dot', 'taps'],
                                  'Formulations of conv.conv2d: conv, dot, '
                                  'taps, s2d; and onednn, oneDNN\'s kernels '
                                  '(sact_jax/onednn.py), and rows, its 1x1 '
                                  'forward over image rows.')
_OPTION_NAMES = ('default', 'training')
_OPTIONS = flags.DEFINE_list(
    'options', ['default'], "Compiler options: 'default' (XLA's) and/or "
    "'training' (conv.compiler_options).")
_CHAIN = flags.DEFINE_integer(
    'chain', 1, 'Time this many convolutions of a shape in one program, '
    'each with its own kernel and reading the one before (the time per '
    'convolution is printed): the kernels then come from memory, and '
    "oneDNN's calls from XLA's threads, as inside a model.")
_OUT = flags.DEFINE_string('out',
                           benchmarks.default_out('conv_formulations.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)


def _chained(fn):
  """`fn` over a list of kernels (separate buffers: a slice of a stack
  would be copied before oneDNN's call), each call reading the one before
  (its first element, times zero, added to the input: a dependency
  only)."""
  def run(x, ws):
    y, carry = None, 0.0
    for w in ws:
      y = fn(x + carry, w)
      carry = 0.0 * y[0, 0, 0, 0]
    return y
  return run


def _fns(kernel, stride, padding, variants):
  """Forward and forward + backward of each (formulation, options)."""
  strides = (stride, stride)
  fns = {}
  for name, options in variants:
    fn = functools.partial(conv.conv2d, strides=strides, padding=padding,
                           precision=None, forward=name, backward=name)
    if _CHAIN.value > 1:
      fn = _chained(fn)
    compiler_options = (conv.compiler_options()
                        if options == 'training' else None)

    def loss(x, w, fn=fn):
      return jnp.sum(fn(x, w))  # Cotangent of ones: cost as any other.

    fns[f'{name}/{options}_fwd'] = jax.jit(
        fn, compiler_options=compiler_options)
    fns[f'{name}/{options}_bwd'] = jax.jit(
        jax.grad(loss, argnums=(0, 1)), compiler_options=compiler_options)
  return fns


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


def _onednn_difference(fns, args) -> float | None:
  """Largest relative difference of the onednn variants' outputs (forward
  and gradients) from the conv formulation's under the same options."""
  worst = None
  for key, fn in fns.items():
    reference = key.replace('onednn/', 'conv/', 1)
    if not key.startswith('onednn/') or reference not in fns:
      continue
    for a, b in zip(jax.tree.leaves(fn(*args)),
                    jax.tree.leaves(fns[reference](*args))):
      d = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      worst = d if worst is None else max(worst, d)
  return worst


def _check_flags() -> str:
  """One-line UsageError for a bad flag, before any timing: a typo would
  otherwise time nothing (or another variant) and write over the results.
  Returns the output path.
  """
  benchmarks.check_choices(_SHAPES, _SHAPE_SETS)
  benchmarks.check_choices(_FORMULATIONS, conv.FORMULATIONS)
  benchmarks.check_choices(_OPTIONS, _OPTION_NAMES)
  benchmarks.check_positive_ints(_BATCHES)
  benchmarks.check_at_least(1, _REPEATS, _CHAIN)
  benchmarks.check_at_least(0, _MIN_SECONDS)
  needs_onednn = [f for f in ('onednn', 'rows') if f in _FORMULATIONS.value]
  if needs_onednn and not onednn.available():
    raise app.UsageError(f'--formulations={needs_onednn[0]}: oneDNN is '
                         'unavailable (the warning above says why)')
  return benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)


def main(argv):
  del argv
  out_path = _check_flags()
  shapes = []
  for shape_set, shape_table in _SHAPE_SETS.items():
    if shape_set in _SHAPES.value:
      shapes += shape_table
  rng = np.random.default_rng(0)
  rows = []
  variants = [(f, o) for f in _FORMULATIONS.value for o in _OPTIONS.value]
  labels = [f'{f}/{o}' for f, o in variants]
  print(f'{"GFLOP/s fwd | fwd+bwd":<26} ' + ' '.join(
      f'{label:>22}' for label in labels))
  for batch in (int(b) for b in _BATCHES.value):
    for name, size, cin, cout, kernel, stride in shapes:
      if name.startswith('in_') and batch > 32:
        continue
      padding = conv.explicit_padding('SAME', (kernel, kernel),
                                      (stride, stride), (size, size))
      x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
      ws = [jnp.asarray(0.1 * rng.normal(size=(kernel, kernel, cin, cout)),
                        jnp.float32) for _ in range(max(_CHAIN.value, 1))]
      w = ws if _CHAIN.value > 1 else ws[0]
      out = -(-size // stride)
      # Of the whole chain, so that GFLOP/s are per convolution's time.
      flops = (2 * batch * out * out * kernel * kernel * cin * cout
               * len(ws))
      # Taps only where they make fewer channels than they read; s2d only
      # for strided convolutions (at stride 1 it is 'conv').
      usable = [(f, o) for f, o in variants
                if (f != 'taps' or kernel * kernel * cout <= cin)
                and (f != 's2d' or stride > 1)]
      fns = _fns(kernel, stride, padding, usable)
      # Interleaved: each repetition times every variant once.
      times = {k: [] for k in fns}
      for _ in range(_REPEATS.value):
        for key, fn in fns.items():
          times[key] += _time(fn, (x, w), 1, _MIN_SECONDS.value)
      med = {k: float(np.median(v)) for k, v in times.items()}
      difference = _onednn_difference(fns, (x, w))
      chosen = conv.chosen_formulation(x.shape, ws[0].shape,
                                       (stride, stride), padding, x.dtype)
      rows.append(dict(name=name, batch=batch, size=size, cin=cin,
                       cout=cout, kernel=kernel, stride=stride, flops=flops,
                       chain=len(ws),
                       seconds=med, onednn_difference=difference,
                       chosen=chosen))
      cells = []
      for label in labels:
        if f'{label}_fwd' not in med:
          cells.append(f'{"-":>22}')
          continue
        cells.append(f'{flops / med[label + "_fwd"] / 1e9:>10.0f} | '
                     f'{3 * flops / med[label + "_bwd"] / 1e9:>9.0f}')
      cells.append(f'  chosen {chosen[0]}/{chosen[1]}')
      if difference is not None:
        cells.append(f'  onednn vs conv {difference:.0e}')
      print(f'{name:<14} {batch:>11} ' + ' '.join(cells), flush=True)
  benchmarks.write_json(out_path, {
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'jax': jax.__version__, 'rows': rows}, indent=2)
  print(f'Wrote {out_path}')


if __name__ == '__main__':
  app.run(main)
