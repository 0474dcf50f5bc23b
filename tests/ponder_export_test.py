"""Tests of sact_jax/ponder_export.py and the launcher's --images/--export."""

import concurrent.futures
import math
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
import ml_collections
import numpy as np
from PIL import Image

from sact_jax import data
from sact_jax import ponder_export
from sact_jax import visualize

import evaluate_test  # Same directory: its fast model builder.

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(directory: str) -> dict[str, tuple[int, int]]:
  """Two small PNGs (one non-square) and a text file named like an image.

  Returns:
    file name -> (height, width) of the images.
  """
  rng = np.random.default_rng(0)
  sizes = {'wide.png': (24, 40), 'square.png': (20, 20)}
  for name, (height, width) in sizes.items():
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(directory, name))
  with open(os.path.join(directory, 'notes.png'), 'w') as f:
    f.write('not an image')
  return sizes


def block_shapes(height: int, width: int) -> list[tuple[int, int]]:
  """Block resolutions of a CIFAR ResNet: stride 1, 2, 2 ('SAME')."""
  shapes = [(height, width)]
  for _ in range(2):
    h, w = shapes[-1]
    shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
  return shapes


class LibraryTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = evaluate_test.fast_model('sact')
    cls.tmp = cls.enterClassContext(tempfile.TemporaryDirectory())
    # Only the images in their folder: other tests write next to it.
    cls.images = os.path.join(cls.tmp, 'images')
    os.makedirs(cls.images)
    write_images(cls.images)

  def test_find_images(self):
    folder = ponder_export.find_images([self.images])
    self.assertEqual([os.path.basename(p) for p in folder],
                     ['notes.png', 'square.png', 'wide.png'])
    self.assertEqual(
        ponder_export.find_images([os.path.join(self.images, 'w*.png')]),
        [os.path.join(self.images, 'wide.png')])
    with self.assertRaisesRegex(ponder_export.NoImagesError,
                                'matches no file'):
      ponder_export.find_images([os.path.join(self.images, '*.jpg')])

  def test_bad_inputs_raise_one_line(self):
    """Empty inputs, a string for a list, raw pixels without preprocess."""
    pattern = os.path.join(self.images, '*.png')
    with self.assertRaisesRegex(TypeError, r'got the single .*; pass \['):
      ponder_export.find_images(pattern)
    with self.assertRaisesRegex(TypeError, r'got the single .*; pass \['):
      ponder_export.load_images(pattern, 16)
    with self.assertRaisesRegex(ponder_export.NoImagesError, 'no paths'):
      ponder_export.load_images([], 16)
    with self.assertRaisesRegex(ValueError, 'No results to draw'):
      ponder_export.ponder_figures([])
    with self.assertRaisesRegex(ValueError, 'No results to save'):
      ponder_export.save_npz([], os.path.join(self.tmp, 'none.npz'))
    with self.assertRaisesRegex(ValueError, 'No results to draw'):
      ponder_export.save_image_maps(self.model, {}, self.tmp)
    pixels = np.zeros((8, 8, 3), np.uint8)
    with self.assertRaisesRegex(ValueError, 'Got 2 images but 1 names'):
      ponder_export.ponder_results(self.model, [pixels, pixels], ['a'],
                                   preprocess='cifar')
    with self.assertRaisesRegex(TypeError, "names must be a sequence .*'ab'"):
      ponder_export.ponder_results(self.model, [pixels, pixels], 'ab',
                                   preprocess='cifar')
    with self.assertRaisesRegex(
        TypeError, r"Image 'a' has dtype uint8, but preprocess=None .*"
        r"preprocess='cifar'"):
      ponder_export.ponder_results(self.model, [pixels], ['a'])
    result = ponder_export.PonderResult(
        name='a', image=pixels, block_maps=[np.ones((2, 2))],
        total_map=np.ones((8, 8)), ponder_cost=1.0, flops=1.0,
        predicted_class=0)
    with self.assertRaisesRegex(ValueError, 'Got 2 results but 1 titles'):
      ponder_export.ponder_figures([result, result], titles=['a'])

  def test_image_modes(self):
    """16-bit greyscale scales to 8 bits (PIL's convert clips it to white);
    palette, greyscale and RGBA come out as their RGB values."""
    ramp16 = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)
    ramp8 = (np.arange(16 * 16).reshape(16, 16)).astype(np.uint8)
    rgb = np.repeat(ramp8[..., None], 3, axis=-1)
    cases = {'grey16.png': Image.fromarray(ramp16),
             'grey8.png': Image.fromarray(ramp8),
             'rgba.png': Image.fromarray(
                 np.concatenate([rgb, np.full_like(ramp8[..., None], 255)],
                                axis=-1)),
             'palette.png': Image.fromarray(rgb).convert(
                 'P', palette=Image.Palette.ADAPTIVE, colors=256)}
    for name, image in cases.items():
      path = os.path.join(self.tmp, name)
      image.save(path)
      loaded = ponder_export.load_image(path, 16)
      self.assertEqual(loaded.shape, (16, 16, 3), name)
      np.testing.assert_allclose(loaded, rgb, atol=2, err_msg=name)

  def test_aspect_ratio_and_block_resolutions(self):
    """Short side = image_size; maps at the blocks' resolutions."""
    paths = ponder_export.find_images([self.images])
    images, skipped = ponder_export.load_images(paths, 16)
    self.assertLen(skipped, 1)
    self.assertIn('notes.png is not an image', skipped[0])
    shapes = {os.path.basename(p): im.shape for p, im in images.items()}
    self.assertEqual(shapes, {'wide.png': (16, 27, 3),
                              'square.png': (16, 16, 3)})
    results = ponder_export.ponder_results(
        self.model, list(images.values()), list(images), preprocess='cifar')
    for result in results:
      height, width = result.image.shape[:2]
      self.assertEqual([m.shape for m in result.block_maps],
                       block_shapes(height, width))
      self.assertEqual(result.total_map.shape, (height, width))
      self.assertAlmostEqual(result.ponder_cost,
                             sum(m.mean() for m in result.block_maps),
                             places=5)
      self.assertGreater(result.flops, 0)

  def test_npz_loads_with_plain_numpy(self):
    paths = ponder_export.find_images([os.path.join(self.images, '*e.png')])
    images, _ = ponder_export.load_images(paths, 16)
    results = ponder_export.ponder_results(
        self.model, list(images.values()), list(images), preprocess='cifar')
    path = ponder_export.save_npz(results, os.path.join(self.tmp, 'out.npz'))
    with np.load(path, allow_pickle=False) as npz:
      arrays = dict(npz)
    count = len(results)
    self.assertEqual(arrays['names'].tolist(), list(images))
    self.assertEqual(int(arrays['num_blocks']), 3)
    for key in ('ponder_cost', 'flops', 'predicted_class', 'true_class'):
      self.assertEqual(arrays[key].shape, (count,))
    self.assertEqual(arrays['true_class'].tolist(), [-1] * count)  # Files.
    self.assertEqual(
        sorted(arrays),
        sorted(['names', 'num_blocks', 'ponder_cost', 'flops',
                'predicted_class', 'true_class', 'image_shape']
               + [f'{key}_{i}' for i in range(count)
                  for key in ('image', 'ponder_total', 'ponder_block0',
                              'ponder_block1', 'ponder_block2')]))
    for i in range(count):
      height, width = arrays['image_shape'][i]
      self.assertEqual(arrays[f'image_{i}'].shape, (height, width, 3))
      blocks = [arrays[f'ponder_block{b}_{i}'] for b in range(3)]
      self.assertEqual([b.shape for b in blocks],
                       block_shapes(height, width))
      upsampled = [visualize.upsample_nearest(b[None], (height, width))[0]
                   for b in blocks]
      np.testing.assert_allclose(arrays[f'ponder_total_{i}'], sum(upsampled),
                                 rtol=1e-6)
      self.assertAlmostEqual(float(arrays['ponder_cost'][i]),
                             sum(float(b.mean()) for b in blocks), places=4)

  def test_select_by_cost(self):
    costs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0]
    self.assertEqual(ponder_export.select_by_cost(costs, 1),
                     [('low', 1), ('median', 0), ('high', 2)])
    self.assertEqual(
        [i for _, i in ponder_export.select_by_cost(costs, 2)],
        [1, 5, 7, 0, 6, 2])
    # Too few costs for the groups: all of them, in order.
    self.assertEqual(ponder_export.select_by_cost([2.0, 1.0], 3),
                     [('low', 1), ('high', 0)])

  def test_long_names_are_cut_to_the_panel(self):
    result = ponder_export.PonderResult(
        name='/photos/a_very_long_file_name_of_a_holiday_photo.jpg',
        image=np.zeros((96, 128, 3), np.uint8),
        block_maps=[np.full((3, 4), 2.0)], total_map=np.full((96, 128), 2.0),
        ponder_cost=2.0, flops=1e6, predicted_class=1)
    fig, = ponder_export.ponder_figures([result], class_names=['a', 'b'])
    first, second = fig.axes[0].get_title().splitlines()
    self.assertEqual(first, 'a_very...o.jpg: 96x128, cost 2.000')  # 34.
    self.assertEqual(second, 'predicted b, 1.00 MFLOPs')

  def test_figure_by_cost_orders_images_by_cost(self):
    config = ml_collections.ConfigDict(
        {'dataset': 'sact_shapes/tiny', 'data_dir': self.tmp})
    fig, drawn = ponder_export.ponder_figure_by_cost(
        self.model, config, num_images=12, per_group=2)
    costs = [r.ponder_cost for r in drawn]
    self.assertLen(costs, 6)
    self.assertEqual(costs, sorted(costs))
    self.assertGreater(costs[-1], costs[0])
    # Image, 3 blocks and the sum per row: the titles on the image panels.
    titles = [fig.axes[5 * row].get_title() for row in range(6)]
    self.assertEqual([t.split(':')[0] for t in titles],
                     ['low'] * 2 + ['median'] * 2 + ['high'] * 2)
    # Each drawn image's label and object outline, as the dataset has them.
    names = data.dataset_info(config.dataset).class_names
    for title, result in zip(titles, drawn):
      self.assertIn(f'\ntrue {names[result.true_class]}, ', title)
      self.assertEqual(fig.axes[5 * titles.index(title)].title.get_color(),
                       'black' if result.predicted_class == result.true_class
                       else 'red')
    self.assertNotEmpty(fig.axes[1].collections)  # The outline's contour.
    title_costs = [float(re.search(r'cost ([\d.]+)', t).group(1))
                   for t in titles]
    np.testing.assert_allclose(title_costs, costs, atol=1e-3)
    out = ponder_export.save_ponder_maps_by_cost(
        self.model, config, os.path.join(self.tmp, 'by_cost'),
        num_images=12, per_group=2)
    with Image.open(out) as image:
      self.assertEqual(image.size, visualize.figure_pixel_size(6, 5))


