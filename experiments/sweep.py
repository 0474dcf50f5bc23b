r"""Trains a FLOPs-accuracy sweep, then draws its trade-off: sact_jax.sweep.

  python -m experiments.sweep --workdir=/tmp/sact_sweep
  python -m experiments.sweep --config=sact_jax/configs/sweep.py \
      --config.num_train_steps=3000 --taus=0.005,0.01,0.02 \
      --model_types=act,sact --vanilla_units=1,2,3 --workdir=/tmp/sweep

One run per model type and tau (`sact_tau0.02`, ...) and per vanilla depth
(`vanilla_units2-2-2`, ...), each in its own workdir under --workdir, one
after another. Start the same command again at any time: finished runs are
skipped, an interrupted one resumes from its last checkpoint (with a larger
--config.num_train_steps, finished runs train on; other changed settings
are refused: use another --workdir). At the end the
trade-off of every finished run under --workdir is written there
(tradeoff.png, tradeoff.md, tradeoff.json; see experiments/collect_sweep.py
for workdirs trained elsewhere).

Bad input (flags, any run's config, a workdir that cannot be written or
holds another model) ends with one `error:` line and exit status 2 before
any run starts; a non-finite loss with exit status 1 (experiments/_cli.py).
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import _cli
import sact_jax

# By its full path: the launcher may be started from any directory.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(sact_jax.__file__), 'configs',
                               'sweep.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Base config of every run; runs differ in '
    'model_type, tau and (vanilla) units.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Root directory of the sweep: one workdir per run, and '
    'the trade-off table and figure.', required=True)
_TAUS = flags.DEFINE_list(
    'taus', ['0.01', '0.02', '0.04', '0.08'],
    'Ponder-cost weights of the ACT/SACT runs.')
_MODEL_TYPES = flags.DEFINE_list(
    'model_types', ['sact'], "Adaptive model types to sweep over --taus: "
    "'act', 'sact' or both; empty for vanilla runs only.")
_VANILLA_UNITS = flags.DEFINE_list(
    'vanilla_units', ['1', '2', '3'],
    'Units per block of each vanilla run: N (every block) or N-N-N; empty '
    'for none.')
_COLLECT = flags.DEFINE_bool(
    'collect', True, 'After the runs, write the trade-off of the finished '
    'runs under --workdir into it.')
_CACHE_DIR = _cli.define_cache_flag()


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  _cli.configure_jax(_CACHE_DIR.value)
  # Imported after jax is configured.
  from sact_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sact_jax import data  # pylint: disable=g-import-not-at-top
  from sact_jax import sweep  # pylint: disable=g-import-not-at-top
  from sact_jax import tradeoff  # pylint: disable=g-import-not-at-top
  from sact_jax import train  # pylint: disable=g-import-not-at-top
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  from sact_jax.configs import validation  # pylint: disable=g-import-not-at-top

  config = _cli.config_value(_CONFIG)
  root = _WORKDIR.value
  try:
    try:
      taus = [float(t) for t in _TAUS.value]
    except ValueError:
      _cli.fail(f'--taus must be numbers, got {",".join(_TAUS.value)}.')
    runs = sweep.plan(config, taus=taus, model_types=_MODEL_TYPES.value,
                      vanilla_units=_VANILLA_UNITS.value)
    sweep.validate(runs, root)
    data.check_available(config.dataset, config.get('data_dir'))
    workdirs.ensure_writable_dir(root)
    records = sweep.run_sweep(runs, root)
    if _COLLECT.value and all(r['status'] != 'preempted' for r in records):
      rows = tradeoff.collect([root])
      paths = tradeoff.save(rows, root)
      print(tradeoff.markdown_table(rows))
      print(f'Wrote {", ".join(paths.values())}')
  except (sweep.SweepError, validation.ConfigError, data.DatasetNotFoundError,
          checkpoint.CheckpointError, workdirs.WorkdirError,
          tradeoff.TradeoffError) as e:
    _cli.fail(str(e))
  except train.NonFiniteLossError as e:
    _cli.fail(str(e), _cli.RUN_FAILED)


if __name__ == '__main__':
  _cli.run(main)
