"""oneDNN's convolutions through `jax.ffi`, a yardstick for XLA:CPU's.

The original TF code runs its convolutions with oneDNN; on AVX-512 CPUs
sact_jax's training steps and large-batch inference, which run XLA's, are
slower (BUILD.md, "On an AVX-512 EPYC"). This module measures what oneDNN's
kernels would give in a JAX program: `load` compiles onednn_conv.cc (g++)
against oneDNN's headers and library and jaxlib's FFI headers, once per
process, and registers its three handlers as XLA:CPU custom calls;
`conv2d` is then a differentiable NHWC x HWIO convolution made of them.
`benchmarks/conv_formulations.py --formulations=conv,onednn` times it
beside sact_jax's own. The library does not use it.

oneDNN comes from PyPI, built with GNU OpenMP (no other runtime needed),
and g++ from the system:

  pip install -e '.[onednn]'
"""

import ctypes
import functools
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

_TARGETS = ('OnednnConvForward', 'OnednnConvInputGrad',
            'OnednnConvKernelGrad')


@functools.cache
def load(prefix: str = sys.prefix) -> None:
  """Builds and registers the custom calls; oneDNN under `prefix`.

  Raises:
    RuntimeError: oneDNN's headers or library are not under `prefix`, or
      the build failed (its last line of output says why).
  """
  include = os.path.join(prefix, 'include')
  lib = os.path.join(prefix, 'lib')
  if not (os.path.exists(os.path.join(include, 'oneapi', 'dnnl', 'dnnl.hpp'))
          and os.path.exists(os.path.join(lib, 'libdnnl.so'))):
    raise RuntimeError(
        f"no oneDNN under {prefix} (pip install -e '.[onednn]')")
  source = os.path.join(os.path.dirname(__file__), 'onednn_conv.cc')
  out = os.path.join(tempfile.mkdtemp(prefix='sact_onednn_'),
                     'libonednn_conv.so')
  build = subprocess.run(
      ['g++', '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
       f'-I{include}', f'-I{jax.ffi.include_dir()}', source, f'-L{lib}',
       '-ldnnl', f'-Wl,-rpath,{lib}', '-o', out],
      capture_output=True, text=True, check=False)
  if build.returncode != 0:
    lines = (build.stderr or build.stdout).strip().splitlines()
    raise RuntimeError(f'building {source} failed: '
                       f'{lines[-1] if lines else build.returncode}')
  handlers = ctypes.cdll.LoadLibrary(out)
  for target in _TARGETS:
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(handlers, target)), platform='cpu')


def _call(target, result_shape, a, b, stride, pad):
  return jax.ffi.ffi_call(
      target, jax.ShapeDtypeStruct(result_shape, a.dtype))(
          a, b, stride=np.int64(stride), pad=np.int64(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x_BxHxWxI, w_KxLxIxO, stride: int, padding):
  """Like `conv.conv2d` with square strides: `padding` `((lo, hi),) * 2`."""
  if padding[0] != padding[1]:
    raise ValueError(f'padding must be the same along H and W: {padding}')
  (lo, hi), _ = padding
  batch, height, width, _ = x_BxHxWxI.shape
  kh, kw, _, cout = w_KxLxIxO.shape
  out_hw = ((height + lo + hi - kh) // stride + 1,
            (width + lo + hi - kw) // stride + 1)
  return _call('OnednnConvForward', (batch, *out_hw, cout), x_BxHxWxI,
               w_KxLxIxO, stride, lo)


def _fwd(x, w, stride, padding):
  return conv2d(x, w, stride, padding), (x, w)


def _bwd(stride, padding, residuals, g_BxPxQxO):
  x, w = residuals
  lo = padding[0][0]
  dx = _call('OnednnConvInputGrad', x.shape, g_BxPxQxO, w, stride, lo)
  dw = _call('OnednnConvKernelGrad', w.shape, x, g_BxPxQxO, stride, lo)
  return dx, dw


conv2d.defvjp(_fwd, _bwd)
