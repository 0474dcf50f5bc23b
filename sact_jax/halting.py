"""Halting branches: the small heads that score when to stop.

* ACT (per image): `sigmoid(global_conv(act(global_bn(mean_HW(x)))))`.
* SACT (per position): `sigmoid(local_conv(act(local_bn(x))) +
  global_conv(act(global_bn(mean_HW(x)))))`, where `local_conv` is a 3x3 conv
  with bias and `global_conv` a 1x1 conv without bias broadcast over space.

`act` is the model's nonlinearity on CIFAR and the identity on ImageNet. The
halting bias starts at -3, so a fresh network uses every unit.

Each term is its own method so that the sparse path (`sact_jax.sparse`) can
evaluate the local term at chosen rows and the global term from running sums
without restating either: a subclass that changes a method changes the dense
and the sparse model alike.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sact_jax import conv as conv_lib
from sact_jax import flops as flops_lib
from sact_jax import layers

INIT_BIAS = -3.0


def _shift_map(shift_taps_KxL: jax.Array, in_hw, pads) -> jax.Array:
  """`conv(t)` of the folded local conv (`SactHead.folds_local_bn`): `[P, Q]`.

  The BatchNorm shift `t` is the same at every position, so its term is
  the sum of the taps whose input lies inside the image: per axis, which
  taps of each output position read inside it (zero padding reads 0).
  As two small matmuls rather than a convolution of a map of ones, which
  on the CPU was one more library call per head (20-70 us at batch 1).
  """
  inside = []
  for size, k, (lo, hi) in zip(in_hw, shift_taps_KxL.shape, pads):
    pos = np.arange(size + lo + hi - k + 1)[:, None] + np.arange(k) - lo
    inside.append(((pos >= 0) & (pos < size)).astype(np.float32))
  return jnp.einsum('pk,kl,ql->pq', inside[0], shift_taps_KxL, inside[1],
                    precision=jax.lax.Precision.HIGHEST
                    ).astype(shift_taps_KxL.dtype)


def _global_logits(head: nnx.Module, mean_BxC: jax.Array) -> jax.Array:
  """A head's global term `[B]`: its BatchNorm, activation and 1x1 conv of
  the spatial mean of the unit output.

  The BatchNorm is the factory's `layers.BatchNorm`, whose training call
  keeps its statistics as one small array where autodiff of flax's kept
  six values; inside a scan over units each kept value is a kernel per
  unit on a GPU (a CIFAR SACT training step launches 4% fewer kernels;
  BUILD.md, "ACT and SACT over vanilla on a GPU").
  """
  normalised = head.global_bn(mean_BxC)
  return head.global_conv(head.activation(normalised))[:, 0]


class ActHead(nnx.Module):
  """One halting score per image."""

  def __init__(self, channels: int, *, factory: layers.LayerFactory,
               activation: layers.Activation, rngs: nnx.Rngs):
    self.activation = activation
    self.global_bn = factory.batch_norm(channels, rngs=rngs)
    self.global_conv = factory.dense(channels, 1, bias_init=INIT_BIAS,
                                     rngs=rngs)

  def global_logits(self, mean_BxC: jax.Array) -> jax.Array:
    """The halting logit `[B]` from the spatial mean of the unit output."""
    return _global_logits(self, mean_BxC)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the halting probability `[B]`."""
    return jax.nn.sigmoid(
        self.global_logits(jnp.mean(x_BxHxWxC, axis=(1, 2))))

  @property
  def global_cost(self) -> int:
    """FLOPs per image of the head."""
    return flops_lib.conv_cost(self.global_conv)

  def flops(self, running_B: jax.Array) -> jax.Array:
    """ACT counts the head of a unit iff the unit ran."""
    return running_B * self.global_cost

  def flops_of_runs(self, runs_B: jax.Array, num_heads: int) -> jax.Array:
    """`flops` summed over `num_heads` heads, of which `runs_B` ran."""
    del num_heads
    return runs_B.astype(jnp.float32) * self.global_cost


