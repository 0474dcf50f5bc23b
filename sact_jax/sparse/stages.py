"""Residual units and halting heads evaluated at chosen rows only.

Only the geometry lives here: which rows each part reads. The math is the
model's own (`units.ResidualUnit.dilated_rows` / `active_rows`, the
`halting.SactHead` terms), so a unit or head that changes a formula runs
sparsely unchanged. A unit's *dilated stage* (everything up to the input of
its 3x3 conv that reads neighbours) runs on the dilated active set; its
*active stage* (the rest) on the active set, reading the dilated stage's
output at the neighbours.

A unit that is `fusable` (ImageNet's bottleneck units) runs each stage as
one custom call on all of its rows where the row custom calls run and the
map is large enough (`runs_fused`; `fused_dilated`, `fused_active`:
row_stages.cc, the unit's math handed over as `units.RowMatrices`); the
chunked functions here serve the others.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from sact_jax import conv as conv_lib
from sact_jax import halting
from sact_jax import onednn
from sact_jax import units as units_lib
from sact_jax.sparse import rows as rows_lib


def check_unit(unit: nnx.Module):
  """Units 2..L must split at rows and keep shape (identity shortcut)."""
  if not isinstance(unit, units_lib.ResidualUnit):
    raise TypeError(f'No sparse evaluation for units of type '
                    f'{type(unit).__name__}: they must derive from '
                    'units.ResidualUnit.')
  if not unit.identity_shortcut:
    raise ValueError('A sparse unit must have stride 1 and an identity '
                     'shortcut.')


def dilated_source(unit: units_lib.ResidualUnit, x_NxC: jax.Array
                   ) -> jax.Array:
  """The map `dilated_stage` gathers from, computed once per unit.

  A 1x1 `conv1` reads each row once: the unit input itself. A wider one
  reads a position in up to 9 windows, so the input is pre-activated once
  on the whole map (elementwise, cheap next to 9 gathered copies) and a
  zero row appended, which positions outside the image read (SAME padding
  comes after the pre-activation). On CIFAR ResNet-110 at batch 32 the
  gather that pre-activated every window's rows took a third of the call.
  """
  if unit.dilated_kernel_size == 1:
    return x_NxC
  preact_NxC = unit.preactivation(x_NxC)
  return jnp.concatenate(
      [preact_NxC, jnp.zeros((1, preact_NxC.shape[1]), preact_NxC.dtype)])


def dilated_stage(unit: units_lib.ResidualUnit, source: jax.Array,
                  idx_S: jax.Array, *, height: int, width: int,
                  num_rows: int) -> jax.Array:
  """The unit up to its neighbour-reading 3x3 conv, at rows `idx_S`.

  Args:
    unit: the unit.
    source: `dilated_source(unit, x_NxC)`.
    idx_S: dilated rows.
    height, width: the map's spatial shape.
    num_rows: `N`, the map's positions.
  """
  window = unit.dilated_kernel_size
  patches_SxKxC, valid_SxK = rows_lib.patches(
      source, idx_S, window, height=height, width=width, num_rows=num_rows)
  if window == 1:
    return unit.dilated_rows(patches_SxKxC, valid_SxK)
  return unit.dilated_rows_preactivated(patches_SxKxC)


# Fewest positions a map needs (batch included) for fused stages. Their
# two threads take tiles of at least 64 rows, so a smaller map's sets are a
# tile or two: one thread, where the chunked path's row matmuls run as two
# column halves. At batch 1 (ImageNet ResNet-101, maps of 3136, 784, 196
# and 49 positions) fused stages in every block took 1.10x the chunked
# path's time (`sparse_ab`, Intel Xeon VM); batch 32's maps have 1568 or
# more.
FUSED_MIN_ROWS = 1024


def fusable(unit: units_lib.ResidualUnit) -> bool:
  """Whether the unit's stages can run as one custom call each
  (row_stages.cc): units that are `RowMatrices` (`row_stages`) with a 1x1
  conv1. They do where `runs_fused` says so."""
  return unit.row_stages and unit.dilated_kernel_size == 1


def runs_fused(dtype, num_rows: int) -> bool:
  """Whether a `fusable` unit's stages run fused over a map of `num_rows`
  positions: where the row custom calls run (`rows.custom_calls`) and the
  map has `FUSED_MIN_ROWS`."""
  return rows_lib.custom_calls(dtype) and num_rows >= FUSED_MIN_ROWS


def fused_dilated(unit: units_lib.ResidualUnit, x_NxC: jax.Array,
                  y_N1xD: jax.Array, idx_L: jax.Array,
                  head: halting.SactHead | None = None,
                  taps_N1x9: jax.Array | None = None):
  """`y` with `dilated_stage` written at every row of `idx_L` (padding
  indices write nothing), in one call (`onednn.dilated_rows`). With a
  `head` (taps affine: `SactHead.taps_affine`), also `taps` with
  `head.local_taps` of `x` written at the same rows: `(y, taps)`. For
  `fusable` units where `runs_fused` (the caller decides; elsewhere
  `dilated_stage` over chunks)."""
  return onednn.dilated_rows(
      x_NxC, y_N1xD, idx_L, unit.row_matrices(), conv_lib.current_unit(),
      None if head is None else taps_N1x9,
      None if head is None else _taps_affine(head))


def _taps_affine(head: halting.SactHead):
  """The head's affine taps, which fused stages need."""
  affine = head.taps_affine()
  if affine is None:
    raise ValueError('Fused stages need a head whose taps are affine '
                     '(SactHead.taps_affine).')
  return affine


