"""Small building blocks shared by the CIFAR and ImageNet ResNets."""

import dataclasses
import functools
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from sact_jax import conv as conv_lib

Activation = Callable[[jax.Array], jax.Array]


@jax.custom_vjp
def leaky_relu(x: jax.Array) -> jax.Array:
  """The reference CIFAR nonlinearity, `max(x, 0.1 x)`, as a select.

  The same values; the gradient is 1 from 0 up, 0.1 below (TensorFlow's
  for the maximum, where JAX's splits a tie: 0.55 at 0). Autodiff of the
  maximum keeps two float masks per activation, that of the select a bool
  map; this backward pass keeps only the output, which the conv it feeds
  keeps anyway, and reads the side from its sign (the same as the
  input's, but for negative inputs so small that a tenth of them rounds
  to -0). On a GPU a CIFAR training step then launches about 5% fewer
  kernels than with the select (BUILD.md, "ACT and SACT over vanilla on a
  GPU").
  """
  return jnp.where(x >= 0, x, 0.1 * x)


def _leaky_relu_fwd(x):
  y = leaky_relu(x)
  return y, y


def _leaky_relu_bwd(y, g):
  return (jnp.where(y >= 0, g, 0.1 * g),)


leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def identity(x: jax.Array) -> jax.Array:
  return x


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Builds convs, dense layers and BatchNorms with a family's settings.

  Attributes:
    bn_momentum: running-average decay of BatchNorm statistics.
    bn_epsilon: BatchNorm epsilon.
    fast_conv_backward: route convs through `conv.py` (per shape, XLA's
      conv with a canonical-layout backward pass, or dots; see that module
      for why). None: only where the default backend is the CPU, whose scan
      backward and slow 1x1 convs it fixes; GPUs and TPUs keep their native
      kernels.
  """
  bn_momentum: float
  bn_epsilon: float
  fast_conv_backward: bool | None = None

  @property
  def routes_convs(self) -> bool:
    """`fast_conv_backward`, resolved for the default backend."""
    if self.fast_conv_backward is None:
      return jax.default_backend() == 'cpu'
    return self.fast_conv_backward

  def conv(self, cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs,
           stride: int = 1, padding='SAME', use_bias: bool = False,
           bias_init: float = 0.0) -> nnx.Conv:
    fn = (conv_lib.conv_general_dilated if self.routes_convs
          else jax.lax.conv_general_dilated)
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=(stride, stride),
        padding=padding, use_bias=use_bias,
        kernel_init=nnx.initializers.variance_scaling(
            2.0, 'fan_in', 'truncated_normal'),
        bias_init=nnx.initializers.constant(bias_init),
        conv_general_dilated=fn, rngs=rngs)

  def dense(self, cin: int, cout: int, *, rngs: nnx.Rngs,
            use_bias: bool = True, bias_init: float = 0.0) -> nnx.Linear:
    return nnx.Linear(
        cin, cout, use_bias=use_bias,
        kernel_init=nnx.initializers.variance_scaling(
            1.0, 'fan_in', 'truncated_normal'),
        bias_init=nnx.initializers.constant(bias_init), rngs=rngs)

  def batch_norm(self, channels: int, *, rngs: nnx.Rngs) -> 'BatchNorm':
    return BatchNorm(channels, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` whose training call is `x * scale + shift`.

  The scale and shift come from `batch_statistics_affine`: the same batch
  statistics and running averages, the same values up to rounding, but a
  backward pass of its own that keeps `x` and one `[3, C]` array and runs
  as two per-channel sums and one pass over the map, where autodiff of
  nnx's normalisation keeps the centred map and makes more passes. CIFAR
  training steps on the CPU ran 1-8% faster with it, and their GPU
  programs count 13-17% fewer kernels (BUILD.md, "BatchNorm in training as
  an affine map"). Evaluation, masks and the BatchNorms that
  `batch_statistics_affine` refuses take nnx's own call.
  """

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    if (use_running_average is None or use_running_average
        or mask is not None or self.dtype is not None
        or not _has_affine_statistics(self)):
      return super().__call__(x, use_running_average, mask=mask)
    scale_C, shift_C = batch_statistics_affine(self, x)
    return x * scale_C + shift_C