class SactHead(nnx.Module):
  """One halting score per spatial position.

  The sparse path relies on this structure: the local term is the 3x3
  `local_conv` (one output channel) of the elementwise `local_features`, and
  the global term reads the map only through its spatial mean.
  """

  def __init__(self, channels: int, *, factory: layers.LayerFactory,
               activation: layers.Activation, rngs: nnx.Rngs):
    self.activation = activation
    self.local_bn = factory.batch_norm(channels, rngs=rngs)
    self.local_conv = factory.conv(channels, 1, 3, use_bias=True,
                                   bias_init=INIT_BIAS, rngs=rngs)
    self.global_bn = factory.batch_norm(channels, rngs=rngs)
    self.global_conv = factory.dense(channels, 1, use_bias=False, rngs=rngs)

  def local_features(self, x_XxC: jax.Array) -> jax.Array:
    """What the local conv reads, elementwise (maps or rows)."""
    return self.activation(self.local_bn(x_XxC))

  @property
  def sums_windows(self) -> bool:
    """Whether the local conv runs as `conv.window_sum`: where the model
    keeps XLA's own convolutions (`layers.LayerFactory`: GPUs and TPUs),
    as one fused reduction that reads the BatchNorm's input. In training
    the BatchNorm with its batch statistics is then an affine map of the
    input, folded into the kernel (`folds_batch_statistics`) or applied
    inside `conv.affine_window_sum`: either way the backward pass keeps
    only the input, which the unit keeps anyway."""
    return (self.local_conv.conv_general_dilated
            is not conv_lib.conv_general_dilated)

  @property
  def folds_local_bn(self) -> bool:
    """Whether `local_bn` is folded into the local conv's kernel.

    In evaluation with the identity activation (ImageNet) the conv reads an
    affine map of `x`: `conv(x * s + t) = conv_{K s}(x) + conv(t)`. The
    first term reads `x` itself, where XLA would write the normalised map
    out before the conv (the head at 56x56x256, batch 32, 3x faster on a
    CPU); the second, `t`'s taps where the window lies inside the image,
    is one small map. Equal up to rounding.
    """
    return (self.activation is layers.identity
            and bool(self.local_bn.use_running_average)
            and not self.sums_windows)

  @property
  def folds_batch_statistics(self) -> bool:
    """Whether the window sums fold `local_bn` in training, as
    `folds_local_bn` folds it in evaluation, from the batch's statistics.

    With the identity activation (ImageNet) the window sums then read the
    unit output itself, and the backward pass keeps no normalised map
    (autodiff of BatchNorm-then-sums keeps it for every unit). Where it
    applies, a GPU's SACT training step moves 6% fewer bytes than through
    `conv.affine_window_sum`, which takes any activation (BUILD.md, "ACT
    and SACT over vanilla on a GPU"). Equal up to rounding, gradients
    included.
    """
    return (self.activation is layers.identity
            and not self.local_bn.use_running_average
            and self.sums_windows)

  def _folded_local_conv(self, scale_C: jax.Array, shift_C: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """The fold of `x * scale + shift` into the local conv: its kernel
    times the scale `[kh, kw, C, 1]`, and what each tap takes from the
    shift `[kh, kw, 1]`."""
    kernel = self.local_conv.kernel[...]
    return (kernel * scale_C[:, None],
            jnp.tensordot(kernel, shift_C, axes=([2], [0])))

  def local_logits(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """The local term `[B, H, W]` at every position."""
    conv = self.local_conv
    pads = conv_lib.explicit_padding(conv.padding, conv.kernel_size, (1, 1),
                                     x_BxHxWxC.shape[1:3])
    if self.folds_batch_statistics:
      kernel, shift_taps = self._folded_local_conv(
          *layers.batch_statistics_affine(self.local_bn, x_BxHxWxC))
      local = (conv_lib.window_sum(x_BxHxWxC, kernel, pads)
               + _shift_map(shift_taps[..., 0], x_BxHxWxC.shape[1:3],
                            pads)[None, :, :, None])
    elif self.sums_windows and not self.local_bn.use_running_average:
      local = conv_lib.affine_window_sum(
          x_BxHxWxC,
          *layers.batch_statistics_affine(self.local_bn, x_BxHxWxC),
          conv.kernel[...], pads, self.activation)
    elif self.sums_windows:
      local = conv_lib.window_sum(
          self.local_features(x_BxHxWxC), conv.kernel[...], pads)
    elif not self.folds_local_bn:
      return conv(self.local_features(x_BxHxWxC))[..., 0]
    else:
      kernel, shift_taps = self._folded_local_conv(
          *layers.batch_norm_affine(self.local_bn))
      local = layers.conv_with_kernel(conv, x_BxHxWxC, kernel)
      if pads is None:  # A padding XLA would not take: the conv itself.
        ones = jnp.ones((1, *x_BxHxWxC.shape[1:3], 1), x_BxHxWxC.dtype)
        local = local + layers.conv_with_kernel(conv, ones,
                                                shift_taps[:, :, None, :])
      else:
        local = local + _shift_map(shift_taps[..., 0], x_BxHxWxC.shape[1:3],
                                   pads)[None, :, :, None]
    if conv.bias is not None:
      local = local + conv.bias[...]
    return local[..., 0]

  def local_taps(self, x_SxC: jax.Array) -> jax.Array:
    """What each of the 9 taps of the local conv takes from rows: `[S, 9]`.

    With one output channel the 3x3 conv factors into this `[C, 9]` matmul
    per row and a sum over the 9 neighbours of each output position
    (`local_logits_from_taps`), which is cheaper at rows than an im2col of
    the neighbours.
    """
    affine = self.taps_affine()
    if affine is not None:
      kernel_9xC, shift_9 = affine
      return x_SxC @ kernel_9xC.T + shift_9
    kernel_9xC = self.local_conv.kernel[...].reshape(9, -1)
    return self.local_features(x_SxC) @ kernel_9xC.T

  def taps_affine(self) -> tuple[jax.Array, jax.Array] | None:
    """`local_taps` as `x @ kernel_9xC.T + shift_9` where it is affine in
    `x` (`folds_local_bn`: the BatchNorm folded, as `local_logits` does),
    else None. Lets the sparse path compute the taps inside its row
    passes (`sparse.rows.update_rows`, `update_dense`, `row_taps`)."""
    if not self.folds_local_bn:
      return None
    kernel, shift_taps = self._folded_local_conv(
        *layers.batch_norm_affine(self.local_bn))
    return kernel.reshape(9, -1), shift_taps.reshape(9)

  def local_logits_from_taps(self, taps_Sx9: jax.Array) -> jax.Array:
    """The local term `[S]` from tap d of neighbour d (`local_taps`).

    Args:
      taps_Sx9: per output position, tap d of its neighbour d in HWIO order
        (zero for neighbours outside the image).
    """
    local_S = jnp.sum(taps_Sx9, axis=1)
    if self.local_conv.bias is not None:
      local_S = local_S + self.local_conv.bias[...][0]
    return local_S

  def local_logits_from_tap_map(self, taps_BxHxWx9: jax.Array) -> jax.Array:
    """The local term `[B, H, W]` from `local_taps` at every position.

    Tap d of neighbour d (zero outside the image), as
    `local_logits_from_taps` at rows: the 3x3 conv with SAME padding, whose
    tap `(i, j)` of output `(p, q)` reads input `(p + i - 1, q + j - 1)`.
    """
    conv = self.local_conv
    _, height, width, _ = taps_BxHxWx9.shape
    pads = conv_lib.explicit_padding(conv.padding, conv.kernel_size, (1, 1),
                                     (height, width))
    if tuple(conv.kernel_size) != (3, 3) or pads != ((1, 1), (1, 1)):
      raise ValueError('Tap maps need a 3x3 local conv with SAME padding, '
                       f'got {conv.kernel_size} padded {pads}.')
    padded = jnp.pad(taps_BxHxWx9, ((0, 0), (1, 1), (1, 1), (0, 0)))
    neighbours_BxHxWx9 = jnp.stack(
        [padded[:, i:i + height, j:j + width, 3 * i + j]
         for i in range(3) for j in range(3)], axis=-1)
    return self.local_logits_from_taps(
        neighbours_BxHxWx9.reshape(-1, 9)).reshape(taps_BxHxWx9.shape[:3])

  def global_logits(self, mean_BxC: jax.Array) -> jax.Array:
    """The global term `[B]` from the spatial mean of the unit output."""
    return _global_logits(self, mean_BxC)

  def probability(self, local: jax.Array, global_: jax.Array) -> jax.Array:
    """The halting score from the two terms (broadcast to one shape)."""
    return jax.nn.sigmoid(local + global_)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the halting probability `[B, H, W]`."""
    return self.scores(x_BxHxWxC, jnp.mean(x_BxHxWxC, axis=(1, 2)))

  def scores(self, x_BxHxWxC: jax.Array, mean_BxC: jax.Array) -> jax.Array:
    """`self(x)` given `x`'s spatial mean, for a caller that keeps the
    per-image sums (one pass over the map less)."""
    return self.probability(self.local_logits(x_BxHxWxC),
                            self.global_logits(mean_BxC)[:, None, None])

  @property
  def local_cost(self) -> int:
    """FLOPs of the local conv per position where it runs."""
    return flops_lib.conv_cost(self.local_conv)

  @property
  def global_cost(self) -> int:
    """FLOPs of the global conv per image."""
    return flops_lib.conv_cost(self.global_conv)

  def flops(self, running_BxHxW: jax.Array) -> jax.Array:
    """The local conv counts active positions; the global conv always."""
    return (flops_lib.spatial_count(running_BxHxW) * self.local_cost
            + self.global_cost)

  def flops_of_runs(self, runs_BxHxW: jax.Array,
                    num_heads: int) -> jax.Array:
    """`flops` summed over `num_heads` heads, of which `runs_BxHxW` ran at
    each position."""
    return (flops_lib.spatial_count(runs_BxHxW) * self.local_cost
            + num_heads * self.global_cost)