def _run(args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.export_ponder_maps', *args],
      cwd=_REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2'})


class LauncherTest(absltest.TestCase):
  """`export_ponder_maps --images ... --export ...` end to end."""

  def test_images_and_export(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    checkpoint = os.path.join(tmp, 'ckpt')
    evaluate_test.save_fast_model(checkpoint)
    images_dir = os.path.join(tmp, 'images')
    os.makedirs(images_dir)
    write_images(images_dir)
    out_dir = os.path.join(tmp, 'out')
    export = os.path.join(tmp, 'maps.npz')
    dataset_export = os.path.join(tmp, 'dataset.npz')
    runs = {
        'no_match': [f'--checkpoint={checkpoint}',
                     f'--images={images_dir}/*.jpg', f'--out_dir={out_dir}'],
        'ok': [f'--checkpoint={checkpoint}', f'--images={images_dir}',
               '--image_size=16', f'--out_dir={out_dir}',
               f'--export={export}'],
        'dataset_and_photos': [
            '--config=sact_jax/configs/default.py:smoke',
            f'--config.data_dir={os.path.join(tmp, "data")}',
            f'--checkpoint={checkpoint}', '--num_images=3', '--photos',
            '--photo_size=24', f'--out_dir={os.path.join(tmp, "out2")}',
            f'--export={dataset_export}'],
    }
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
      results = dict(zip(runs, pool.map(_run, runs.values())))
    no_match = results['no_match']
    self.assertEqual(no_match.returncode, 2, no_match.stderr[-2000:])
    lines = no_match.stderr.strip().splitlines()
    self.assertEqual(lines[-1],
                     f'error: --images={images_dir}/*.jpg matches no file.')
    self.assertLen([l for l in lines if l.startswith('error: ')], 1)
    self.assertNotIn('Traceback', no_match.stderr)
    ok = results['ok']
    self.assertEqual(ok.returncode, 0, ok.stderr[-3000:])
    warnings = [l for l in ok.stderr.splitlines()
                if l.startswith('warning: ')]
    self.assertLen(warnings, 1)
    self.assertIn(os.path.join(images_dir, 'notes.png'), warnings[0])
    self.assertEqual(os.listdir(out_dir), ['images.png'])
    with np.load(export, allow_pickle=False) as npz:
      self.assertEqual(
          [os.path.basename(n) for n in npz['names']],
          ['square.png', 'wide.png'])
      self.assertEqual(npz['image_shape'].tolist(), [[16, 16], [16, 27]])
      self.assertEqual(npz['ponder_block2_1'].shape, (4, 7))
    # Dataset images and photos are exported too, in the order drawn.
    both = results['dataset_and_photos']
    self.assertEqual(both.returncode, 0, both.stderr[-3000:])
    with np.load(dataset_export, allow_pickle=False) as npz:
      names = list(npz['names'])
      self.assertEqual(names, ['test[0]', 'test[1]', 'test[2]',
                               *visualize.PHOTOS])
      self.assertEqual(npz['image_0'].dtype, np.uint8)
      self.assertEqual(npz['image_0'].shape, (32, 32, 3))
      self.assertEqual(npz['image_3'].shape, (24, 24, 3))
      self.assertEqual(npz['image_shape'][:4].tolist(),
                       [[32, 32]] * 3 + [[24, 24]])
      # The total map is the blocks' maps upsampled (nearest) and summed,
      # and the ponder cost the sum of the blocks' means.
      blocks = [npz[f'ponder_block{b}_1'] for b in range(3)]
      np.testing.assert_allclose(
          npz['ponder_total_1'],
          sum(visualize.upsample_nearest(m[None], (32, 32))[0]
              for m in blocks), rtol=1e-6)
      np.testing.assert_allclose(npz['ponder_cost'][1],
                                 sum(m.mean() for m in blocks), rtol=1e-5)


if __name__ == '__main__':
  absltest.main()
