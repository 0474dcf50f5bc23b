r"""Draws ponder-cost maps next to their images (PNGs), as in the paper.

  python -m experiments.export_ponder_maps \
      --config=sact_jax/configs/default.py --workdir=/tmp/sact_shapes \
      --num_images=16 --photos
  python -m experiments.export_ponder_maps \
      --checkpoint=models/imagenet_resnet_101_sact --photos --photo_size=256

`--workdir` restores the latest checkpoint of a training run (with its
`--config`); `--checkpoint` a model-only checkpoint. With a config, the first
`--num_images` eval images of its dataset are drawn; `--photos` also draws
the photographs scikit-image ships (astronaut, coffee, chelsea, ...) at
`--photo_size` pixels: in-distribution for ImageNet-family models,
out-of-distribution pictures for CIFAR-family ones.

Bad input (flags, a missing checkpoint, an output directory that cannot be
written) ends with one `error:` line and exit status 2 (see
experiments/_cli.py).
"""

import os

from absl import flags
import jax
from ml_collections import config_flags

from experiments import _cli
from sact_jax import data
from sact_jax import evaluate
from sact_jax import visualize
from sact_jax import workdirs

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file: the dataset to draw images from and, with '
    '--workdir, the model.', lock_config=False)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Training workdir: draw its latest checkpoint.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Model-only checkpoint directory to draw.')
_OUT_DIR = flags.DEFINE_string(
    'out_dir', None, 'Directory for the PNGs (default: ponder_maps/ in the '
    'workdir or checkpoint directory).')
_NUM_IMAGES = flags.DEFINE_integer(
    'num_images', 8, 'Eval images of the config\'s dataset to draw.',
    lower_bound=0)
_PHOTOS = flags.DEFINE_bool(
    'photos', False, 'Also draw the photographs bundled with scikit-image.')
_PHOTO_SIZE = flags.DEFINE_integer(
    'photo_size', 128, 'Side of the (centre-cropped, square) photographs.',
    lower_bound=8)
_OVERLAY = flags.DEFINE_bool(
    'overlay', False, 'Draw the maps over their images.')


def main(argv):
  if len(argv) > 1:
    _cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    evaluate.check_model_source(_WORKDIR.value, _CHECKPOINT.value)
  except ValueError as e:
    _cli.fail(str(e))
  config = _cli.config_value(_CONFIG)
  if config is None and _WORKDIR.value is not None:
    _cli.fail('--workdir needs the --config of the training run.')
  if (config is None or _NUM_IMAGES.value == 0) and not _PHOTOS.value:
    _cli.fail('Nothing to draw: give --config (and --num_images > 0) for '
              'dataset images, or --photos.')
  jax.config.update('jax_default_prng_impl', 'rbg')
  out_dir = _OUT_DIR.value or os.path.join(
      _WORKDIR.value or _CHECKPOINT.value, 'ponder_maps')
  try:
    model = evaluate.load_model(config, workdir=_WORKDIR.value,
                                checkpoint=_CHECKPOINT.value)
    workdirs.ensure_writable_dir(out_dir)
  except (ValueError, FileNotFoundError) as e:
    # Bad workdir, checkpoint or out_dir (WorkdirError is a ValueError).
    _cli.fail(_cli.one_line(e))
  paths = []
  if config is not None and _NUM_IMAGES.value > 0:
    try:
      paths += visualize.save_ponder_maps(
          model, config, out_dir, num_images=_NUM_IMAGES.value,
          overlay=_OVERLAY.value)
    except data.DatasetNotFoundError as e:
      _cli.fail(_cli.one_line(e))
  if _PHOTOS.value:
    photos = visualize.load_photos(size=_PHOTO_SIZE.value)
    paths.append(visualize.save_ponder_maps_for_images(
        model, list(photos.values()),
        os.path.join(out_dir, f'photos_{_PHOTO_SIZE.value}.png'),
        names=list(photos),
        class_names=(None if config is None
                     else data.dataset_info(config.dataset).class_names),
        overlay=_OVERLAY.value))
  for path in paths:
    print(f'Wrote {path}')


if __name__ == '__main__':
  _cli.run(main)