def same_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric explicit padding of the reference's `conv2d_same`."""
  total = kernel - 1
  pad = (total // 2, total - total // 2)
  return (pad, pad)


def max_pool(x_BxHxWxC: jax.Array, window: int, stride: int) -> jax.Array:
  """`nnx.max_pool` over a square window with SAME padding.

  On the CPU as two 1-D passes (along W, then along H): the same values
  (SAME pads each axis on its own, and a max is exact), 2.5-3.4x faster
  than XLA:CPU's 2-D `reduce_window` (the ImageNet stem's 3x3 / 2 pool at
  batch 32: 13.6 vs 5.5 ms). The gradient is the 2-D pool's, so that ties
  (zeros after a ReLU) send it where they always did. Other backends keep
  the 2-D pool.
  """
  if jax.default_backend() != 'cpu':
    return _max_pool_2d(x_BxHxWxC, window, stride)
  return _max_pool_separable(x_BxHxWxC, window, stride)


def _max_pool_2d(x, window, stride):
  return nnx.max_pool(x, (window, window), strides=(stride, stride),
                      padding='SAME')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_separable(x, window, stride):
  for axis in (2, 1):
    dims = [1] * x.ndim
    dims[axis] = window
    steps = [1] * x.ndim
    steps[axis] = stride
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, steps, 'SAME')
  return x


def _max_pool_separable_fwd(x, window, stride):
  return _max_pool_separable(x, window, stride), x


def _max_pool_separable_bwd(window, stride, x, g):
  return jax.vjp(lambda x: _max_pool_2d(x, window, stride), x)[1](g)


_max_pool_separable.defvjp(_max_pool_separable_fwd, _max_pool_separable_bwd)


def batch_norm_affine(bn: nnx.BatchNorm) -> tuple[jax.Array, jax.Array]:
  """`bn` with its running statistics as `x * scale + shift`, per channel.

  What it computes in evaluation (`use_running_average`), up to rounding;
  lets a conv that reads the normalised map take the scale into its kernel.
  """
  return _affine(bn.mean[...], jax.lax.rsqrt(bn.var[...] + bn.epsilon),
                 *_scale_and_bias(bn))


def conv_bn_affine(conv: nnx.Conv, bn: nnx.BatchNorm
                   ) -> tuple[jax.Array, jax.Array]:
  """`bn(y + bias)` in evaluation as `y * scale + shift`, `y` what `conv`
  computes without its bias (if it has one)."""
  scale, shift = batch_norm_affine(bn)
  if conv.bias is not None:
    shift = shift + conv.bias[...] * scale
  return scale, shift


def _scale_and_bias(bn: nnx.BatchNorm) -> tuple[jax.Array, jax.Array]:
  """`bn`'s learned scale and bias `[C]`, ones and zeros where it has none."""
  channels = (bn.num_features,)
  return (jnp.ones(channels) if bn.scale is None else bn.scale[...],
          jnp.zeros(channels) if bn.bias is None else bn.bias[...])


