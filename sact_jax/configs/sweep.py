r"""The FLOPs-accuracy sweep on `sact_shapes`: SACT ResNet-20s at several tau.

  python -m experiments.sweep --workdir=/tmp/sact_sweep

The main job's data, width and schedule with three units per block (two
halting decisions per position and block, so tau can move the cost between
ResNet-8 and ResNet-20 FLOPs) and fewer steps, so that the sweep's SACT
runs at four taus and the vanilla ResNet-8/14/20 baselines (the launcher's
default --taus and --vanilla_units) train in about half an hour on 2 CPU
cores. Each run evaluates once, at the end.
"""

import ml_collections

from sact_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """The base config of every run of the sweep."""
  config = default.get_config()
  config.units = (3, 3, 3)
  config.num_train_steps = 1200
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 400
  config.keep_checkpoints = 1
  config.num_ponder_maps = 8
  return config
