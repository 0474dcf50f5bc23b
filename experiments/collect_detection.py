r"""The detection table of finished runs: extractor FLOPs, mAP, ponder cost.

  python -m experiments.collect_detection \
      --workdirs=runs/det_vanilla,runs/det_sact_tau0.02 --output=table.md

Reads each workdir's `config.json` and `eval.json` (written by
`experiments.train_detection`), prints the markdown table of
`sact_jax.detection.evaluate.results_table` and writes it to `--output`
when given. A missing or unfinished workdir, or an output that cannot be
written, ends with one `error:` line and exit status 2 before anything is
printed or written (see experiments/_cli.py).
"""

from absl import flags

from experiments import _cli

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Finished detection runs.',
                              required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Markdown file to write.')


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIRS.value or '' in _WORKDIRS.value:
    _cli.fail('--workdirs is empty or has an empty entry: give finished '
              'detection runs, comma-separated.')
  from sact_jax import workdirs  # pylint: disable=g-import-not-at-top
  from sact_jax.detection import evaluate  # pylint: disable=g-import-not-at-top
  try:
    table = evaluate.results_table(_WORKDIRS.value)
  except ValueError as e:
    _cli.fail(f'Not a finished detection run: {_cli.one_line(e)}')
  if _OUTPUT.value is not None:
    # Before the table is printed: a run's output is all or nothing.
    try:
      workdirs.ensure_writable_file(_OUTPUT.value)
    except workdirs.WorkdirError as e:
      _cli.fail(f'--output: {e}')
  print(table)
  if _OUTPUT.value is not None:
    with open(_OUTPUT.value, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  _cli.run(main)
