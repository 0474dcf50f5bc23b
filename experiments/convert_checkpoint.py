r"""Converts a released TF checkpoint of the reference into a model checkpoint.

  python -m experiments.convert_checkpoint \
    --tf_checkpoint=models/cifar10_resnet_5_sact_1e-2 --family=cifar \
    --units=5,5,5 --model_type=sact --num_classes=10 \
    --output=models/cifar10_resnet_32_sact

`--tf_checkpoint` is a checkpoint prefix (`.../model.ckpt-100000`), its
`.index` file, or a directory with a `checkpoint` state file. Needs
TensorFlow (`pip install -e .[tf]`). The result is read back with
`sact_jax.checkpoint.restore_model(output)`.

Bad input (flags, a missing or mismatched TF checkpoint, an existing output,
no TensorFlow) ends with one `error:` line and exit status 2, nothing
written (see experiments/_cli.py).
"""

import collections
import os

from absl import flags
from absl import logging

from experiments import _cli

_TF_CHECKPOINT = flags.DEFINE_string(
    'tf_checkpoint', None, 'TF checkpoint prefix, .index file or directory.',
    required=True)
_FAMILY = flags.DEFINE_enum('family', None, ['cifar', 'imagenet'],
                            'Model family.', required=True)
_UNITS = flags.DEFINE_list(
    'units', None, 'Units per block (e.g. 5,5,5) or one preset depth (e.g. '
    '110 for CIFAR, 101 for ImageNet).', required=True)
_MODEL_TYPE = flags.DEFINE_enum('model_type', None,
                                ['vanilla', 'act', 'sact'], 'Model type.',
                                required=True)
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'Logits size (CIFAR-10: 10, ImageNet: 1001).',
    required=True)
_BASE_CHANNELS = flags.DEFINE_integer(
    'base_channels', None, 'Width of the first block (CIFAR, default 16) or '
    'its bottleneck (ImageNet, default 64).')
_EPS = flags.DEFINE_float('eps', 0.01, 'Halting threshold is 1 - eps.')
_EMA = flags.DEFINE_enum(
    'ema', 'auto', ['auto', 'yes', 'no'],
    'Take weights from the ExponentialMovingAverage shadows (as the '
    "reference's ImageNet evaluator does). auto: if the checkpoint has them.")
_OUTPUT = flags.DEFINE_string('output', None, 'Model checkpoint directory.',
                              required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Replace an existing model checkpoint.')

_EXAMPLES = 5


def _parse_units(values: list[str]) -> int | tuple[int, ...]:
  try:
    units = [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--units must be integers, got {values}.') from None
  return units[0] if len(units) == 1 else tuple(units)


def _print_skipped(skipped: dict[str, str]):
  by_reason = collections.defaultdict(list)
  for name, reason in sorted(skipped.items()):
    by_reason[reason].append(name)
  for reason, names in sorted(by_reason.items()):
    more = f', ... (+{len(names) - _EXAMPLES})' if len(
        names) > _EXAMPLES else ''
    print(f'  skipped {len(names)} {reason}: '
          f'{", ".join(names[:_EXAMPLES])}{more}')
    for name in names:
      logging.info('Skipped %s: %s', name, reason)


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    # app.run turns INFO on, and orbax logs every write at INFO; the summary
    # below says what matters. --verbosity=0 brings the logs back.
    logging.set_verbosity(logging.WARNING)
  # Imported here so that flag errors come before the slow imports.
  from sact_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sact_jax import flops  # pylint: disable=g-import-not-at-top
  from sact_jax import models  # pylint: disable=g-import-not-at-top
  from sact_jax import reference  # pylint: disable=g-import-not-at-top
  from sact_jax import tf_checkpoint  # pylint: disable=g-import-not-at-top

  ema = {'auto': None, 'yes': True, 'no': False}[_EMA.value]
  if not _OUTPUT.value:
    _cli.fail('--output is an empty path.')
  try:
    # Before reading TF's checkpoint: where the output cannot go. (A
    # directory this makes is removed again if the run is refused.)
    _cli.check_output_dir(os.path.dirname(os.path.abspath(_OUTPUT.value)))
    spec = models.ModelSpec(
        family=_FAMILY.value, units=_parse_units(_UNITS.value),
        model_type=_MODEL_TYPE.value, num_classes=_NUM_CLASSES.value,
        base_channels=_BASE_CHANNELS.value, eps=_EPS.value)
    result = tf_checkpoint.convert_tf_checkpoint(
        _TF_CHECKPOINT.value, _OUTPUT.value, spec, ema=ema,
        overwrite=_OVERWRITE.value)
  except (tf_checkpoint.TensorFlowMissingError, checkpoint.CheckpointError,
          reference.ReferenceMismatchError, FileNotFoundError,
          FileExistsError, ValueError) as e:
    _cli.fail(_cli.one_line(e))

  selection = result.selection
  print(f'Read {len(selection.sources)} model variables from {result.source}'
        + (' (moving averages)' if selection.used_ema else ''))
  _print_skipped(selection.skipped)
  print(f'Wrote {result.spec} with {flops.param_count(result.model):,} '
        f'parameters to {result.output}')


if __name__ == '__main__':
  # TF's C++ start-up chatter would bury the summary.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')
  _cli.run(main)
