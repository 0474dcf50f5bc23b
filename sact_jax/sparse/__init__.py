"""Sparse inference: run only the units and positions that halting keeps.

`apply(model, images)` returns what `model(images)` returns, computing ACT
units only while an image of the batch still runs and SACT units only at
their active (and dilated) positions. See `runner.py`.
"""

from sact_jax.sparse.options import SparseOptions
from sact_jax.sparse.runner import apply
from sact_jax.sparse.runner import BLOCK_TIMINGS
from sact_jax.sparse.runner import runner_for
from sact_jax.sparse.runner import SparseRunner
