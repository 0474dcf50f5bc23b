"""Feature maps as rows: gather and scatter chosen positions.

A `[B, H, W, C]` map is kept flat as `[N, C]` rows, `N = B * H * W`, and a set
of positions as sorted flat row indices padded to a static length with the
out-of-range index `N + 1`. Padding rows gather a clipped (harmless) row and
their results are dropped by every scatter (`mode='drop'`).

A conv at a set of rows is a matmul on the patches gathered here (the units
and heads do the math, `layers.patch_conv`): its input at the 1 or 9
positions of each row's window (an im2col gather per position, which beat
gathering tiles; 3x3 windows copied by a custom call on the CPU,
`_copies_rows`). Zero padding is honoured in one of two ways: a map whose row
`N` is zero (neighbours outside the image read it), or a validity mask applied
after the pre-activation that the conv reads.

Rows are processed in chunks (`row_loop`): full chunks of a static size in a
loop whose trip count is an argument, then one tail of a static bucketed
size. Only the tail size reaches the compiler, so jit compiles at most a few
shapes per map size whatever the masks, and no active row is ever dropped.
"""

import math
from typing import Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sact_jax import conv as conv_lib
from sact_jax import onednn


class RowPlan(NamedTuple):
  """How `count` rows are processed: `n_full` chunks of `chunk`, then `tail`.

  `tail >= count - n_full * chunk`; the difference is padding (wasted rows).
  """
  n_full: int
  tail: int
  count: int
  chunk: int

  @property
  def rows(self) -> int:
    """Rows computed: the set and its padding."""
    return self.n_full * self.chunk + self.tail

  @property
  def padding(self) -> int:
    """Rows computed that are not in the set."""
    return self.rows - self.count


