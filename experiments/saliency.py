r"""Scores ponder maps as saliency maps against centre-bias and uniform maps.

  python -m experiments.saliency --config=sact_jax/configs/default.py \
      --workdir=/tmp/sact_shapes --num_images=500
  python -m experiments.saliency \
      --checkpoint=models/imagenet_resnet_101_sact \
      --cat2000_dir=/data/CAT2000/trainSet --image_size=224

`--workdir` restores the latest checkpoint of a training run (with its
`--config`); `--checkpoint` a model-only checkpoint. Without
`--cat2000_dir`, the first `--num_images` eval images of the config's
dataset are scored, their object masks standing in for fixations (see
sact_jax/saliency_eval.py); with it, the CAT2000-layout folder's fixations,
the images resized to a short side of `--image_size` (default: the model
family's training size). Prints a markdown table (rows: map sources;
columns: the seven metrics) and, with `--output=PATH.json`, writes the
numbers (`scores`: {source: {metric: mean}}) with what they were measured
on: `model` (its spec), `dataset`, `split` and `num_fixations` or
`cat2000_dir` and `image_size`, `num_images` (those scored: images with
an empty object mask are skipped) and `seed`.

Bad input (flags, no or two model sources, a missing folder or checkpoint)
ends with one `error:` line and exit status 2 (see experiments/_cli.py).
"""

import os

from absl import flags
import jax
import numpy as np

from experiments import _cli
from sact_jax import data
from sact_jax import evaluate
from sact_jax import models
from sact_jax import ponder_export
from sact_jax import saliency_eval
from sact_jax import visualize

_MODEL = _cli.ModelFlags('the dataset to score on', 'score')
_CACHE_DIR = _cli.define_cache_flag()
_CAT2000_DIR = flags.DEFINE_string(
    'cat2000_dir', None, 'A CAT2000-layout folder (Stimuli/, FIXATIONMAPS/) '
    'to score on instead of the config\'s dataset.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'With --cat2000_dir: short side the images are '
    'resized to; default: the model family\'s training size.', lower_bound=8)
_NUM_IMAGES = flags.DEFINE_integer(
    'num_images', 500, 'Eval images of the config\'s dataset to score.',
    lower_bound=2)
_NUM_FIXATIONS = flags.DEFINE_integer(
    'num_fixations', 10, 'Fixations sampled inside each object mask.',
    lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampled fixations and '
                             'the metrics\' random negatives.', lower_bound=0)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Also write the scores and what they were measured on '
    'to this .json file.')


def main(argv):
  config = _MODEL.checked_config(argv)
  cat2000 = _CAT2000_DIR.value
  if cat2000 is None and config is None:
    _cli.fail('Nothing to score on: give --config (its dataset) or '
              '--cat2000_dir.')
  if cat2000 is not None and not os.path.isdir(
      os.path.join(cat2000, 'Stimuli')):
    _cli.fail(f'--cat2000_dir={cat2000} has no Stimuli folder.')
  if _OUTPUT.value is not None:
    if not _OUTPUT.value.endswith('.json'):
      _cli.fail(f'--output={_OUTPUT.value} must end in .json.')
    _cli.check_output_file(_OUTPUT.value)
  if cat2000 is None:
    try:
      visualize.check_num_images(config, _NUM_IMAGES.value)
    except ValueError as e:
      _cli.fail(f'--num_images: {e}')
  _cli.configure_jax(_CACHE_DIR.value)
  try:
    model = evaluate.load_model(config, workdir=_MODEL.workdir.value,
                                checkpoint=_MODEL.checkpoint.value)
  except (ValueError, FileNotFoundError) as e:
    _cli.fail(_cli.one_line(e))
  if model.model_type == 'vanilla':
    _cli.fail('A vanilla model has no ponder maps to score; give an ACT or '
              'SACT model.')
  rng = np.random.default_rng(_SEED.value)
  try:
    if cat2000 is not None:
      family = models.ModelSpec.from_model(model).family
      scores = saliency_eval.evaluate_saliency_on_cat2000(
          model, family, cat2000,
          image_size=(_IMAGE_SIZE.value
                      or ponder_export.DEFAULT_IMAGE_SIZE[family]),
          rng=rng)
    else:
      scores = saliency_eval.evaluate_saliency_on_dataset(
          model, config, num_images=_NUM_IMAGES.value, rng=rng,
          num_fixations=_NUM_FIXATIONS.value)
  except (ValueError, FileNotFoundError, data.DatasetNotFoundError) as e:
    # Unreadable fixations, too few images, a dataset without masks.
    _cli.fail(_cli.one_line(e))
  spec = models.ModelSpec.from_model(model)
  if cat2000 is not None:
    source = {'cat2000_dir': os.path.abspath(cat2000),
              'image_size': (_IMAGE_SIZE.value
                             or ponder_export.DEFAULT_IMAGE_SIZE[spec.family])}
  else:
    source = {'dataset': config.dataset,
              'split': data.dataset_info(config.dataset).split_to_evaluate(
                  config.get('eval_split', None)) + f'[:{_NUM_IMAGES.value}]',
              'num_fixations': _NUM_FIXATIONS.value}
  print(f'{spec.model_type.upper()} {spec.family} ResNet {spec.units} on '
        + ', '.join(f'{k}={v}' for k, v in source.items())
        + f': {scores.num_images} images, seed {_SEED.value}')
  print(saliency_eval.markdown_table(scores, model.model_type))
  if _OUTPUT.value is not None:
    evaluate.save_json({'model': spec.to_dict(), **source,
                        'num_images': scores.num_images, 'seed': _SEED.value,
                        'scores': scores.scores}, _OUTPUT.value)
    print(f'Wrote {_OUTPUT.value}')


if __name__ == '__main__':
  _cli.run(main)
