r"""Evaluates a model: top-1/top-5, FLOPs (vs vanilla), ponder costs.

  python -m experiments.evaluate --config=sact_jax/configs/default.py \
      --workdir=/tmp/sact_shapes
  python -m experiments.evaluate --config=sact_jax/configs/cifar10.py \
      --checkpoint=models/cifar10_resnet_32_sact --output=/tmp/eval.json
  python -m experiments.evaluate --config=sact_jax/configs/default.py \
      --workdir=/tmp/sact_shapes --inference=sparse

`--workdir` restores the latest checkpoint of a training run (the config
must be the run's); `--checkpoint` a model-only checkpoint (e.g. converted
from TF; the config then only chooses the data). Prints a table and writes
the metrics as JSON to `--output` (default: `eval.json` in the workdir or
checkpoint directory). `--inference=sparse` runs the model through
`sact_jax.sparse` (see BUILD.md, "Sparse inference").

Bad input (flags, a missing checkpoint, an output that cannot be written)
ends with one `error:` line and exit status 2 (see experiments/_cli.py).
"""

import os

from absl import flags
import jax

from experiments import _cli
from sact_jax import data
from sact_jax import evaluate

_MODEL = _cli.ModelFlags('the dataset, eval batch size', 'evaluate')
_INFERENCE = flags.DEFINE_enum(
    'inference', 'dense', ['dense', 'sparse'],
    'dense: the jitted model on all devices; sparse: sact_jax.sparse on one '
    'device, computing only the units and positions halting keeps (same '
    'metrics, plus its wall time in the model).')
_CACHE_DIR = _cli.define_cache_flag()
_OUTPUT = flags.DEFINE_string(
    'output', None, 'JSON output path (default: eval.json in the workdir or '
    'checkpoint directory).')


def main(argv):
  config = _MODEL.checked_config(argv)
  if config is None:
    _cli.fail('--config is required (it chooses the dataset).')
  _cli.configure_jax(_CACHE_DIR.value)
  output = _OUTPUT.value or os.path.join(
      _MODEL.workdir.value or _MODEL.checkpoint.value, 'eval.json')
  try:
    model = evaluate.load_model(config, workdir=_MODEL.workdir.value,
                                checkpoint=_MODEL.checkpoint.value)
  except (ValueError, FileNotFoundError) as e:
    # Bad workdir or checkpoint (WorkdirError is a ValueError).
    _cli.fail(_cli.one_line(e))
  # Before the evaluation, which may take long, not after it.
  _cli.check_output_file(output)
  try:
    # Not logged as well: the table is printed below.
    metrics = evaluate.evaluate_model(model, config,
                                      sparse=_INFERENCE.value == 'sparse',
                                      verbose=False)
  except (evaluate.EvaluationError, data.DatasetNotFoundError) as e:
    _cli.fail(_cli.one_line(e))
  if jax.process_index() == 0:
    evaluate.save_json(metrics, output)
  print(evaluate.format_table(metrics))
  print(f'Wrote {output}')


if __name__ == '__main__':
  _cli.run(main)