def plan_rows(count: int, chunk: int, granule: int) -> RowPlan:
  """Splits `count` rows into full chunks and a tail bucketed to `granule`."""
  if count < 0 or chunk < 1 or granule < 1:
    raise ValueError(f'Bad row plan: count={count}, chunk={chunk}, '
                     f'granule={granule}.')
  n_full, rest = divmod(count, chunk)
  tail = min(chunk, -(-rest // granule) * granule)
  return RowPlan(n_full=n_full, tail=tail, count=count, chunk=chunk)


def granule_for(num_rows: int, chunk: int, buckets: int) -> int:
  """Tail sizes are multiples of this: `buckets` sizes cover a chunk."""
  return max(1, math.ceil(min(chunk, num_rows) / buckets))


def padded_length(num_rows: int, chunk: int) -> int:
  """Length of an index vector that every plan can slice without clamping.

  `lax.dynamic_slice` clamps out-of-range starts, which would re-read rows
  already processed; the index vector is padded so that it never does.
  """
  return num_rows + 2 * chunk


def indices(mask_N: jax.Array, length: int, block: int = 128) -> jax.Array:
  """Sorted flat indices of the nonzero entries, padded with `N + 1`.

  Same as `jnp.nonzero(mask, size=length, fill_value=N + 1)`. On the CPU
  one pass in a custom call (`onednn.nonzero_rows`): it sits on the path
  from each unit to the next, where XLA's formulation below took some ten
  operations. Elsewhere (and without the custom calls) faster than
  `jnp.nonzero` on XLA: the prefix sum that places each entry is a matmul
  with a triangular matrix within blocks of `block` entries plus a short
  cumsum over blocks, instead of a cumsum over all N. The sums are
  integers below 2**24, exact in float32.
  """
  if custom_calls():  # One pass on the CPU (`onednn.nonzero_rows`).
    return onednn.nonzero_rows(mask_N, length)
  num_rows = mask_N.shape[0]
  flat_N = mask_N > 0
  pad = -num_rows % block
  blocks = jnp.pad(flat_N.astype(jnp.float32), (0, pad)).reshape(-1, block)
  # A literal (numpy): built with jnp it is recomputed at every call.
  upper = np.triu(np.ones((block, block), np.float32))
  within = jnp.matmul(blocks, upper, precision=lax.Precision.HIGHEST)
  before = jnp.cumsum(within[:, -1]) - within[:, -1]
  rank_N = (within + before[:, None]).reshape(-1)[:num_rows]
  target_N = jnp.where(flat_N, rank_N.astype(jnp.int32) - 1, length)
  return jnp.full((length,), num_rows + 1, jnp.int32).at[target_N].set(
      jnp.arange(num_rows, dtype=jnp.int32), mode='drop',
      unique_indices=True)


def row_loop(idx_L: jax.Array, n_full: jax.Array | int, chunk: int,
             tail: int, body: Callable, carry,
             count: jax.Array | int | None = None):
  """Runs `carry = body(idx_S, carry)` over the planned chunks of `idx_L`.

  Args:
    idx_L: padded row indices (`padded_length` long).
    n_full: number of full chunks (traced: no recompilation as it varies).
    chunk: static size of a full chunk.
    tail: static size of the last, partial chunk (0 for none).
    body: called with `[chunk]` or `[tail]` indices.
    carry: the loop state (maps updated in place).
    count: the rows of `idx_L` that are not padding (an upper bound will
      do), or None. The tail's rows from `count` on are padding: its body
      runs under `conv.valid_rows`, so that its row matmuls skip them.
  """
  def full(i, carry):
    return body(lax.dynamic_slice_in_dim(idx_L, i * chunk, chunk), carry)
  carry = lax.fori_loop(0, n_full, full, carry)
  if tail:
    start = jnp.asarray(n_full, jnp.int32) * chunk
    with conv_lib.valid_rows(None if count is None else count - start):
      carry = body(lax.dynamic_slice_in_dim(idx_L, start, tail), carry)
  return carry


def neighbours(idx_S: jax.Array, height: int, width: int, num_rows: int
               ) -> tuple[jax.Array, jax.Array]:
  """Flat indices of the 3x3 neighbourhood of each row, in HWIO tap order.

  One broadcast expression over `[S, 9]` (tap offsets as constants), which
  XLA compiles to one loop; per-tap vectors stacked would be ten kernels.

  Returns:
    `[S, 9]` indices, `num_rows` where the neighbour lies outside the image,
    and the `[S, 9]` validity mask.
  """
  taps = np.arange(9)
  di_9, dj_9 = taps // 3 - 1, taps % 3 - 1
  rem_Sx1 = (idx_S % (height * width))[:, None]
  i_Sx9, j_Sx9 = rem_Sx1 // width + di_9, rem_Sx1 % width + dj_9
  valid_Sx9 = ((i_Sx9 >= 0) & (i_Sx9 < height) & (j_Sx9 >= 0)
               & (j_Sx9 < width) & (idx_S < num_rows)[:, None])
  nbr_Sx9 = jnp.where(valid_Sx9, idx_S[:, None] + di_9 * width + dj_9,
                      num_rows)
  return nbr_Sx9.astype(idx_S.dtype), valid_Sx9


def gather(src_NxC: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows of `src` (padding indices read a clipped row)."""
  return src_NxC.at[idx].get(mode='clip', indices_are_sorted=False)


def patches(src_NxC: jax.Array, idx_S: jax.Array, kernel_size: int, *,
            height: int, width: int, num_rows: int
            ) -> tuple[jax.Array, jax.Array]:
  """Each row's `kernel_size`-square window of `src` (1 or 3), row-major.

  Args:
    src_NxC: the map the window reads; `N + 1` rows with a zero last row if
      the caller relies on it for padding (no pre-activation after).
    idx_S: window centres (padding `N + 1` allowed).
    kernel_size: 1 or 3.
    height, width: the map's spatial shape.
    num_rows: `N`, the map's positions.

  Returns:
    `[S, K, C]` patches (`K = kernel_size ** 2`; positions outside the image
    read row `num_rows`, clipped) and the `[S, K]` validity mask.
  """
  if kernel_size == 1:
    return gather(src_NxC, idx_S)[:, None, :], (idx_S < num_rows)[:, None]
  if kernel_size != 3:
    raise ValueError(f'Row windows are 1x1 or 3x3, got {kernel_size}.')
  nbr_Sx9, valid_Sx9 = neighbours(idx_S, height, width, num_rows)
  if _copies_rows(src_NxC):
    return onednn.row_patches(src_NxC, idx_S, height=height, width=width,
                              num_rows=num_rows), valid_Sx9
  return gather(src_NxC, nbr_Sx9), valid_Sx9


def _copies_rows(src_NxC: jax.Array) -> bool:
  """Whether `patches` gathers 3x3 windows with `onednn.row_patches`.

  On the CPU where it is built. XLA:CPU fuses its gather with the reshape
  of the patches into matmul rows, and its loop over the `[S, 9 C]` result
  then finds each element's source apart: 3.5-6x slower than copying rows
  (`[512, 9, 256]`: 272 vs 48 us; a block-3 unit of ImageNet ResNet-101 at
  batch 32 19.5 vs 14.9 ms).
  """
  return custom_calls(src_NxC.dtype)


def custom_calls(dtype=jnp.float32) -> bool:
  """Whether the sparse path's row custom calls (row_gather.cc) run for
  maps of `dtype`: float32 on the CPU, where `onednn` is built and
  enabled."""
  return (dtype == jnp.float32 and jax.default_backend() == 'cpu'
          and onednn.enabled())


def scatter_set(dst_NxC: jax.Array, idx_S: jax.Array,
                rows_SxC: jax.Array) -> jax.Array:
  return dst_NxC.at[idx_S].set(rows_SxC, mode='drop', indices_are_sorted=True)


def scatter_add(dst_NxC: jax.Array, idx_S: jax.Array,
                rows_SxC: jax.Array) -> jax.Array:
  return dst_NxC.at[idx_S].add(rows_SxC, mode='drop', indices_are_sorted=True)


def update_rows(x_NxC: jax.Array, out_NxC: jax.Array, xsum_BxC: jax.Array,
                taps_Nx9: jax.Array, idx_S: jax.Array,
                residual_SxC: jax.Array, weight_S: jax.Array, *, hw: int,
                update_x: bool = True, head=None):
  """A unit's update of a SACT block's maps at its active rows.

  `out[i] += weight[s] * residual[s]` at `i = idx_S[s]`; with `update_x`
  also `x[i] += residual[s]`, the per-image sums `xsum[i // hw] +=
  residual[s]` (`hw` positions per image) and, with a halting `head`, its
  tap products at the updated rows, `taps[i] = head.local_taps(x[i])`.
  Padding indices (`>= N`) change nothing.

  Returns:
    The new `(x, out, xsum, taps)`.

  On the CPU where row_gather.cc is built, one custom call
  (`onednn.update_rows`; the taps inside it where the head's are affine,
  `SactHead.taps_affine`) instead of XLA's gather, 9-column dot and four
  scatters, each scatter on one thread, which read the residual three
  times.
  """
  head = head if update_x else None
  if custom_calls(x_NxC.dtype):
    affine = None if head is None else head.taps_affine()
    x_NxC, out_NxC, xsum_BxC, taps_Nx9, rows_SxC = onednn.update_rows(
        x_NxC, out_NxC, xsum_BxC, taps_Nx9, idx_S, residual_SxC, weight_S,
        affine, hw=hw, update_x=update_x,
        with_rows=head is not None and affine is None)
    if rows_SxC is not None:
      taps_Nx9 = scatter_set(taps_Nx9, idx_S, head.local_taps(rows_SxC))
    return x_NxC, out_NxC, xsum_BxC, taps_Nx9
  out_NxC = scatter_add(out_NxC, idx_S, weight_S[:, None] * residual_SxC)
  if not update_x:
    return x_NxC, out_NxC, xsum_BxC, taps_Nx9
  if head is None:
    x_NxC = scatter_add(x_NxC, idx_S, residual_SxC)
  else:
    # Gather, add, set (not scatter-add): the new rows feed the head's
    # taps, and the data dependency lets XLA update `x` in place.
    rows_SxC = gather(x_NxC, idx_S) + residual_SxC
    taps_Nx9 = scatter_set(taps_Nx9, idx_S, head.local_taps(rows_SxC))
    x_NxC = scatter_set(x_NxC, idx_S, rows_SxC)
  xsum_BxC = scatter_add(xsum_BxC, idx_S // hw, residual_SxC)
  return x_NxC, out_NxC, xsum_BxC, taps_Nx9


def fuses_dense(head, dtype) -> bool:
  """Whether `update_dense` runs for the units before `head`: on the CPU
  where row_gather.cc is built, in float32, for a head whose taps are
  affine in the map (`SactHead.taps_affine`)."""
  return head.folds_local_bn and custom_calls(dtype)


def update_dense(x_BxHxWxC: jax.Array, out_BxHxWxC: jax.Array | None,
                 residual_BxHxWxC: jax.Array | None,
                 weight_BxHxW: jax.Array | None, *, head,
                 bias_C: jax.Array | None = None):
  """A densely run unit's update of a SACT block's maps, and `head`'s taps.

  Where `weight != 0` (the running positions; `running * (1 -
  cumulative)` is 0 at halted ones) `out += weight * residual` and `x +=
  residual`; then the per-image sums `[B, C]` of the new `x` and
  `head.local_taps` of it at every position:
  `(x, out, xsum, taps_BxHxWx9)`. Without a residual (None), only the sums
  and taps of `x` (`out` None); with a residual but `out` None, `out`
  starts as `x` (a block's second unit); with a residual but no weight
  (None), `x += residual` everywhere and no `out` (a block's first unit:
  `x` its shortcut). With `bias_C` the residual is `residual + bias`: a
  unit's last bias (`ResidualUnit.split_output`), added as each row is
  read instead of in a pass over the map of its own. Only where
  `fuses_dense`: one custom call (`onednn.update_dense`) that reads each
  row once, where XLA makes a pass each for the masked residual, the
  output sum, the spatial sum and the head's taps (the dense model's code,
  which the caller runs elsewhere). The maps stay `[B, H, W, C]`: passed
  reshaped to `[N, C]`, XLA copied `x` and `out` before the call and again
  after it (a jitted unit at block 1's maps, batch 32: four copies of 102
  MB).
  """
  return onednn.update_dense(
      x_BxHxWxC, out_BxHxWxC, residual_BxHxWxC, weight_BxHxW,
      head.taps_affine(), hw=x_BxHxWxC.shape[1] * x_BxHxWxC.shape[2],
      bias_C=bias_C)


def row_taps(taps_Nx9: jax.Array, x_NxC: jax.Array, idx_S: jax.Array,
             head) -> jax.Array:
  """`taps` with `head.local_taps` of `x`'s rows `idx_S` written at them
  (padding indices write nothing).

  On the CPU where row_gather.cc is built and the head's taps are affine
  (`SactHead.taps_affine`), one custom call (`onednn.row_taps`) instead of
  XLA's gather, 9-column dot and scatter.
  """
  affine = head.taps_affine()
  if affine is not None and custom_calls(x_NxC.dtype):
    return onednn.row_taps(x_NxC, idx_S, affine, taps_Nx9)
  return scatter_set(taps_Nx9, idx_S, head.local_taps(gather(x_NxC, idx_S)))
