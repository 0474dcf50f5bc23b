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

  python -m experiments.export_ponder_maps \
      --checkpoint=models/imagenet_resnet_101_sact \
      --images='photos/*.jpg' --image_size=224 --export=/tmp/maps.npz

`--images` (files, folders or globs, comma-separated; JPEG or PNG) draws
image files at their own aspect ratio, the short side resized to
`--image_size` pixels (default: the model family's training size), into
`images.png` (`images_<k>.png` with more than 8). `--export=PATH.npz`
also writes, for every image drawn (dataset images as `test[i]`, then the
files and photos by name), its per-block maps, total map, ponder cost,
FLOPs, predicted class and name as plain numpy arrays; the keys are listed
in sact_jax/ponder_export.py. A file that is not an image gets one `warning:`
line on stderr and is skipped; the others are still drawn and exported
(exit status 0 if at least one image was processed).

`--by_cost` ranks the first `--num_images` eval images of the config's
dataset by total ponder cost and draws the `--per_group` cheapest, median
and dearest ones into `ponder_maps_by_cost.png`, as the SACT paper's
ImageNet figure.

Bad input (flags, a missing checkpoint, a vanilla model, an output directory
that cannot be written, an `--images` pattern that matches no file or only
non-images) ends with one `error:` line and exit status 2 (see
experiments/_cli.py).
"""

import os
import sys

from absl import flags
import jax

from experiments import _cli
from sact_jax import data
from sact_jax import evaluate
from sact_jax import models
from sact_jax import ponder_export
from sact_jax import visualize

_MODEL = _cli.ModelFlags('the dataset to draw images from', 'draw')
_CACHE_DIR = _cli.define_cache_flag()
_OUT_DIR = flags.DEFINE_string(
    'out_dir', None, 'Directory for the PNGs (default: export_ponder_maps/ '
    'in the workdir or checkpoint directory, beside training\'s own '
    'ponder_maps/).')
_NUM_IMAGES = flags.DEFINE_integer(
    'num_images', 8, 'Eval images of the config\'s dataset to draw.',
    lower_bound=0)
_PHOTOS = flags.DEFINE_bool(
    'photos', False, 'Also draw the photographs bundled with scikit-image.')
_PHOTO_SIZE = flags.DEFINE_integer(
    'photo_size', 128, 'Side of the (centre-cropped, square) photographs.',
    lower_bound=8)
_IMAGES = flags.DEFINE_list(
    'images', None, 'Image files, folders or globs (JPEG, PNG) to draw at '
    'their own aspect ratio.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'Short side (pixels) the --images are resized to; '
    'default: the model family\'s training size.', lower_bound=8)
_EXPORT = flags.DEFINE_string(
    'export', None, 'Also write the maps of every image drawn (dataset '
    'images, photos, --images) to this .npz file.')
_BY_COST = flags.DEFINE_bool(
    'by_cost', False, 'Draw the --num_images eval images ranked by ponder '
    'cost (low, median and high rows) instead of the first ones.')
_PER_GROUP = flags.DEFINE_integer(
    'per_group', 3, 'With --by_cost: images of low, median and high cost.',
    lower_bound=1)
_OVERLAY = flags.DEFINE_bool(
    'overlay', False, 'Draw the maps over their images.')


def main(argv):
  config = _MODEL.checked_config(argv)
  if ((config is None or _NUM_IMAGES.value == 0) and not _PHOTOS.value
      and not _IMAGES.value):
    _cli.fail('Nothing to draw: give --config (and --num_images > 0) for '
              'dataset images, --photos or --images.')
  if _BY_COST.value and config is None:
    _cli.fail('--by_cost needs a --config (the dataset to rank).')
  if config is not None and _NUM_IMAGES.value > 0:
    try:
      visualize.check_num_images(config, _NUM_IMAGES.value)
    except ValueError as e:
      _cli.fail(f'--num_images: {e}')
  if _EXPORT.value is not None:
    if not _EXPORT.value.endswith('.npz'):
      _cli.fail(f'--export={_EXPORT.value} must end in .npz.')
  try:
    paths = ponder_export.find_images(_IMAGES.value or [])
  except ponder_export.NoImagesError as e:
    _cli.fail(str(e))
  _cli.configure_jax(_CACHE_DIR.value)
  # Not training's ponder_maps/: a set drawn there would replace its pages.
  out_dir = _OUT_DIR.value or os.path.join(
      _MODEL.workdir.value or _MODEL.checkpoint.value, 'export_ponder_maps')
  try:
    model = evaluate.load_model(config, workdir=_MODEL.workdir.value,
                                checkpoint=_MODEL.checkpoint.value)
  except (ValueError, FileNotFoundError) as e:
    # Bad workdir or checkpoint (WorkdirError is a ValueError).
    _cli.fail(_cli.one_line(e))
  if model.model_type == 'vanilla':
    _cli.fail('A vanilla model has no ponder maps to draw; give an ACT or '
              'SACT model.')
  images = {}
  if paths:
    family = models.ModelSpec.from_model(model).family
    try:
      images, skipped = ponder_export.load_images(
          paths, _IMAGE_SIZE.value
          or ponder_export.DEFAULT_IMAGE_SIZE[family])
    except ponder_export.NoImagesError as e:
      _cli.fail(str(e))
    for message in skipped:
      print(f'warning: skipped {message}', file=sys.stderr, flush=True)
  # Removed again if a later check fails before anything is written.
  _cli.check_output_dir(out_dir)
  if _EXPORT.value is not None:
    _cli.check_output_file(_EXPORT.value)
  written, exported = [], []
  if config is not None and _NUM_IMAGES.value > 0:
    try:
      if _BY_COST.value:
        groups = len(ponder_export.COST_GROUPS)
        if _NUM_IMAGES.value < groups * _PER_GROUP.value:
          print(f'note: --num_images={_NUM_IMAGES.value} is fewer than '
                f'{groups} x --per_group={_PER_GROUP.value}: all '
                f'{_NUM_IMAGES.value} are drawn, split into the {groups} '
                'cost groups.', file=sys.stderr, flush=True)
        written.append(ponder_export.save_ponder_maps_by_cost(
            model, config, out_dir, num_images=_NUM_IMAGES.value,
            per_group=_PER_GROUP.value, overlay=_OVERLAY.value))
      else:
        written += visualize.save_ponder_maps(
            model, config, out_dir, num_images=_NUM_IMAGES.value,
            overlay=_OVERLAY.value)
      if _EXPORT.value is not None:
        exported += ponder_export.dataset_results(model, config,
                                                  _NUM_IMAGES.value)
    except data.DatasetNotFoundError as e:
      _cli.fail(_cli.one_line(e))
  if images:
    results = ponder_export.image_results(model, images)
    written += ponder_export.save_result_figures(
        model, results, out_dir, config=config, overlay=_OVERLAY.value)
    exported += results
  if _PHOTOS.value:
    results = ponder_export.image_results(
        model, visualize.load_photos(size=_PHOTO_SIZE.value))
    written += ponder_export.save_result_figures(
        model, results, out_dir, config=config, overlay=_OVERLAY.value,
        stem=f'photos_{_PHOTO_SIZE.value}')
    exported += results
  if _EXPORT.value is not None:
    written.append(ponder_export.save_npz(exported, _EXPORT.value))
  for path in written:
    print(f'Wrote {path}')


if __name__ == '__main__':
  _cli.run(main)