def _affine(mean_C: jax.Array, inv_C: jax.Array, gamma_C: jax.Array,
            beta_C: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normalising with `mean_C` and inverse deviation `inv_C`, then `gamma_C`
  and `beta_C`, as `x * scale + shift`."""
  scale_C = inv_C * gamma_C
  return scale_C, beta_C - mean_C * scale_C


def _has_affine_statistics(bn: nnx.BatchNorm) -> bool:
  """Whether `batch_statistics_affine` computes `bn`'s statistics: the
  default BatchNorm (last axis, fast variance, no axis name)."""
  return bn.use_fast_variance and bn.axis == -1 and bn.axis_name is None


def batch_statistics_affine(bn: nnx.BatchNorm, x_XxC: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
  """`bn(x)` in training as `x * scale + shift`, per channel.

  The statistics are `nnx.BatchNorm`'s: the mean over every axis but the
  last and the variance as `E[x^2] - E[x]^2` clipped at 0 (its default
  `use_fast_variance`), and the running averages are updated as its call
  updates them. Lets a conv that reads the normalised map take the scale
  into its kernel in training too, so that the normalised map is never
  written out (`halting.SactHead.folds_batch_statistics`), or a custom
  backward pass recompute it (`conv.affine_window_sum`); `BatchNorm`'s
  training call is this map, for its small backward pass
  (`_statistics_affine`).
  """
  if not _has_affine_statistics(bn):
    raise ValueError('batch_statistics_affine computes the default '
                     'BatchNorm (last axis, fast variance, no axis name).')
  scale_C, shift_C, mean_C, var_C = _statistics_affine(
      x_XxC, *_scale_and_bias(bn), bn.epsilon)
  keep = bn.momentum
  bn.mean[...] = jax.lax.stop_gradient(keep * bn.mean[...]
                                       + (1 - keep) * mean_C)
  bn.var[...] = jax.lax.stop_gradient(keep * bn.var[...] + (1 - keep) * var_C)
  return scale_C, shift_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _statistics_affine(x_XxC, gamma_C, beta_C, epsilon):
  """`x`'s batch statistics and the affine map they make with `gamma` and
  `beta`: `(scale, shift, mean, var)`.

  Its backward pass keeps `x` and one `[3, C]` array (the mean, the
  inverse deviation, whether the variance was clipped). Autodiff kept
  each intermediate per-channel value on its own, and inside a scan over
  units each is a buffer and a kernel of its own per unit (a GPU's SACT
  training step: BUILD.md, "ACT and SACT over vanilla on a GPU").
  """
  return _statistics_affine_fwd(x_XxC, gamma_C, beta_C, epsilon)[0]


def _statistics_affine_fwd(x, gamma, beta, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  raw_var = jnp.mean(jnp.square(x), axes) - jnp.square(mean)
  var = jnp.maximum(0.0, raw_var)
  inv = jax.lax.rsqrt(var + epsilon)
  saved = jnp.stack([mean, inv, (raw_var > 0).astype(x.dtype)])
  return (*_affine(mean, inv, gamma, beta), mean, var), (x, saved, gamma)


def _statistics_affine_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, (mean, inv, positive), gamma = residuals
  dscale, dshift, dmean, dvar = cotangents
  dscale = dscale - dshift * mean  # Through `shift = beta - mean * scale`.
  dvar = (dvar - 0.5 * inv ** 3 * gamma * dscale) * positive
  dmean = dmean - dshift * inv * gamma - 2.0 * mean * dvar
  n = x.size // x.shape[-1]
  dx = (dmean + 2.0 * dvar * x) / n
  return dx, dscale * inv, dshift


_statistics_affine.defvjp(_statistics_affine_fwd, _statistics_affine_bwd)


def _strides(conv: nnx.Conv) -> tuple[int, int]:
  strides = conv.strides
  return (strides, strides) if isinstance(strides, int) else tuple(strides)


def conv_with_kernel(conv: nnx.Conv, x_BxHxWxI: jax.Array,
                     kernel_KxLxIxO: jax.Array) -> jax.Array:
  """What `conv` computes on an NHWC map with another kernel, no bias."""
  return conv.conv_general_dilated(
      x_BxHxWxI, kernel_KxLxIxO, _strides(conv), conv.padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=conv.precision)


def conv_without_bias(conv: nnx.Conv, x_BxHxWxI: jax.Array
                      ) -> tuple[jax.Array, jax.Array | None]:
  """`conv(x)` less its bias (`conv_with_kernel` with its own kernel), and
  the bias (None where it has none), for a caller that adds the bias in a
  pass over the output it makes anyway."""
  y = conv_with_kernel(conv, x_BxHxWxI, conv.kernel[...])
  return y, None if conv.bias is None else conv.bias[...]


def conv_bn_relu(conv: nnx.Conv, bn: nnx.BatchNorm, x_BxHxWxI: jax.Array
                 ) -> jax.Array:
  """`relu(bn(conv(x)))` with `bn` in evaluation, as
  `conv.conv_affine_relu` runs it: one oneDNN call where oneDNN runs the
  convolution. `conv` must route through `conv.conv_general_dilated`."""
  scale, shift = conv_bn_affine(conv, bn)
  return conv_lib.conv_affine_relu(x_BxHxWxI, conv.kernel[...],
                                   _strides(conv), conv.padding, scale,
                                   shift, precision=conv.precision)


def conv_add_into(conv: nnx.Conv, x_BxHxWxI: jax.Array,
                  into_BxPxQxO: jax.Array) -> jax.Array:
  """`into + conv(x)` as `conv.conv_add_into` runs it: one oneDNN call that
  adds into `into`'s buffer where oneDNN runs the convolution. `conv` must
  route through `conv.conv_general_dilated`."""
  bias = (jnp.zeros((conv.out_features,), x_BxHxWxI.dtype)
          if conv.bias is None else conv.bias[...])
  return conv_lib.conv_add_into(x_BxHxWxI, conv.kernel[...], _strides(conv),
                                conv.padding, bias, into_BxPxQxO,
                                precision=conv.precision)


def patch_conv(conv: nnx.Conv, patches_SxKxC: jax.Array) -> jax.Array:
  """A stride-1 conv at chosen positions, from their input patches: `[S, O]`.

  Lets a conv run at a few rows of a map as one matmul (the sparse path
  gathers the patches); bias included.

  Args:
    conv: the conv; stride 1.
    patches_SxKxC: per output position, the conv's input at the `K = kh * kw`
      positions of its window in row-major (HWIO) order, zero where the
      window leaves the image (SAME zero padding).
  """
  if any(s != 1 for s in _strides(conv)):
    raise ValueError('Only stride-1 convolutions run on patches.')
  kernel = conv.kernel[...]
  rows_SxK = patches_SxKxC.reshape(patches_SxKxC.shape[0], -1)
  if conv.conv_general_dilated is conv_lib.conv_general_dilated:
    # The CPU's kernels; a stack of kernels (`conv.pick`) stays whole.
    y_SxO = conv_lib.rows_matmul(
        rows_SxK, kernel.reshape(*kernel.shape[:-4], -1, kernel.shape[-1]))
  else:
    y_SxO = rows_SxK @ kernel.reshape(-1, kernel.shape[-1])
  if conv.bias is not None:
    y_SxO = y_SxO + conv.bias[...]
  return y_SxO
