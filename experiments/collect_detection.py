r"""The detection table of finished runs: extractor FLOPs, mAP, ponder cost.

  python -m experiments.collect_detection \
      --workdirs=runs/det_vanilla,runs/det_sact_tau0.02 --output=table.md

Reads each workdir's `config.json` and `eval.json` (written by
`experiments.train_detection`), prints the markdown table of
`sact_jax.detection.evaluate.results_table` and writes it to `--output`
when given. A missing or unfinished workdir ends with one `error:` line and
exit status 2 (see experiments/_cli.py).
"""

import os

from absl import flags

from experiments import _cli

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Finished detection runs.',
                              required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Markdown file to write.')


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  from sact_jax.detection import evaluate  # pylint: disable=g-import-not-at-top
  try:
    table = evaluate.results_table(_WORKDIRS.value)
  except (FileNotFoundError, KeyError, ValueError) as e:
    _cli.fail(f'Not a finished detection run: {_cli.one_line(e)}')
  print(table)
  if _OUTPUT.value:
    directory = os.path.dirname(os.path.abspath(_OUTPUT.value))
    if not os.path.isdir(directory):
      _cli.fail(f'No such directory for --output: {directory}')
    with open(_OUTPUT.value, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  _cli.run(main)