def fused_active(unit: units_lib.ResidualUnit, y_N1xD: jax.Array,
                 idx_L: jax.Array, cumulative_N: jax.Array, maps, *,
                 height: int, width: int, update_x: bool,
                 head: halting.SactHead | None):
  """`active_stage` at every row of `idx_L` and the block's update with it
  (what `rows.update_rows` does, weighted `1 - cumulative`): the new `(x,
  out, xsum, taps)` of `maps`, in one call (`onednn.active_rows`). For
  `fusable` units where `runs_fused` and the head's taps (if any) are
  affine (`SactHead.taps_affine`): the caller decides; elsewhere
  `active_stage` and `update_rows` over chunks."""
  head = head if update_x else None
  affine = None if head is None else _taps_affine(head)
  return onednn.active_rows(
      y_N1xD, idx_L, unit.row_matrices(), conv_lib.current_unit(),
      cumulative_N, *maps, affine, height=height, width=width,
      update_x=update_x)


def active_stage(unit: units_lib.ResidualUnit, y_N1xD: jax.Array,
                 idx_S: jax.Array, *, height: int, width: int) -> jax.Array:
  """The residual `f(x)` at rows `idx_S`, from the dilated stage's map.

  Args:
    unit: the unit.
    y_N1xD: dilated-stage output, `N + 1` rows with a zero last row; valid at
      every neighbour of `idx_S`.
    idx_S: active rows.
    height, width: the map's spatial shape.
  """
  y_Sx9xD, _ = rows_lib.patches(y_N1xD, idx_S, 3, height=height, width=width,
                                num_rows=y_N1xD.shape[0] - 1)
  return unit.active_rows(y_Sx9xD)


def head_local(head: halting.SactHead, taps_N1x9: jax.Array,
               idx_S: jax.Array, *, height: int, width: int) -> jax.Array:
  """The head's local logit `[S]` at rows `idx_S` from its tap products.

  Args:
    head: the halting head.
    taps_N1x9: `head.local_taps` scattered into a map of `N + 1` rows whose
      last row is zero; valid at every neighbour of `idx_S`.
    idx_S: output rows.
    height, width: the map's spatial shape.
  """
  nbr_Sx9, _ = rows_lib.neighbours(idx_S, height, width,
                                   taps_N1x9.shape[0] - 1)
  # Tap d of neighbour d: one scalar per tap from the flat tap map.
  flat_Sx9 = nbr_Sx9 * 9 + jnp.arange(9, dtype=nbr_Sx9.dtype)
  return head.local_logits_from_taps(
      rows_lib.gather(taps_N1x9.reshape(-1), flat_Sx9))
