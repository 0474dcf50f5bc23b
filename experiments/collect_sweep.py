r"""Tables and draws the FLOPs-accuracy trade-off of trained runs.

  python -m experiments.collect_sweep --workdirs=/tmp/sact_sweep
  python -m experiments.collect_sweep \
      --workdirs='/cluster/runs/cifar_sact_tau*,/cluster/runs/cifar_resnet*' \
      --output_dir=/tmp/tradeoff

Each entry of --workdirs is a training workdir (one with eval.json), a
directory of such workdirs (a sweep's root), or a glob of either: runs of
experiments/sweep.py or of experiments/train.py, one per job, alike. Writes
tradeoff.png (top-1 against FLOPs per image, std as horizontal bars),
tradeoff.md and tradeoff.json into --output_dir (default: the first entry)
and prints the table. Paths that hold no finished run end with one `error:`
line and exit status 2 (see experiments/_cli.py).
"""

import os

from absl import flags

from experiments import _cli
from sact_jax import tradeoff
from sact_jax import workdirs

_WORKDIRS = flags.DEFINE_list(
    'workdirs', None, 'Workdirs, sweep roots or globs of them.',
    required=True)
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where the table and figure go; default: the first '
    '--workdirs entry (when it is a directory).')


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    rows = tradeoff.collect(_WORKDIRS.value)
    out_dir = _OUTPUT_DIR.value or _WORKDIRS.value[0]
    if _OUTPUT_DIR.value is None and not os.path.isdir(out_dir):
      _cli.fail(f'Give --output_dir: the first --workdirs entry ({out_dir}) '
                'is not a directory to write into.')
    workdirs.ensure_writable_dir(out_dir)
    paths = tradeoff.save(rows, out_dir)
  except (tradeoff.TradeoffError, workdirs.WorkdirError) as e:
    _cli.fail(str(e))
  print(tradeoff.markdown_table(rows))
  print(f'Wrote {", ".join(paths.values())}')


if __name__ == '__main__':
  _cli.run(main)
