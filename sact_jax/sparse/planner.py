"""Row plans of a SACT block's units from the set sizes the device reports.

The halting step before unit i computes, on the device, the sizes of unit
i's index sets (dilated, active). Reading them on the host waits for that
step. Unit i can be planned from them (exact) or, pipelined, from the sizes
of unit i - 1: sets only shrink (halted positions never resume), so those
bound unit i's, and the host reads them while the device still runs unit
i - 1. `Planner` keeps the sizes, decides which to use and records the
plans.
"""

from typing import Callable, Iterator, NamedTuple

import jax

from sact_jax.sparse import rows as rows_lib

Sizes = tuple[int, int]  # (dilated, active) set sizes.


class UnitPlan(NamedTuple):
  """How one unit runs: its two stages' row plans, densely or not.

  `dense_head`: the head after the unit (if `with_head`) runs on the whole
  map instead of at rows (always for a dense unit).
  """
  dilated: rows_lib.RowPlan
  active: rows_lib.RowPlan
  dense: bool
  with_head: bool
  dense_head: bool = False


class Planner:
  """Set sizes and row plans of the units 2..L of one SACT block, in order.

  Args:
    first_sizes: device `[2]` int32 sizes of unit 2's sets (index 0 here).
    num_rows: positions of the block's maps.
    chunk_dilated, chunk_active: rows per chunk of the two stages.
    buckets: tail sizes per chunk (`SparseOptions.buckets`).
    pipeline: `SparseOptions.pipeline`.
    read: reads device sizes on the host (waits for the device).
    head_runs_dense: whether a sparse unit's head runs on the whole map,
      given the rows its two stages compute (`CostModel.head_runs_dense`);
      default never.
  """

  def __init__(self, first_sizes: jax.Array, *, num_rows: int,
               chunk_dilated: int, chunk_active: int, buckets: int,
               pipeline: float, read: Callable[[jax.Array], Sizes],
               head_runs_dense: Callable[[int, int], bool] | None = None):
    self.num_rows = num_rows
    self._head_runs_dense = head_runs_dense
    self.chunk_dilated, self.chunk_active = chunk_dilated, chunk_active
    self._granule_dilated = rows_lib.granule_for(num_rows, chunk_dilated,
                                                 buckets)
    self._granule_active = rows_lib.granule_for(num_rows, chunk_active,
                                                buckets)
    self.pipeline = pipeline
    self._read = read
    self._device = [first_sizes]  # [i]: unit i's sizes, on the device.
    # [i + 1]: host copy of `_device[i]`; [0]: every position (a bound).
    self._host = [(num_rows, num_rows)]
    self.plans: list[UnitPlan] = []

  def add_sizes(self, sizes: jax.Array):
    """Device sizes of the next unit's sets (after the halting step)."""
    self._device.append(sizes)

  def _read_through(self, index: int):
    while len(self._host) <= index:
      self._host.append(self._read(self._device[len(self._host) - 1]))

  def sizes(self, i: int) -> tuple[Sizes, bool]:
    """Sizes to plan unit i with, and whether they are its exact sizes.

    Waits for unit i's own sizes unless the active set fell by at most
    `pipeline` of the positions at unit i - 1 (so the bound wastes little).
    """
    self._read_through(i)  # Sizes of unit i - 1: they are done, no wait.
    drop = (self._host[i - 1][1] - self._host[i][1] if i > 0
            else self.num_rows)
    if drop > self.pipeline * self.num_rows or self.pipeline <= 0:
      return self.exact_sizes(i), True
    return self._host[i], False

  def exact_sizes(self, i: int) -> Sizes:
    """Unit i's own set sizes (waits for the step before unit i)."""
    self._read_through(i + 1)
    return self._host[i + 1]

  def plan(self, sizes: Sizes, *, dense: bool, with_head: bool) -> UnitPlan:
    """Plans the next unit from `sizes` and records the plan."""
    n_dilated, n_active = sizes
    dilated = rows_lib.plan_rows(n_dilated, self.chunk_dilated,
                                 self._granule_dilated)
    active = rows_lib.plan_rows(n_active, self.chunk_active,
                                self._granule_active)
    dense_head = with_head and (dense or (
        self._head_runs_dense is not None
        and self._head_runs_dense(dilated.rows, active.rows)))
    plan = UnitPlan(dilated=dilated, active=active, dense=dense,
                    with_head=with_head, dense_head=dense_head)
    self.plans.append(plan)
    return plan

  def planned(self) -> Iterator[tuple[Sizes, UnitPlan]]:
    """Exact sizes and plan of every unit planned (waits for each)."""
    for i, plan in enumerate(self.plans):
      yield self.exact_sizes(i), plan
